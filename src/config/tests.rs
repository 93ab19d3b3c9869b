//! Mistakes in either format are refused by the same validation, naming `file:line: key`.

use std::path::Path;

use proptest::prelude::*;

use super::*;

const ROUTE: &str = "[routes.a]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\n";

/// A lab config with `extra` inserted as its fourth line.
fn lab(extra: &str) -> String {
    format!(
        "{{\n  \"mode\": \"dry_run\",\n  \"upstream_base_url\": \"https://api.example\",\n{extra}  \"allowed_paths\": [\"/v1/chat/completions\"]\n}}\n"
    )
}

fn load(file: &str, text: &str) -> Result<Config, ConfigError> {
    Config::from_text(Path::new(file), text)
}

#[test]
fn config_mistakes_in_either_format_name_file_line_and_key() {
    let route = |extra: &str| format!("{ROUTE}{extra}");
    let cases: Vec<(&str, String, usize, &str, &str)> = vec![
        // (file, text, line, key, part of the message)
        ("k.toml", route("alow = []\n"), 4, "alow", "unknown field"),
        (
            "k.toml",
            route("allow = [\"FETCH\"]\n"),
            4,
            "routes.a.allow",
            "not a rule",
        ),
        (
            "k.toml",
            route("secret = \"nope\"\n"),
            4,
            "routes.a.secret",
            "no [secrets.nope]",
        ),
        (
            "k.toml",
            route("inject = \"aws-sigv4\"\nregion = \"us-east-1\"\n"),
            4,
            "routes.a.inject",
            "needs region and service",
        ),
        (
            "k.toml",
            route("inject = \"aws-sigv4\"\nregion = \"us-east-1\"\nservice = \"s3\"\n"),
            4,
            "routes.a.inject",
            "aws-credentials",
        ),
        (
            "k.toml",
            route("inject = \"bearer\"\nservice = \"s3\"\n"),
            4,
            "routes.a.inject",
            "keys of inject",
        ),
        (
            "k.toml",
            route("timeout = \"0s\"\n"),
            4,
            "routes.a.timeout",
            "longer than 0s",
        ),
        (
            "k.toml",
            route("timeout = \"soon\"\n"),
            4,
            "routes.a.timeout",
            "30s",
        ),
        (
            "k.toml",
            route("extra_headers = { Authorization = \"x\" }\n"),
            4,
            "routes.a.extra_headers",
            "cannot be overridden",
        ),
        (
            "k.toml",
            route("extra_headers = { x-broker-token = \"x\" }\n"),
            4,
            "routes.a.extra_headers",
            "cannot be overridden",
        ),
        (
            "k.toml",
            route(
                "inject = \"header:x-goog-api-key\"\nextra_headers = { X-Goog-Api-Key = \"x\" }\n",
            ),
            5,
            "routes.a.extra_headers",
            "cannot be overridden",
        ),
        (
            "k.toml",
            route("extra_headers = { Transfer-Encoding = \"chunked\" }\n"),
            4,
            "routes.a.extra_headers",
            "cannot be overridden",
        ),
        (
            "k.toml",
            route("[routes.b]\nprefix = \"/a/\"\nupstream = \"http://127.0.0.1:1\"\n"),
            5,
            "routes.b.prefix",
            "already used by route a",
        ),
        (
            "k.toml",
            route("[agents.x]\nroutes = [\"a\", \"b\"]\n"),
            5,
            "agents.x.routes",
            "no [routes.b]",
        ),
        (
            "k.toml",
            route("[agents.x]\nbudget_tokens = { per = \"0s\", limit = 5 }\n"),
            5,
            "agents.x.budget_tokens",
            "per must be",
        ),
        (
            "k.toml",
            "\n[secrets.x]\nsource = \"env\"\n".into(),
            2,
            "secrets.x.name",
            "needs name",
        ),
        (
            "k.toml",
            "listen = [\"0.0.0.0:8791\"]\n".into(),
            1,
            "listen",
            "not a loopback",
        ),
        (
            "k.toml",
            "[connections]\nidle_timeout = \"0s\"\n".into(),
            2,
            "connections.idle_timeout",
            "longer than 0s",
        ),
        (
            "k.toml",
            "[connections]\nmax_per_listener = 0\n".into(),
            2,
            "connections.max_per_listener",
            "at least 1",
        ),
        (
            "k.toml",
            route("max_response_time = \"soon\"\n"),
            4,
            "routes.a.max_response_time",
            "30s",
        ),
        (
            "k.toml",
            "\n[secrets.x]\nsource = \"command\"\nargv = [\"true\"]\nenv = [\"A=1\"]\n".into(),
            2,
            "secrets.x.env",
            "not an environment variable name",
        ),
        (
            "k.toml",
            route("[agents.x]\nbudget_reserve = 512\n"),
            5,
            "agents.x.budget_reserve",
            "set budget_tokens too",
        ),
        (
            "k.toml",
            "\n[secrets.x]\nsource = \"env\"\nname = \"X\"\nfetch = \"later\"\n".into(),
            5,
            "secrets.x.fetch",
            "use startup or first-use",
        ),
        (
            "b.json",
            lab("  \"listen_prot\": 8791,\n"),
            4,
            "listen_prot",
            "unknown field",
        ),
        (
            "b.json",
            lab("  \"listen_port\": \"8791\",\n"),
            4,
            "listen_port",
            "invalid type",
        ),
        (
            "b.json",
            lab("").replace("\"dry_run\"", "\"yolo\""),
            2,
            "mode",
            "unknown variant",
        ),
        (
            "b.json",
            lab("").replace("  \"mode\": \"dry_run\",\n", ""),
            1,
            "mode",
            "missing field",
        ),
        (
            "b.json",
            lab("  \"extra_headers\": {\"Authorization\": \"Bearer x\"},\n"),
            4,
            "Authorization",
            "cannot be overridden",
        ),
        (
            "b.json",
            lab("  \"extra_headers\": {\n    \"x-api-key\": \"x\"},\n"),
            5,
            "x-api-key",
            "cannot be overridden",
        ),
        (
            "b.json",
            lab("  \"extra_headers\": {\"Host\": \"evil.example\"},\n"),
            4,
            "Host",
            "cannot be overridden",
        ),
        (
            "b.json",
            lab("  \"upstream_timeout_seconds\": 0,\n"),
            4,
            "upstream_timeout_seconds",
            "between 0 and 86400",
        ),
        (
            "b.json",
            lab("  \"listen_host\": \"0.0.0.0\",\n"),
            4,
            "listen_host",
            "not a loopback",
        ),
        (
            "b.json",
            lab("  \"listen_host\": \"example.com\",\n"),
            4,
            "listen_host",
            "not an IP address",
        ),
        (
            "b.json",
            lab("").replace("\"/v1/chat/completions\"", "\"v1/chat\""),
            4,
            "allowed_paths",
            "must start with /",
        ),
        (
            "b.json",
            lab("").replace("https://api.example", "https://u:p@api.example"),
            3,
            "upstream_base_url",
            "credentials in the URL",
        ),
        (
            "b.json",
            lab("  \"secret_source\": {\"kind\": \"env\", \"name\": \"\"},\n"),
            4,
            "secret_source.name",
            "needs name",
        ),
        (
            "b.json",
            lab("  \"secret_source\": {\"kind\": \"command\", \"argv\": []},\n"),
            4,
            "secret_source.argv",
            "needs argv",
        ),
        (
            "b.json",
            lab("  \"secret_source\": {\"kind\": \"vault\"},\n"),
            4,
            "secret_source.kind",
            "unknown variant",
        ),
        (
            "b.json",
            format!("{}x", lab("")),
            6,
            "(syntax)",
            "trailing characters",
        ),
    ];
    for (file, text, line, key, message) in cases {
        let e = load(file, &text)
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{text}"));
        assert_eq!((e.line, e.key.as_str()), (line, key), "{e}\n{text}");
        assert!(e.message.contains(message), "{e}\n{text}");
        assert!(
            e.to_string()
                .starts_with(&format!("{file}:{line}: {key}: ")),
            "{e}"
        );
    }
}

