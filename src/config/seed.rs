//! The lab broker's JSON config (`broker.py`), accepted unchanged: same keys, same defaults, same
//! statuses. It is lowered into the common [`Spec`] as one route at `/` whose allow rules are
//! `POST <path>` for each allowed path, with the secret attached as a bearer token; the same
//! validation as the native format's then applies (so an extra header cannot replace the key).
//!
//! The lab's backend companion (`backend-broker/server.py`, `server_config.*.json`) is the second
//! JSON format, told apart by its keys (`backend_token_env`, `secret_env`): one agent whose token
//! arrives in `X-Backend-Token`, a trusted front end that names the person in `X-User-Id`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;

use super::spec::{
    AgentSpec, At, Dur, ListenSpec, Pos, RouteSpec, RuleSpec, SecretSpecRaw, SeedSpec, Spec,
};
use super::*;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "LabBrokerConfig")]
struct Raw {
    #[serde(default = "default_host")]
    listen_host: String,
    #[serde(default = "default_port")]
    listen_port: u16,
    // Required, but optional here so a missing one is reported by name without reading
    // serde_json's message text.
    mode: Option<Mode>,
    upstream_base_url: Option<String>,
    allowed_paths: Option<Vec<String>>,
    client_token_env: Option<String>,
    #[serde(default)]
    secret_source: RawSource,
    max_request_bytes: Option<u64>,
    upstream_timeout_seconds: Option<f64>,
    #[serde(default)]
    extra_headers: BTreeMap<String, String>,
    event_log: Option<String>,
    // keygate's own additions, all optional
    #[serde(default)]
    allow_non_loopback: bool,
    #[serde(default)]
    allowed_origins: Vec<String>,
    request_scan: Option<RequestScan>,
}

#[derive(Deserialize, Default, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[schemars(rename = "LabSecretSource")]
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

/// The lab broker bounded a secret command to between a millisecond and an hour.
const COMMAND_SECONDS: (f64, f64) = (0.001, 3600.0);

/// The backend companion's config: the lab broker's listener and route keys, its own token and
/// secret variables.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "LabBackendConfig")]
struct RawBackend {
    #[serde(default = "default_host")]
    listen_host: String,
    #[serde(default = "default_port")]
    listen_port: u16,
    mode: Option<Mode>,
    upstream_base_url: Option<String>,
    allowed_paths: Option<Vec<String>>,
    backend_token_env: Option<String>,
    secret_env: Option<String>,
    max_request_bytes: Option<u64>,
    upstream_timeout_seconds: Option<f64>,
    event_log: Option<String>,
}

/// Keys only the backend companion's config has.
const BACKEND_KEYS: [&str; 2] = ["backend_token_env", "secret_env"];

/// The header the companion's front end names the person in.
pub(crate) const BACKEND_PERSON_HEADER: &str = "x-user-id";

/// The lab broker's and the backend companion's schemas, definitions in `generator`.
pub(super) fn schemas(
    generator: &mut schemars::SchemaGenerator,
) -> (schemars::Schema, schemars::Schema) {
    (
        generator.subschema_for::<Raw>(),
        generator.subschema_for::<RawBackend>(),
    )
}

