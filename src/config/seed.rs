//! The lab broker's JSON config (`broker.py`), accepted unchanged: same keys, same defaults, same
//! statuses. It becomes one route at `/` whose allow rules are `POST <path>` for each allowed
//! path, with the secret attached as a bearer token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::*;
use crate::authorize::Rule;
use crate::secret::{SecretSource, SecretSpec};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default = "default_host")]
    listen_host: String,
    #[serde(default = "default_port")]
    listen_port: u16,
    mode: Mode,
    upstream_base_url: String,
    allowed_paths: Vec<String>,
    client_token_env: Option<String>,
    #[serde(default)]
    secret_source: RawSource,
    #[serde(default = "default_max")]
    max_request_bytes: u64,
    #[serde(default = "default_timeout")]
    upstream_timeout_seconds: f64,
    #[serde(default)]
    extra_headers: BTreeMap<String, String>,
    #[serde(default = "default_event_log")]
    event_log: String,
    // keygate's own additions, all optional
    #[serde(default)]
    allow_non_loopback: bool,
    #[serde(default)]
    allowed_origins: Vec<String>,
    request_scan: Option<RequestScan>,
}

#[derive(Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum RawSource {
    #[default]
    None,
    Env {
        name: String,
    },
    Command {
        argv: Vec<String>,
        #[serde(default)]
        timeout_seconds: Option<f64>,
    },
    File {
        path: String,
    },
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    8791
}
fn default_max() -> u64 {
    262_144
}
fn default_timeout() -> f64 {
    30.0
}
fn default_event_log() -> String {
    "events.jsonl".into()
}

pub(super) fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: Raw = serde_json::from_str(text).map_err(|e| json_error(file, text, &e))?;
    let err = |key: &str, message: String| ConfigError {
        file: file.to_path_buf(),
        line: key_line(text, key),
        key: key.to_string(),
        message,
    };

    let ip: std::net::IpAddr = match raw.listen_host.as_str() {
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        h => h
            .parse()
            .map_err(|_| err("listen_host", format!("{h:?} is not an IP address")))?,
    };
    let listen = vec![Listen::Tcp((ip, raw.listen_port).into())];
    check_loopback(&listen, raw.allow_non_loopback).map_err(|m| err("listen_host", m))?;

    let upstream =
        parse_upstream(&raw.upstream_base_url).map_err(|m| err("upstream_base_url", m))?;
    if !(raw.upstream_timeout_seconds > 0.0 && raw.upstream_timeout_seconds <= 86_400.0) {
        return Err(err(
            "upstream_timeout_seconds",
            "must be a number of seconds between 0 and 86400".into(),
        ));
    }
    let timeout = Duration::from_secs_f64(raw.upstream_timeout_seconds);

    let mut allow = Vec::new();
    for p in &raw.allowed_paths {
        if !p.starts_with('/') {
            return Err(err("allowed_paths", format!("{p:?} must start with /")));
        }
        allow.push(Rule::exact("POST", p).map_err(|m| err("allowed_paths", m))?);
    }

    let source = match raw.secret_source {
        RawSource::None => SecretSource::None,
        RawSource::Env { name } if !name.is_empty() => SecretSource::Env { var: name },
        RawSource::Env { .. } => {
            return Err(err("secret_source", "env needs a non-empty name".into()))
        }
        RawSource::Command { argv, .. } if argv.is_empty() || argv[0].is_empty() => {
            return Err(err("argv", "secret command argv is missing".into()))
        }
        RawSource::Command {
            argv,
            timeout_seconds,
        } => SecretSource::Command {
            argv,
            timeout: Duration::from_secs_f64(timeout_seconds.unwrap_or(10.0).clamp(0.001, 3600.0)),
            // The lab format has no way to name variables; the tool's own prefix passes.
            env: Vec::new(),
        },
        RawSource::File { path } => SecretSource::File {
            path: expand_home(&path),
        },
    };
    let label = source.label();
    let has_secret = !source.is_none();

    let mut extra_headers = Vec::new();
    for (k, v) in &raw.extra_headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| err(k, format!("{k:?} is not a header name")))?;
        let value =
            HeaderValue::from_str(v).map_err(|_| err(k, "not a valid header value".into()))?;
        extra_headers.push((name, value));
    }

    let route = Route {
        name: "default".into(),
        prefix: "/".into(),
        upstream,
        secret: has_secret.then(|| "default".to_string()),
        inject: Inject::Bearer,
        allow,
        classification: "unclassified".into(),
        extra_headers,
        approval: Approval::Never,
        timeout,
        require_json: true,
        request_scan: raw.request_scan.unwrap_or(RequestScan::Refuse),
        max_response_time: None,
        budget_reserve: None,
        allow_range: false,
    };
    let agent = Agent {
        name: if raw.client_token_env.is_some() {
            "client".into()
        } else {
            "anonymous".into()
        },
        person: None,
        token_env: raw.client_token_env.clone(),
        open: raw.client_token_env.is_none(),
        routes: None,
        rate: None,
        budget: None,
        unix_uids: Vec::new(),
        budget_reserve: None,
    };

    Ok(Config {
        file: file.to_path_buf(),
        format: Format::Seed,
        listen,
        mode: raw.mode,
        audit_log: PathBuf::from(&raw.event_log),
        audit_chain: true,
        audit_fail_closed: true,
        state_dir: None,
        admin_socket: None,
        approval_notify: Vec::new(),
        max_request_bytes: raw.max_request_bytes,
        connect_timeout: Duration::from_secs(10).min(timeout),
        connections: Connections::default(),
        allowed_origins: raw.allowed_origins,
        secrets: vec![SecretSpec {
            name: "default".into(),
            source,
            ttl: None,
            lazy: false,
        }],
        routes: vec![route],
        agents: vec![agent],
        seed: Some(SeedInfo {
            listen_host: raw.listen_host,
            listen_port: raw.listen_port,
            upstream_base_url: raw.upstream_base_url,
            allowed_paths: raw.allowed_paths,
            client_auth: raw.client_token_env.is_some(),
            secret_source: label,
        }),
    })
}

