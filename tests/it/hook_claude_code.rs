//! Runs `keygate hook claude-code …` the way Claude Code does: event JSON on stdin, then the
//! exit code and the JSON on stdout decide.
//!
//! The fixtures in `tests/fixtures/claude_code/` are the events Claude Code sends for Bash,
//! Read, Write, Edit and an MCP tool. Credentials in them are `{{PLACEHOLDERS}}` filled in
//! here at run time, so the fixtures themselves pass `keygate redact --check`.

use std::path::Path;
use std::process::Output;

use crate::support;

use serde_json::Value;

struct Env {
    home: tempfile::TempDir,
    cwd: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Env {
            home: tempfile::tempdir().expect("temp home"),
            cwd: tempfile::tempdir().expect("temp cwd"),
        }
    }

    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut cmd = support::keygate();
        cmd.args(args)
            .current_dir(self.cwd.path())
            .env("HOME", self.home.path())
            .env_remove("KEYGATE_CONFIG")
            .env_remove("KEYGATE_STATE_DIR");
        support::run(cmd, stdin)
    }

    fn hook(&self, event: &str, fixture: &str) -> Output {
        let text = self.fixture(fixture);
        self.run(&["hook", "claude-code", event], text.as_bytes())
    }

    fn fixture(&self, name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/claude_code")
            .join(name);
        let text = std::fs::read_to_string(&path).expect("fixture");
        text.replace("{{HOME}}", &self.home.path().to_string_lossy())
            .replace("{{CWD}}", &self.cwd.path().to_string_lossy())
            .replace("{{OPENAI_KEY}}", &openai_key())
            .replace("{{GITHUB_TOKEN}}", &format!("ghp_{}", fake(36)))
            .replace("{{AWS_ID}}", &format!("AKIA{}", "Q4TZ7WXR2MNB5KLP"))
            .replace(
                "{{SLACK_TOKEN}}",
                &format!("xoxb-{}-{}", "2468013579", fake(24)),
            )
    }
}

fn fake(len: usize) -> String {
    "Zk4rT9wQ2mXb7Lp3".chars().cycle().take(len).collect()
}

fn openai_key() -> String {
    format!("sk-proj-{}", fake(48))
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?} / stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn assert_denied(out: &Output, reason_has: &str) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = stdout_json(out);
    let specific = &v["hookSpecificOutput"];
    assert_eq!(specific["hookEventName"], "PreToolUse");
    assert_eq!(specific["permissionDecision"], "deny");
    let reason = specific["permissionDecisionReason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains(reason_has), "{reason}");
    assert!(
        reason.contains("keygate base URL"),
        "the reason says what to do instead: {reason}"
    );
}

// --- PreToolUse -------------------------------------------------------------------------------

#[test]
fn pre_bash_reading_aws_credentials_is_denied() {
    let env = Env::new();
    assert_denied(
        &env.hook("pre-tool-use", "pre_tool_use_bash.json"),
        "AWS credentials",
    );
}

#[test]
fn pre_read_of_dotenv_is_denied() {
    let env = Env::new();
    assert_denied(
        &env.hook("pre-tool-use", "pre_tool_use_read.json"),
        "dotenv",
    );
}

#[test]
fn pre_write_with_a_key_in_its_content_is_denied() {
    let env = Env::new();
    let out = env.hook("pre-tool-use", "pre_tool_use_write.json");
    assert_denied(&out, "openai_key");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&openai_key()),
        "the reason never echoes the key"
    );
}

#[test]
fn pre_edit_inserting_a_key_is_denied() {
    let env = Env::new();
    assert_denied(
        &env.hook("pre-tool-use", "pre_tool_use_edit.json"),
        "openai_key",
    );
}

#[test]
fn pre_mcp_call_carrying_a_token_is_denied() {
    let env = Env::new();
    assert_denied(
        &env.hook("pre-tool-use", "pre_tool_use_mcp.json"),
        "github_token",
    );
}