pub(super) fn parse(file: &Path, text: &str) -> Result<Spec, ConfigError> {
    let is_backend = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
        .is_ok_and(|m| BACKEND_KEYS.iter().any(|k| m.contains_key(*k)));
    if is_backend {
        return parse_backend(file, text);
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let raw: Raw = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| json_error(file, &e.path().to_string(), e.inner()))?;
    // Trailing characters after the object are an error, as in serde_json::from_str.
    de.end().map_err(|e| json_error(file, "", &e))?;
    let at = |key: &str| Pos::new(key_line(text, key), key);
    let missing = |key: &str| ConfigError {
        file: file.to_path_buf(),
        line: 1,
        key: key.to_string(),
        message: format!("missing field `{key}`"),
    };
    let mode = raw.mode.ok_or_else(|| missing("mode"))?;
    let upstream_base_url = raw
        .upstream_base_url
        .ok_or_else(|| missing("upstream_base_url"))?;
    let allowed_paths = raw.allowed_paths.ok_or_else(|| missing("allowed_paths"))?;

    let secret_pos = at("secret_source");
    let mut secret = SecretSpecRaw {
        name: "default".into(),
        table: secret_pos.clone(),
        source: At::new(String::new(), secret_pos.child("kind")),
        ..Default::default()
    };
    secret.source.value = match raw.secret_source {
        RawSource::None => "none",
        RawSource::Env { name } => {
            secret.var = Some(name);
            "env"
        }
        RawSource::Command {
            argv,
            timeout_seconds,
        } => {
            secret.argv = Some(argv);
            secret.timeout = timeout_seconds.map(|t| {
                let t = t.clamp(COMMAND_SECONDS.0, COMMAND_SECONDS.1);
                At::new(Dur::Seconds(t), secret_pos.child("timeout_seconds"))
            });
            "command"
        }
        RawSource::File { path } => {
            secret.path = Some(path);
            "file"
        }
    }
    .into();
    let has_secret = secret.source.value != "none";

    let route = lab_route(
        At::new(upstream_base_url.clone(), at("upstream_base_url")),
        has_secret.then(|| At::new("default".into(), secret_pos.clone())),
        allowed_paths
            .iter()
            .map(|p| At::new(RuleSpec::ExactPost(p.clone()), at("allowed_paths")))
            .collect(),
        raw.extra_headers
            .iter()
            .map(|(k, v)| At::new((k.clone(), v.clone()), at(k)))
            .collect(),
    );
    let agent = AgentSpec {
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
        budget_reserve: None,
        unix_uids: Vec::new(),
        person_header: None,
        client_cert_subject: None,
        rate_per_person: None,
        budget_per_person: None,
    };

    Ok(Spec {
        format: Format::Seed,
        listen: At::new(
            Some(vec![ListenSpec::HostPort(
                raw.listen_host.clone(),
                raw.listen_port,
            )]),
            at("listen_host"),
        ),
        allow_non_loopback: raw.allow_non_loopback,
        allow_plaintext_non_loopback: false,
        tls: None,
        mode: Some(mode),
        audit_log: raw.event_log.map(PathBuf::from),
        audit_chain: None,
        audit_fail_closed: None,
        state_dir: None,
        admin_socket: None,
        state: None,
        instance: None,
        approval_notify: None,
        max_request_bytes: raw.max_request_bytes,
        upstream_timeout: raw
            .upstream_timeout_seconds
            .map(|t| At::new(Dur::Seconds(t), at("upstream_timeout_seconds"))),
        connect_timeout: None,
        allowed_origins: raw.allowed_origins,
        request_scan: raw.request_scan,
        connections: None,
        secrets: vec![secret],
        routes: vec![route],
        agents: vec![agent],
        seed: Some(SeedSpec {
            listen_host: raw.listen_host,
            listen_port: raw.listen_port,
            upstream_base_url,
            allowed_paths,
            client_auth: raw.client_token_env.is_some(),
            backend: None,
        }),
        run: Default::default(),
        healthz: None,
        proxy: Default::default(),
    })
}

/// The one route of a lab config (broker or backend companion): everything at `/` to the
/// upstream, exact POST paths, JSON bodies, with the lab's defaults for every native key.
fn lab_route(
    upstream: At<String>,
    secret: Option<At<String>>,
    allow: Vec<At<RuleSpec>>,
    extra_headers: Vec<At<(String, String)>>,
) -> RouteSpec {
    RouteSpec {
        name: "default".into(),
        prefix: At::new("/".into(), Pos::new(1, "prefix")),
        upstream,
        secret,
        inject: None,
        jit: None,
        inject_format: None,
        basic_username: None,
        allow,
        classification: None,
        extra_headers,
        approval: None,
        approval_timeout: None,
        timeout: None,
        require_json: Some(true),
        request_scan: None,
        allow_range: None,
        budget_reserve: None,
        max_response_time: None,
        github_scope: None,
        query: None,
        placeholder_env: None,
        placeholder_in: None,
        region: None,
        service: None,
        env: Vec::new(),
        proxy: Default::default(),
    }
}

