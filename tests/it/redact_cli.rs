//! `keygate redact` end to end: the filter, `--check` on a tree of real-looking leaks, and
//! `--check` on this repository, which must come out clean.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support;

use base64::Engine as _;

fn keygate(args: &[&str], stdin: &[u8], envs: &[(&str, &str)]) -> Output {
    let mut cmd = support::keygate();
    cmd.args(args).envs(envs.iter().copied());
    support::run(cmd, stdin)
}

fn fake(len: usize, salt: u8) -> String {
    "Hq7Vz2Kp9Xw4Rt6Mb3Nc8Ld5Jf1Gs0Ya"
        .bytes()
        .cycle()
        .skip(usize::from(salt))
        .take(len)
        .map(char::from)
        .collect()
}

/// The value of each `{{NAME}}` placeholder in the leak fixtures.
fn placeholders() -> Vec<(&'static str, String)> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let dashes = "-".repeat(5);
    vec![
        ("OPENAI_KEY", format!("sk-proj-{}", fake(64, 1))),
        ("ANTHROPIC_KEY", format!("sk-ant-api03-{}AA", fake(93, 2))),
        ("STRIPE_KEY", format!("sk_live_{}", fake(24, 3))),
        ("GITHUB_TOKEN", format!("ghp_{}", fake(36, 4))),
        (
            "JWT",
            format!(
                "{}.{}.{}",
                b64.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
                b64.encode(r#"{"sub":"svc-deploy","exp":1893456000}"#),
                fake(86, 5)
            ),
        ),
        ("BEARER", fake(40, 6)),
        ("GOOGLE_KEY", format!("AIza{}", fake(35, 7))),
        ("SLACK_TOKEN", format!("xoxb-{}-{}-{}", "7219034856", "4401827365", fake(24, 8))),
        ("PASSWORD", "V8#kq2!Lz7$mWp4r".replace('$', "%")),
        ("AWS_ID", format!("AKIA{}", "R7XQ2ZK4WT9PLM3N")),
        ("AWS_SECRET", format!("{}/{}+{}", fake(14, 9), fake(12, 10), fake(12, 11))),
        (
            "PRIVATE_KEY",
            format!(
                "{dashes}BEGIN OPENSSH PRIVATE KEY{dashes}\n{}\n{}\n{dashes}END OPENSSH PRIVATE KEY{dashes}",
                fake(70, 12),
                fake(70, 13)
            ),
        ),
        ("BASIC", base64::engine::general_purpose::STANDARD.encode(format!("deploy:{}", fake(20, 14)))),
        ("KEYGATE_TOKEN", format!("kg_{}", fake(43, 15))),
    ]
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/leaks")
}

/// Renders every `*.tmpl` under the fixture tree into `to`, without the extension.
fn render(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("fixture dir").flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            render(&path, &to.join(&name));
        } else if let Some(stem) = name.strip_suffix(".tmpl") {
            let mut text = std::fs::read_to_string(&path).expect("template");
            for (key, value) in placeholders() {
                text = text.replace(&format!("{{{{{key}}}}}"), &value);
            }
            assert!(!text.contains("{{"), "unfilled placeholder in {name}");
            std::fs::create_dir_all(to).expect("mkdir");
            std::fs::write(to.join(stem), text).expect("write");
        }
    }
}

#[test]
fn check_finds_every_leak_in_the_fixture_tree_and_nothing_else() {
    let tmp = tempfile::tempdir().expect("tempdir");
    render(&fixtures(), tmp.path());
    let root = tmp.path().to_string_lossy().to_string();
    let out = keygate(&["redact", "--check", &root], b"", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: BTreeSet<String> = stdout
        .lines()
        .map(|l| {
            // path:line:col: label -> relative/path:line label
            let rel = l.strip_prefix(&format!("{root}/")).unwrap_or(l);
            let mut parts = rel.splitn(4, ':');
            let (path, line, _col, label) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default().trim(),
            );
            format!("{path}:{line} {label}")
        })
        .collect();
    let expected: BTreeSet<String> = std::fs::read_to_string(fixtures().join("expect.txt"))
        .expect("expect.txt")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    assert_eq!(found, expected);
    for (_, value) in placeholders() {
        assert!(!stdout.contains(&value), "--check printed a value");
    }
}