#[test]
fn ordinary_extra_headers_are_kept_in_either_format() {
    let c = load(
        "k.toml",
        &format!("{ROUTE}extra_headers = {{ OpenAI-Organization = \"org-1\" }}\n"),
    )
    .unwrap();
    assert_eq!(c.routes[0].extra_headers[0].0, "openai-organization");
    let c = load(
        "b.json",
        &lab("  \"extra_headers\": {\"OpenAI-Organization\": \"org-1\"},\n"),
    )
    .unwrap();
    assert_eq!(c.routes[0].extra_headers[0].0, "openai-organization");
}

#[test]
fn control_plane_keys_are_read_and_checked() {
    let c = load(
        "k.toml",
        &format!(
            "admin_socket = \"/tmp/kg-admin.sock\"\napproval_notify = [\"notify-send\", \"keygate\"]\n{ROUTE}approval = \"once-per-token\"\napproval_timeout = \"30s\"\n[agents.x]\nunix_uids = [1001]\n"
        ),
    )
    .unwrap();
    assert_eq!(
        c.admin_socket.as_deref(),
        Some(Path::new("/tmp/kg-admin.sock"))
    );
    assert_eq!(c.approval_notify, ["notify-send", "keygate"]);
    assert_eq!(
        c.routes[0].approval,
        Approval::OncePerToken {
            timeout: std::time::Duration::from_secs(30)
        }
    );
    assert_eq!(c.agents[0].unix_uids, [1001]);
    let e = load("k.toml", &format!("approval_notify = []\n{ROUTE}")).unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (1, "approval_notify"), "{e}");
    let e = load("k.toml", &format!("{ROUTE}approval = \"twice\"\n")).unwrap_err();
    assert!(e.message.contains("once-per-token"), "{e}");
}