/// The backend companion's config, lowered as the lab broker's is, with one agent: the front
/// end holding `backend_token_env`'s token, which names the person in `X-User-Id`.
fn parse_backend(file: &Path, text: &str) -> Result<Spec, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let raw: RawBackend = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| json_error(file, &e.path().to_string(), e.inner()))?;
    de.end().map_err(|e| json_error(file, "", &e))?;
    let at = |key: &str| Pos::new(key_line(text, key), key);
    let missing = |key: &str| ConfigError {
        file: file.to_path_buf(),
        line: 1,
        key: key.to_string(),
        message: format!("missing field `{key}`"),
    };
    let mode = raw.mode.ok_or_else(|| missing("mode"))?;
    let upstream_base_url = raw
        .upstream_base_url
        .ok_or_else(|| missing("upstream_base_url"))?;
    let allowed_paths = raw.allowed_paths.ok_or_else(|| missing("allowed_paths"))?;
    // The companion serves many people behind one front end: without its token anyone who
    // reaches the port could name any person.
    let token_env = raw
        .backend_token_env
        .ok_or_else(|| missing("backend_token_env"))?;

    let secret_pos = at("secret_env");
    let secret = SecretSpecRaw {
        name: "default".into(),
        table: secret_pos.clone(),
        source: At::new(
            if raw.secret_env.is_some() {
                "env"
            } else {
                "none"
            }
            .into(),
            secret_pos.clone(),
        ),
        var: raw.secret_env.clone(),
        ..Default::default()
    };
    let route = lab_route(
        At::new(upstream_base_url.clone(), at("upstream_base_url")),
        raw.secret_env
            .is_some()
            .then(|| At::new("default".into(), secret_pos.clone())),
        allowed_paths
            .iter()
            .map(|p| At::new(RuleSpec::ExactPost(p.clone()), at("allowed_paths")))
            .collect(),
        Vec::new(),
    );
    let agent = AgentSpec {
        name: "backend".into(),
        person: None,
        token_env: Some(token_env),
        open: false,
        routes: None,
        rate: None,
        budget: None,
        budget_reserve: None,
        unix_uids: Vec::new(),
        person_header: Some(At::new(
            BACKEND_PERSON_HEADER.into(),
            at("backend_token_env"),
        )),
        client_cert_subject: None,
        rate_per_person: None,
        budget_per_person: None,
    };
    Ok(Spec {
        format: Format::Seed,
        listen: At::new(
            Some(vec![ListenSpec::HostPort(
                raw.listen_host.clone(),
                raw.listen_port,
            )]),
            at("listen_host"),
        ),
        allow_non_loopback: false,
        allow_plaintext_non_loopback: false,
        tls: None,
        mode: Some(mode),
        audit_log: raw.event_log.map(PathBuf::from),
        audit_chain: None,
        audit_fail_closed: None,
        state_dir: None,
        admin_socket: None,
        approval_notify: None,
        max_request_bytes: raw.max_request_bytes,
        upstream_timeout: raw
            .upstream_timeout_seconds
            .map(|t| At::new(Dur::Seconds(t), at("upstream_timeout_seconds"))),
        connect_timeout: None,
        allowed_origins: Vec::new(),
        request_scan: None,
        connections: None,
        secrets: vec![secret],
        routes: vec![route],
        agents: vec![agent],
        seed: Some(SeedSpec {
            listen_host: raw.listen_host,
            listen_port: raw.listen_port,
            upstream_base_url,
            allowed_paths,
            client_auth: true,
            backend: Some(super::spec::BackendSpec {
                secret_env: raw.secret_env,
            }),
        }),
        run: Default::default(),
        healthz: None,
        proxy: Default::default(),
        state: None,
        instance: None,
    })
}

/// `file:line: key: message`: the key is the path serde was at (`listen_port`,
/// `secret_source.kind`), the line serde_json's.
fn json_error(file: &Path, path: &str, e: &serde_json::Error) -> ConfigError {
    // serde_path_to_error writes `?` where it does not know the key (a syntax error).
    let key = if path.is_empty() || path == "." || path == "?" {
        "(syntax)"
    } else {
        path
    };
    ConfigError {
        file: file.to_path_buf(),
        line: e.line().max(1),
        key: key.to_string(),
        message: message_of(e),
    }
}

/// serde_json's message without its ` at line L column C` suffix, which `file:line` replaces.
fn message_of(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    full.strip_suffix(&suffix).unwrap_or(&full).to_string()
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

    const COMPANION: &str = include_str!("../../tests/fixtures/backend/server_config.dry-run.json");

    #[test]
    fn companion_config_is_told_apart_by_its_keys_and_has_one_front_end() {
        let c = load(COMPANION).unwrap();
        let a = &c.agents[0];
        assert_eq!(a.token_env.as_deref(), Some("BACKEND_TOKEN"));
        assert_eq!(
            a.person_header.as_ref().map(|h| h.as_str()),
            Some("x-user-id")
        );
        assert!(!a.open);
        let seed = c.seed.unwrap();
        assert_eq!(seed.backend, Some(Some("OPENAI_API_KEY".into())));
        assert_eq!(seed.secret_source, "env:OPENAI_API_KEY");
    }

    #[test]
    fn companion_config_names_a_wrong_key_and_needs_its_token() {
        let e = load(&COMPANION.replace("\"secret_env\"", "\"secret_envv\"")).unwrap_err();
        assert_eq!(e.key, "secret_envv", "{e}");
        let e =
            load(&COMPANION.replace("\"backend_token_env\": \"BACKEND_TOKEN\",", "")).unwrap_err();
        assert_eq!(e.key, "backend_token_env", "{e}");
    }

    #[test]
    fn public_bind_is_refused() {
        let e = load(&DRY_RUN.replace("\"127.0.0.1\"", "\"0.0.0.0\"")).unwrap_err();
        assert_eq!(e.key, "listen_host", "{e}");
    }
}