/// The repository's own source, tests and fixtures (`target` and `.git` are skipped by the
/// walk) contain no credential: detector patterns are regexes and test values are built at run
/// time. `KNOWN` lists the findings this test tolerates, each with its reason; anything else
/// fails it.
#[test]
fn check_on_this_repository_finds_nothing_unexpected() {
    const KNOWN: &[&str] = &[];
    let root = env!("CARGO_MANIFEST_DIR");
    let out = keygate(&["redact", "--check", root], b"", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let unexpected: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            let rel = l.strip_prefix(&format!("{root}/")).unwrap_or(l);
            let path = rel.split(':').next().unwrap_or_default();
            let label = rel.rsplit(": ").next().unwrap_or_default();
            // Fuzzer inputs are generated locally and ignored by git; they are random bytes.
            let fuzz_output =
                path.starts_with("fuzz/corpus/") || path.starts_with("fuzz/artifacts/");
            !fuzz_output && !KNOWN.contains(&format!("{path} {label}").as_str())
        })
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_reports_stdin_locations_with_line_and_column() {
    let input = format!("first line\n  token {} here\n", placeholders()[3].1);
    let out = keygate(&["redact", "--check"], input.as_bytes(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "-:2:9: github_token\n"
    );
}

#[test]
fn check_exits_0_on_clean_input_and_2_on_a_missing_file() {
    assert_eq!(
        keygate(&["redact", "--check"], b"nothing here\n", &[])
            .status
            .code(),
        Some(0)
    );
    let out = keygate(
        &["redact", "--check", "/nonexistent/keygate-test"],
        b"",
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn filter_replaces_credentials_and_keeps_everything_else() {
    let key = &placeholders()[0].1;
    let input = format!("a\u{e9}b {key}\nbinary\x00ok\n");
    let out = keygate(&["redact"], input.as_bytes(), &[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "a\u{e9}b [REDACTED:openai_key]\nbinary\x00ok\n"
    );
}

#[test]
fn known_env_values_are_redacted_under_their_variable_name() {
    let held = "not-a-known-format-but-held-7";
    let input = format!(
        "x={held} y={}\n",
        base64::engine::general_purpose::STANDARD.encode(held)
    );
    let out = keygate(
        &["redact", "--known-env", "HELD"],
        input.as_bytes(),
        &[("HELD", held)],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "x=[REDACTED:HELD] y=[REDACTED:HELD]\n"
    );
    let unset = keygate(
        &["redact", "--known-env", "KEYGATE_TEST_UNSET_VAR"],
        b"",
        &[],
    );
    assert_eq!(unset.status.code(), Some(2));
}

#[test]
fn json_escaped_spellings_of_a_held_value_are_redacted_and_found_by_check() {
    let held = "held/value+caf\u{e9}-0123456789";
    // PHP, .NET and Python's json.dumps each write it differently.
    let spellings = [
        r"held\/value+caf\u00e9-0123456789",
        r"held/value\u002Bcaf\u00E9-0123456789",
        r"held/value+caf\u00e9-0123456789",
    ];
    let input: String = spellings
        .iter()
        .map(|s| format!("{{\"error\":\"bad key {s}\"}}\n"))
        .collect();
    let out = keygate(
        &["redact", "--no-detectors", "--known-env", "HELD"],
        input.as_bytes(),
        &[("HELD", held)],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"error\":\"bad key [REDACTED:HELD]\"}\n".repeat(3)
    );
    let check = keygate(
        &["redact", "--check", "--no-detectors", "--known-env", "HELD"],
        input.as_bytes(),
        &[("HELD", held)],
    );
    assert_eq!(check.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&check.stdout).lines().count(), 3);
    // The benign neighbour: escaped JSON that holds no held value passes byte for byte.
    let plain = "{\"t\":\"caf\\u00e9 a\\/b \\u002B\"}\n";
    let out = keygate(
        &["redact", "--no-detectors", "--known-env", "HELD"],
        plain.as_bytes(),
        &[("HELD", held)],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), plain);
}

#[test]
fn large_input_streams_through_with_every_secret_redacted() {
    // 24 MiB with a secret straddling every 64 KiB read boundary region.
    let key = &placeholders()[3].1;
    let mut input = Vec::with_capacity(24 << 20);
    let filler = b"lorem ipsum dolor sit amet, consectetur adipiscing elit\n";
    let mut planted = 0;
    while input.len() < 24 << 20 {
        input.extend_from_slice(filler);
        if input.len() % (64 * 1024) < filler.len() + 30 {
            input.extend_from_slice(key.as_bytes());
            input.push(b'\n');
            planted += 1;
        }
    }
    let out = keygate(&["redact"], &input, &[]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(key.as_str()));
    assert_eq!(text.matches("[REDACTED:github_token]").count(), planted);
    assert_eq!(
        out.stdout.len(),
        input.len() - planted * (key.len() - "[REDACTED:github_token]".len())
    );
}

#[test]
fn config_secrets_are_fetched_and_redacted_by_key_id() {
    let dir = tempfile::tempdir().unwrap();
    let value = format!("held-{}-value", "from-config-0123456789");
    let config = dir.path().join("k.toml");
    std::fs::write(
        &config,
        format!("[secrets.cfg]\nsource = \"command\"\nargv = [\"printf\", \"{value}\"]\n"),
    )
    .unwrap();
    let input = format!("a {value} b\n");
    let out = keygate(
        &[
            "redact",
            "--no-detectors",
            "--config",
            config.to_str().unwrap(),
        ],
        input.as_bytes(),
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("a [REDACTED:cfg#") && !text.contains(&value),
        "{text}"
    );

    // A secret that cannot be fetched stops the filter: passing text through without it could
    // let that secret out.
    std::fs::write(
        &config,
        "[secrets.cfg]\nsource = \"command\"\nargv = [\"false\"]\n",
    )
    .unwrap();
    let out = keygate(&["redact", "--config", config.to_str().unwrap()], b"x", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}