/// serde_json reports a line and column; name the key written there (or the one it complains
/// about) so the message reads `file:line: key: ...` like the native format's.
fn json_error(file: &Path, text: &str, e: &serde_json::Error) -> ConfigError {
    let full = e.to_string();
    let message = match full.rfind(" at line ") {
        Some(i) => full[..i].to_string(),
        None => full.clone(),
    };
    let quoted = message.split('`').nth(1).map(str::to_string);
    let line_text = text.lines().nth(e.line().saturating_sub(1)).unwrap_or("");
    let key = match quoted {
        Some(k) if message.starts_with("unknown field") || message.starts_with("missing field") => {
            k
        }
        _ => line_text
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"')
            .to_string(),
    };
    let line = if message.starts_with("missing field") {
        1
    } else {
        e.line()
    };
    let key = if key.is_empty() || key.starts_with('{') {
        "(syntax)".to_string()
    } else {
        key
    };
    ConfigError {
        file: file.to_path_buf(),
        line,
        key,
        message,
    }
}

/// The line where `"key"` is first written, for errors found after parsing.
fn key_line(text: &str, key: &str) -> usize {
    let needle = format!("\"{key}\"");
    text.find(&needle).map(|o| line_of(text, o)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(Path::new("b.json"), text)
    }

    const DRY_RUN: &str = r#"{
  "listen_host": "127.0.0.1",
  "listen_port": 8791,
  "mode": "dry_run",
  "upstream_base_url": "https://api.openai.example",
  "allowed_paths": ["/v1/chat/completions", "/v1/responses"],
  "secret_source": {"kind": "none"},
  "max_request_bytes": 262144,
  "upstream_timeout_seconds": 30
}"#;

    #[test]
    fn lab_dry_run_config_becomes_one_open_route_at_root() {
        let c = load(DRY_RUN).unwrap();
        assert_eq!(c.mode, Mode::DryRun);
        assert_eq!(c.routes[0].prefix, "/");
        assert!(c.routes[0].secret.is_none());
        assert!(c.agents[0].open);
        assert_eq!(c.seed.as_ref().unwrap().secret_source, "none");
        assert_eq!(c.audit_log, PathBuf::from("events.jsonl"));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = load(&DRY_RUN.replace("\"listen_port\"", "\"listen_prot\"")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (3, "listen_prot"), "{e}");
        assert!(
            e.to_string()
                .starts_with("b.json:3: listen_prot: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_the_key_on_that_line() {
        let e = load(&DRY_RUN.replace("8791", "\"8791\"")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (3, "listen_port"), "{e}");
    }

    #[test]
    fn command_source_label_is_the_first_two_words() {
        let c = load(&DRY_RUN.replace(
            r#"{"kind": "none"}"#,
            r#"{"kind": "command", "argv": ["op", "read", "op://x/y"]}"#,
        ))
        .unwrap();
        assert_eq!(c.seed.unwrap().secret_source, "command:op read");
    }

    #[test]
    fn public_bind_is_refused() {
        let e = load(&DRY_RUN.replace("\"127.0.0.1\"", "\"0.0.0.0\"")).unwrap_err();
        assert_eq!(e.key, "listen_host", "{e}");
    }
}