#[test]
fn names_are_resolved_to_ids_into_the_sorted_routes() {
    let c = load(
        "k.toml",
        "[secrets.s]\nsource = \"none\"\n\
         [routes.a]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\n\
         [routes.b]\nprefix = \"/b/longer\"\nupstream = \"http://127.0.0.1:1\"\nsecret = \"s\"\n\
         [agents.x]\nroutes = [\"a\"]\n",
    )
    .unwrap();
    // /b/longer sorts first, so route a is id 1 and the agent's list must say so.
    assert_eq!(c.routes[0].name, "b");
    let ids = c.agents[0].routes.clone().unwrap();
    assert_eq!(c.routes[ids[0]].name, "a");
    assert_eq!(
        c.secret_of(&c.routes[0]).map(|s| s.name.as_str()),
        Some("s")
    );
    assert!(c.secret_of(&c.routes[1]).is_none());
    let policy = c.effective_policy();
    assert_eq!(policy["agents"][0]["routes"], serde_json::json!(["a"]));
    assert_eq!(policy["routes"][0]["secret"], "s");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    // Whatever the text, loading returns a config or a `file:line: key` error; it never panics.
    #[test]
    fn any_toml_text_loads_or_errors(text in "[\\[\\]a-z_.=\" {}:,0-9/\\n-]{0,200}") {
        if let Err(e) = load("f.toml", &text) {
            prop_assert!(e.to_string().starts_with("f.toml:"));
        }
    }

    #[test]
    fn any_json_text_loads_or_errors(text in "[\\[\\]a-z_\" {}:,0-9/\\n.-]{0,200}") {
        if let Err(e) = load("f.json", &text) {
            prop_assert!(e.to_string().starts_with("f.json:"));
        }
    }

    #[test]
    fn any_unicode_loads_or_errors(text in any::<String>(), json in any::<bool>()) {
        let file = if json { "f.json" } else { "f.toml" };
        let _ = load(file, &text);
    }

    // Closer to valid configs: a known-good lab config with one value replaced by arbitrary text.
    #[test]
    fn a_lab_config_with_any_value_loads_or_errors(v in "[^\"\\\\]{0,40}", which in 0usize..4) {
        let keys = ["listen_host", "upstream_base_url", "event_log", "mode"];
        let text = lab(&format!("  \"{}\": \"{v}\",\n", keys[which]));
        let text = if which == 3 { text.replacen("  \"mode\": \"dry_run\",\n", "", 1) } else { text };
        if let Err(e) = load("f.json", &text) {
            prop_assert!(e.to_string().starts_with("f.json:"));
        }
    }
}

#[test]
fn an_aws_sigv4_route_streams_only_for_s3() {
    for (service, whole) in [("s3", false), ("bedrock", true)] {
        let text = format!(
            "[secrets.aws]\nsource = \"aws-credentials\"\n{ROUTE}secret = \"aws\"\ninject = \"aws-sigv4\"\nregion = \"eu-west-1\"\nservice = \"{service}\"\n"
        );
        let c = load("k.toml", &text).unwrap();
        assert_eq!(c.routes[0].inject.needs_whole_body(), whole, "{service}");
    }
}

#[test]
fn placeholder_in_is_refused_on_a_signing_route_and_allowed_on_a_header_route() {
    let aws = "[secrets.aws]\nsource = \"aws-credentials\"\n";
    let sigv4 = format!(
        "{aws}{ROUTE}secret = \"aws\"\ninject = \"aws-sigv4\"\nregion = \"eu-west-1\"\nservice = \"s3\"\n"
    );
    for position in ["query", "body"] {
        let text = format!("{sigv4}placeholder_in = [\"{position}\"]\n");
        let e = load("k.toml", &text).unwrap_err().to_string();
        assert!(e.contains("routes.a.placeholder_in"), "{e}");
        assert!(e.contains("signs"), "{e}");
    }
    // Benign neighbours: a sigv4 route with a header placeholder only, a bearer route with both.
    load(
        "k.toml",
        &format!("{sigv4}placeholder_env = \"AWS_ACCESS_KEY_ID\"\n"),
    )
    .unwrap();
    let bearer = "[secrets.k]\nsource = \"env\"\nname = \"K\"\n";
    load(
        "k.toml",
        &format!("{bearer}{ROUTE}secret = \"k\"\nplaceholder_in = [\"query\", \"body\"]\n"),
    )
    .unwrap();
}