#[test]
fn pre_harmless_calls_get_no_opinion() {
    let env = Env::new();
    let cwd = env.cwd.path().to_string_lossy().to_string();
    for (tool, input) in [
        (
            "Bash",
            serde_json::json!({"command": "cargo test", "description": "Run tests"}),
        ),
        (
            "Read",
            serde_json::json!({"file_path": format!("{cwd}/src/main.rs")}),
        ),
        (
            "Read",
            serde_json::json!({"file_path": format!("{cwd}/.env.example")}),
        ),
        (
            "mcp__github__list_issues",
            serde_json::json!({"owner": "acme", "repo": "app"}),
        ),
    ] {
        let event = serde_json::json!({
            "session_id": "s", "transcript_path": "/tmp/t.jsonl", "cwd": cwd,
            "permission_mode": "default", "hook_event_name": "PreToolUse",
            "tool_name": tool, "tool_input": input, "tool_use_id": "toolu_1"
        });
        let out = env.run(
            &["hook", "claude-code", "pre-tool-use"],
            event.to_string().as_bytes(),
        );
        assert_eq!(out.status.code(), Some(0), "{tool}");
        assert!(
            out.stdout.is_empty(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn pre_malformed_input_fails_closed_with_exit_2() {
    let env = Env::new();
    for input in [&b"not json"[..], b"{\"tool_name\":\"Bash\"}", b""] {
        let out = env.run(&["hook", "claude-code", "pre-tool-use"], input);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("blocked"));
    }
}

// --- PostToolUse ------------------------------------------------------------------------------

fn assert_redacted(out: &Output, label: &str, mcp: bool) -> Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v = stdout_json(out);
    assert_eq!(v["decision"], "block");
    assert!(v["reason"].as_str().unwrap_or_default().contains(label));
    let specific = &v["hookSpecificOutput"];
    assert_eq!(specific["hookEventName"], "PostToolUse");
    assert!(specific["additionalContext"].is_string());
    let updated = specific["updatedToolOutput"].clone();
    assert!(
        updated.to_string().contains(&format!("[REDACTED:{label}]")),
        "{updated}"
    );
    assert_eq!(specific.get("updatedMCPToolOutput").is_some(), mcp);
    for secret in [openai_key(), fake(36)] {
        assert!(
            !text.contains(&secret),
            "secret left in hook output: {text}"
        );
    }
    updated
}

#[test]
fn post_bash_output_with_a_key_is_replaced() {
    let env = Env::new();
    let updated = assert_redacted(
        &env.hook("post-tool-use", "post_tool_use_bash.json"),
        "openai_key",
        false,
    );
    // The replacement keeps the tool's own output shape.
    assert_eq!(updated["interrupted"], false);
    assert!(updated["stdout"]
        .as_str()
        .unwrap_or_default()
        .contains("OPENAI_API_KEY: [REDACTED:openai_key]"));
}

#[test]
fn post_read_output_with_an_aws_key_id_is_replaced() {
    let env = Env::new();
    let updated = assert_redacted(
        &env.hook("post-tool-use", "post_tool_use_read.json"),
        "aws_access_key_id",
        false,
    );
    assert_eq!(updated["file"]["numLines"], 2);
}

#[test]
fn post_edit_output_with_a_slack_token_is_replaced() {
    let env = Env::new();
    assert_redacted(
        &env.hook("post-tool-use", "post_tool_use_edit.json"),
        "slack_token",
        false,
    );
}

#[test]
fn post_mcp_output_is_replaced_in_both_fields() {
    let env = Env::new();
    let updated = assert_redacted(
        &env.hook("post-tool-use", "post_tool_use_mcp.json"),
        "openai_key",
        true,
    );
    assert!(updated.is_array());
}

#[test]
fn post_clean_write_output_gets_no_opinion() {
    let env = Env::new();
    let out = env.hook("post-tool-use", "post_tool_use_write.json");
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
}

#[test]
fn post_known_env_value_is_redacted_with_its_name() {
    let held = format!("held-{}", fake(20));
    let event = serde_json::json!({
        "session_id": "s", "transcript_path": "/tmp/t.jsonl", "cwd": "/tmp",
        "permission_mode": "default", "hook_event_name": "PostToolUse", "tool_name": "Bash",
        "tool_input": {"command": "cat out.log"},
        "tool_response": {"stdout": format!("value={held}\n"), "stderr": "", "interrupted": false, "isImage": false},
        "tool_use_id": "toolu_2"
    });
    let mut cmd = support::keygate();
    cmd.args([
        "hook",
        "claude-code",
        "post-tool-use",
        "--known-env",
        "MY_HELD_KEY",
    ])
    .env("MY_HELD_KEY", &held);
    let out = support::run(cmd, event.to_string().as_bytes());
    let v = stdout_json(&out);
    assert_eq!(
        v["hookSpecificOutput"]["updatedToolOutput"]["stdout"],
        "value=[REDACTED:MY_HELD_KEY]\n"
    );
}

// --- install ----------------------------------------------------------------------------------

#[test]
fn install_merges_into_project_settings_and_is_idempotent() {
    let env = Env::new();
    let dir = env.cwd.path().join(".claude");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let settings = dir.join("settings.json");
    std::fs::write(
        &settings,
        r#"{"permissions":{"allow":["Bash(cargo test)"]},"hooks":{"PreToolUse":[{"matcher":"Bash","hooks":[{"type":"command","command":"./lint.sh"}]}]}}"#,
    )
    .expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&settings, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let out = env.run(&["hook", "install", "claude-code", "--project"], b"");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = std::fs::read_to_string(&settings).expect("read");
    let out = env.run(&["hook", "install", "claude-code", "--project"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&settings).expect("read"),
        first,
        "second run changes nothing"
    );

    let v: Value = serde_json::from_str(&first).expect("valid JSON");
    assert_eq!(v["permissions"]["allow"][0], "Bash(cargo test)");
    let pre = v["hooks"]["PreToolUse"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(pre.len(), 2);
    assert_eq!(pre[0]["hooks"][0]["command"], "./lint.sh");
    let ours = pre[1]["hooks"][0]["command"].as_str().unwrap_or_default();
    assert!(ours.ends_with(" hook claude-code pre-tool-use"), "{ours}");
    assert!(Path::new(ours.split(' ').next().unwrap_or_default()).is_absolute());
    assert_eq!(v["hooks"]["PostToolUse"][0]["matcher"], "*");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&settings)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "file mode kept");
    }
}

#[test]
fn install_user_writes_home_settings() {
    let env = Env::new();
    let out = env.run(&["hook", "install", "claude-code", "--user"], b"");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text =
        std::fs::read_to_string(env.home.path().join(".claude/settings.json")).expect("created");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert!(v["hooks"]["PostToolUse"][0]["hooks"][0]["command"]
        .as_str()
        .unwrap_or_default()
        .ends_with("hook claude-code post-tool-use"));
}

#[test]
fn install_refuses_to_touch_invalid_settings() {
    let env = Env::new();
    let dir = env.cwd.path().join(".claude");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("settings.json"), "{ not json").expect("write");
    let out = env.run(&["hook", "install", "claude-code"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        std::fs::read_to_string(dir.join("settings.json")).expect("read"),
        "{ not json"
    );
}
