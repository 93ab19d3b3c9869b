//! The native TOML format (`keygate.toml`). Raw serde types stay here, at the edge; values that
//! are checked after parsing are `Spanned` so an error can name the line they were written on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use toml::Spanned;

use super::*;
use crate::authorize::{Rate, Rule};
use crate::secret::BaoToken;
use crate::secret::{SecretSource, SecretSpec};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<Spanned<Vec<String>>>,
    allow_non_loopback: Option<bool>,
    mode: Option<Mode>,
    audit_log: Option<String>,
    audit_chain: Option<bool>,
    audit_fail_closed: Option<bool>,
    state_dir: Option<String>,
    admin_socket: Option<String>,
    max_request_bytes: Option<u64>,
    upstream_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    allowed_origins: Option<Vec<String>>,
    request_scan: Option<RequestScan>,
    approval_notify: Option<Spanned<Vec<String>>>,
    connections: Option<RawConnections>,
    #[serde(default)]
    secrets: BTreeMap<String, RawSecret>,
    #[serde(default)]
    routes: BTreeMap<String, RawRoute>,
    #[serde(default)]
    agents: BTreeMap<String, RawAgent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnections {
    first_request_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_per_listener: Option<Spanned<usize>>,
    request_body_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    source: Spanned<String>,
    name: Option<String>,
    path: Option<String>,
    argv: Option<Vec<String>>,
    timeout: Option<Spanned<String>>,
    ttl: Option<Spanned<String>>,
    /// `startup` (default) or `first-use`.
    fetch: Option<Spanned<String>>,
    /// Environment variables passed to a `command` source (its environment is otherwise cleared).
    env: Option<Vec<String>>,
    // openbao
    address: Option<String>,
    token_env: Option<String>,
    token_file: Option<String>,
    mount: Option<String>,
    field: Option<String>,
    // aws-secrets-manager
    secret_id: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: Spanned<String>,
    upstream: Spanned<String>,
    secret: Option<Spanned<String>>,
    inject: Option<Spanned<String>>,
    inject_format: Option<String>,
    basic_username: Option<String>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    classification: Option<String>,
    #[serde(default)]
    extra_headers: BTreeMap<String, Spanned<String>>,
    approval: Option<Spanned<String>>,
    approval_timeout: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    require_json: Option<bool>,
    request_scan: Option<RequestScan>,
    max_response_time: Option<Spanned<String>>,
    budget_reserve: Option<u64>,
    allow_range: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    person: Option<String>,
    token_env: Option<String>,
    routes: Option<Spanned<Vec<String>>>,
    rate: Option<Spanned<String>>,
    budget_tokens: Option<Spanned<RawBudget>>,
    #[serde(default)]
    unix_uids: Vec<u32>,
    budget_reserve: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    per: String,
    limit: u64,
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: self.file.to_path_buf(),
            line: line_of(self.text, span.start),
            key: key.to_string(),
            message: message.into(),
        })
    }

    /// The line of a table header such as `[routes.openai]`, for errors about a missing key.
    fn table_line(&self, header: &str) -> usize {
        let needle = format!("[{header}]");
        self.text
            .find(&needle)
            .map(|o| line_of(self.text, o))
            .unwrap_or(0)
    }

    fn missing<T>(&self, table: &str, key: &str, message: &str) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: self.file.to_path_buf(),
            line: self.table_line(table),
            key: format!("{table}.{key}"),
            message: message.to_string(),
        })
    }

    fn duration(&self, v: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
        let d = parse_duration(v.get_ref()).or_else(|m| self.err(v.span(), key, m))?;
        if d.is_zero() {
            return self.err(v.span(), key, "must be longer than 0s");
        }
        Ok(d)
    }
}

pub(super) fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: Raw = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
    let cx = Ctx { file, text };

    let listen_raw = raw
        .listen
        .as_ref()
        .map(|l| l.get_ref().clone())
        .unwrap_or_else(|| vec!["127.0.0.1:8791".into()]);
    let span = raw.listen.as_ref().map(|l| l.span()).unwrap_or(0..0);
    let mut listen = Vec::new();
    for l in &listen_raw {
        listen.push(parse_listen(l).or_else(|m| cx.err(span.clone(), "listen", m))?);
    }
    if listen.is_empty() {
        return cx.err(span, "listen", "at least one listener is needed");
    }
    check_loopback(&listen, raw.allow_non_loopback.unwrap_or(false))
        .or_else(|m| cx.err(span.clone(), "listen", m))?;

    let mut secrets = Vec::new();
    for (name, s) in &raw.secrets {
        secrets.push(secret(&cx, name, s)?);
    }

    let upstream_timeout = match &raw.upstream_timeout {
        Some(v) => cx.duration(v, "upstream_timeout")?,
        None => Duration::from_secs(30),
    };
    let connect_timeout = match &raw.connect_timeout {
        Some(v) => cx.duration(v, "connect_timeout")?,
        None => Duration::from_secs(10),
    };

    let connections = match &raw.connections {
        Some(c) => connections(&cx, c)?,
        None => Connections::default(),
    };

    let mut routes = Vec::new();
    for (name, r) in &raw.routes {
        let scan = raw.request_scan.unwrap_or(RequestScan::Refuse);
        routes.push(route(&cx, name, r, &secrets, upstream_timeout, scan)?);
    }
    for (i, a) in routes.iter().enumerate() {
        if let Some(b) = routes[..i].iter().find(|b| b.prefix == a.prefix) {
            let span = raw.routes[&a.name].prefix.span();
            return cx.err(
                span,
                &format!("routes.{}.prefix", a.name),
                format!("prefix {} is already used by route {}", a.prefix, b.name),
            );
        }
    }

    let mut agents = Vec::new();
    for (name, a) in &raw.agents {
        agents.push(agent(&cx, name, a, &routes)?);
    }

    let state_dir = raw.state_dir.as_deref().map(expand_home);
    let approval_notify = match &raw.approval_notify {
        Some(argv) if argv.get_ref().first().is_none_or(|p| p.is_empty()) => {
            return cx.err(
                argv.span(),
                "approval_notify",
                "write the command as [\"program\", \"arg\", ...]; it runs without a shell",
            )
        }
        Some(argv) => argv.get_ref().clone(),
        None => Vec::new(),
    };
    Ok(Config {
        file: file.to_path_buf(),
        format: Format::Native,
        listen,
        mode: raw.mode.unwrap_or(Mode::Proxy),
        audit_log: raw
            .audit_log
            .as_deref()
            .map(expand_home)
            .unwrap_or_else(|| PathBuf::from("events.jsonl")),
        audit_chain: raw.audit_chain.unwrap_or(true),
        audit_fail_closed: raw.audit_fail_closed.unwrap_or(true),
        state_dir,
        admin_socket: raw.admin_socket.as_deref().map(expand_home),
        approval_notify,
        max_request_bytes: raw.max_request_bytes.unwrap_or(262_144),
        connect_timeout,
        connections,
        allowed_origins: raw.allowed_origins.unwrap_or_default(),
        secrets,
        routes,
        agents,
        seed: None,
    })
}

fn connections(cx: &Ctx, c: &RawConnections) -> Result<Connections, ConfigError> {
    let d = Connections::default();
    let dur = |v: &Option<Spanned<String>>, k: &str, default: Duration| match v {
        Some(v) => cx.duration(v, &format!("connections.{k}")),
        None => Ok(default),
    };
    let max_per_listener = match &c.max_per_listener {
        Some(m) if *m.get_ref() == 0 => {
            return cx.err(
                m.span(),
                "connections.max_per_listener",
                "must be at least 1",
            )
        }
        Some(m) => *m.get_ref(),
        None => d.max_per_listener,
    };
    Ok(Connections {
        first_request_timeout: dur(
            &c.first_request_timeout,
            "first_request_timeout",
            d.first_request_timeout,
        )?,
        idle_timeout: dur(&c.idle_timeout, "idle_timeout", d.idle_timeout)?,
        max_per_listener,
        request_body_timeout: dur(
            &c.request_body_timeout,
            "request_body_timeout",
            d.request_body_timeout,
        )?,
    })
}

fn secret(cx: &Ctx, name: &str, s: &RawSecret) -> Result<SecretSpec, ConfigError> {
    let table = format!("secrets.{name}");
    let key = |k: &str| format!("{table}.{k}");
    let need = |v: &Option<String>, k: &str| -> Result<String, ConfigError> {
        match v {
            Some(v) if !v.is_empty() => Ok(v.clone()),
            _ => cx.missing(
                &table,
                k,
                &format!("source {} needs {k}", s.source.get_ref()),
            ),
        }
    };
    let source = match s.source.get_ref().as_str() {
        "none" => SecretSource::None,
        "env" => SecretSource::Env { var: need(&s.name, "name")? },
        "file" => SecretSource::File { path: expand_home(&need(&s.path, "path")?) },
        "command" => {
            let argv = s.argv.clone().unwrap_or_default();
            if argv.is_empty() || argv[0].is_empty() {
                return cx.missing(&table, "argv", "source command needs argv = [\"program\", \"arg\", ...]");
            }
            let timeout = match &s.timeout {
                Some(t) => cx.duration(t, &key("timeout"))?,
                None => Duration::from_secs(10),
            };
            let env = s.env.clone().unwrap_or_default();
            if let Some(bad) = env.iter().find(|v| v.is_empty() || v.contains('=')) {
                return cx.missing(&table, "env", &format!("{bad:?} is not an environment variable name"));
            }
            SecretSource::Command { argv, timeout, env }
        }
        "openbao" | "vault" => {
            let token = match (&s.token_env, &s.token_file) {
                (Some(e), None) => BaoToken::Env(e.clone()),
                (None, Some(f)) => BaoToken::File(expand_home(f)),
                _ => return cx.missing(&table, "token_env", "openbao needs exactly one of token_env or token_file"),
            };
            SecretSource::OpenBao {
                address: need(&s.address, "address")?,
                token,
                mount: s.mount.clone().unwrap_or_else(|| "secret".into()),
                path: need(&s.path, "path")?,
                field: need(&s.field, "field")?,
            }
        }
        "aws-secrets-manager" => SecretSource::AwsSecretsManager {
            secret_id: need(&s.secret_id, "secret_id")?,
            region: need(&s.region, "region")?,
            endpoint: s.endpoint.clone(),
            field: s.field.clone(),
        },
        "oauth2-client-credentials" | "github-app" => {
            return cx.err(s.source.span(), &key("source"), format!("source {} is not supported by this build yet", s.source.get_ref()))
        }
        other => {
            return cx.err(
                s.source.span(),
                &key("source"),
                format!("unknown source {other:?}; use env, file, command, openbao, aws-secrets-manager or none"),
            )
        }
    };
    let ttl = match &s.ttl {
        Some(t) => Some(cx.duration(t, &key("ttl"))?),
        None => None,
    };
    let lazy = match &s.fetch {
        None => false,
        Some(f) => match f.get_ref().as_str() {
            "startup" => false,
            "first-use" => true,
            other => {
                return cx.err(
                    f.span(),
                    &key("fetch"),
                    format!("unknown fetch {other:?}; use startup or first-use"),
                )
            }
        },
    };
    Ok(SecretSpec {
        name: name.to_string(),
        source,
        ttl,
        lazy,
    })
}

fn route(
    cx: &Ctx,
    name: &str,
    r: &RawRoute,
    secrets: &[SecretSpec],
    default_timeout: Duration,
    default_scan: RequestScan,
) -> Result<Route, ConfigError> {
    let key = |k: &str| format!("routes.{name}.{k}");
    let prefix = r.prefix.get_ref().trim_end_matches('/').to_string();
    let prefix = if prefix.is_empty() {
        "/".to_string()
    } else {
        prefix
    };
    let plain = prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._~-".contains(&b));
    if !prefix.starts_with('/') || !plain || crate::route::check_path(&prefix).is_err() {
        return cx.err(
            r.prefix.span(),
            &key("prefix"),
            "prefix must be a plain path such as /openai (letters, digits, / . _ ~ -)",
        );
    }
    let upstream = parse_upstream(r.upstream.get_ref())
        .or_else(|m| cx.err(r.upstream.span(), &key("upstream"), m))?;
    let secret = match &r.secret {
        Some(s) => {
            if !secrets.iter().any(|x| &x.name == s.get_ref()) {
                return cx.err(
                    s.span(),
                    &key("secret"),
                    format!("no [secrets.{}] is defined", s.get_ref()),
                );
            }
            Some(s.get_ref().clone())
        }
        None => None,
    };
    let inject = match &r.inject {
        Some(i) => parse_inject(
            i.get_ref(),
            r.inject_format.clone(),
            r.basic_username.clone(),
        )
        .or_else(|m| cx.err(i.span(), &key("inject"), m))?,
        None => Inject::Bearer,
    };
    let mut allow = Vec::new();
    for rule in &r.allow {
        allow.push(Rule::parse(rule.get_ref()).or_else(|m| cx.err(rule.span(), &key("allow"), m))?);
    }
    let mut extra_headers = Vec::new();
    for (k, v) in &r.extra_headers {
        let lower = k.to_ascii_lowercase();
        let injected = match &inject {
            Inject::Header { name, .. } => name.as_str() == lower,
            Inject::Bearer | Inject::Basic { .. } => lower == "authorization",
            Inject::Query { .. } => false,
        };
        let reserved = [
            "authorization",
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
        ]
        .contains(&lower.as_str())
            || crate::authenticate::CALLER_CREDENTIAL_HEADERS.contains(&lower.as_str());
        if injected || reserved {
            return cx.err(
                v.span(),
                &key("extra_headers"),
                format!("{k} is set by keygate (credential or framing) and cannot be overridden"),
            );
        }
        let hn = HeaderName::from_bytes(k.as_bytes()).or_else(|_| {
            cx.err(
                v.span(),
                &key("extra_headers"),
                format!("{k:?} is not a header name"),
            )
        })?;
        let hv = HeaderValue::from_str(v.get_ref()).or_else(|_| {
            cx.err(
                v.span(),
                &key("extra_headers"),
                format!("value of {k} is not a valid header value"),
            )
        })?;
        extra_headers.push((hn, hv));
    }
    let approval = match &r.approval {
        None => Approval::Never,
        Some(a) if a.get_ref() == "never" => Approval::Never,
        Some(a) if a.get_ref() == "each" || a.get_ref() == "once-per-token" => {
            let timeout = match &r.approval_timeout {
                Some(t) => cx.duration(t, &key("approval_timeout"))?,
                None => Duration::from_secs(120),
            };
            if a.get_ref() == "each" {
                Approval::Each { timeout }
            } else {
                Approval::OncePerToken { timeout }
            }
        }
        Some(a) => {
            return cx.err(
                a.span(),
                &key("approval"),
                "approval must be \"each\", \"once-per-token\" or \"never\"",
            )
        }
    };
    let timeout = match &r.timeout {
        Some(t) => cx.duration(t, &key("timeout"))?,
        None => default_timeout,
    };
    let max_response_time = match &r.max_response_time {
        Some(t) => Some(cx.duration(t, &key("max_response_time"))?),
        None => None,
    };
    Ok(Route {
        max_response_time,
        name: name.to_string(),
        prefix,
        upstream,
        secret,
        inject,
        allow,
        classification: r
            .classification
            .clone()
            .unwrap_or_else(|| "unclassified".into()),
        extra_headers,
        approval,
        timeout,
        require_json: r.require_json.unwrap_or(false),
        request_scan: r.request_scan.unwrap_or(default_scan),
        budget_reserve: r.budget_reserve,
        allow_range: r.allow_range.unwrap_or(false),
    })
}

fn agent(cx: &Ctx, name: &str, a: &RawAgent, routes: &[Route]) -> Result<Agent, ConfigError> {
    let key = |k: &str| format!("agents.{name}.{k}");
    let agent_routes = match &a.routes {
        Some(list) => {
            for r in list.get_ref() {
                if !routes.iter().any(|x| &x.name == r) {
                    return cx.err(
                        list.span(),
                        &key("routes"),
                        format!("no [routes.{r}] is defined"),
                    );
                }
            }
            Some(list.get_ref().clone())
        }
        None => None,
    };
    let rate = match &a.rate {
        Some(r) => Some(Rate::parse(r.get_ref()).or_else(|m| cx.err(r.span(), &key("rate"), m))?),
        None => None,
    };
    let budget = match &a.budget_tokens {
        Some(b) => {
            let per = match b.get_ref().per.as_str() {
                "minute" => Duration::from_secs(60),
                "hour" => Duration::from_secs(3600),
                "day" => Duration::from_secs(86_400),
                other => parse_duration(other)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or(())
                    .or_else(|_| {
                        cx.err(
                            b.span(),
                            &key("budget_tokens"),
                            "per must be minute, hour, day or a duration",
                        )
                    })?,
            };
            Some(Budget {
                limit: b.get_ref().limit,
                per,
            })
        }
        None => None,
    };
    if let (Some(r), None) = (&a.budget_reserve, &budget) {
        return cx.err(
            r.span(),
            &key("budget_reserve"),
            "budget_reserve applies to a token budget; set budget_tokens too",
        );
    }
    Ok(Agent {
        name: name.to_string(),
        person: a.person.clone(),
        token_env: a.token_env.clone(),
        open: false,
        routes: agent_routes,
        rate,
        budget,
        unix_uids: a.unix_uids.clone(),
        budget_reserve: a.budget_reserve.as_ref().map(|r| *r.get_ref()),
    })
}

/// Turns a toml error into `file:line: key: message`, naming the key written on that line.
fn toml_error(file: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let offset = e.span().map(|s| s.start).unwrap_or(0);
    let line = line_of(text, offset);
    let line_text = text.lines().nth(line.saturating_sub(1)).unwrap_or("");
    let key = match line_text.split_once('=') {
        Some((k, _)) => k.trim().trim_matches('"').to_string(),
        None => line_text.trim().to_string(),
    };
    ConfigError {
        file: file.to_path_buf(),
        line,
        key,
        message: e.message().trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(Path::new("k.toml"), text)
    }

    const DESIGN_EXAMPLE: &str = include_str!("../../examples/keygate.toml");

    #[test]
    fn the_design_example_is_valid() {
        let c = load(DESIGN_EXAMPLE).unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.secrets.len(), 4);
        assert_eq!(
            c.agents[0].routes.as_deref(),
            Some(&["openai".to_string(), "anthropic".to_string()][..])
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = load("mode = \"proxy\"\n\n[routes.a]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\nalow = []\n").unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        assert_eq!(e.key, "alow", "{e}");
        assert!(
            e.to_string().starts_with("k.toml:6: alow: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn bad_rule_names_the_route_key_and_line() {
        let e = load("[routes.a]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\nallow = [\n  \"POST /ok\",\n  \"FETCH\",\n]\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (6, "routes.a.allow"), "{e}");
    }

    #[test]
    fn route_referencing_a_missing_secret_is_an_error() {
        let e = load(
            "[routes.a]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\nsecret = \"nope\"\n",
        )
        .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (4, "routes.a.secret"), "{e}");
    }

    #[test]
    fn non_loopback_listen_needs_explicit_permission() {
        let e = load("listen = [\"0.0.0.0:8791\"]\n").unwrap_err();
        assert_eq!(e.key, "listen");
        assert!(load("listen = [\"0.0.0.0:8791\"]\nallow_non_loopback = true\n").is_ok());
    }

    #[test]
    fn missing_required_secret_field_points_at_its_table() {
        let e = load("\n[secrets.x]\nsource = \"env\"\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (2, "secrets.x.name"), "{e}");
    }

    #[test]
    fn bad_duration_says_how_to_write_one() {
        let e = load("[secrets.x]\nsource = \"command\"\nargv = [\"true\"]\nttl = \"soon\"\n")
            .unwrap_err();
        assert_eq!(e.key, "secrets.x.ttl");
        assert!(e.message.contains("30s"), "{e}");
    }

    #[test]
    fn policy_version_changes_with_policy() {
        let a = load("[routes.a]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\nallow = [\"POST /x\"]\n").unwrap();
        let b = load("[routes.a]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\nallow = [\"POST /y\"]\n").unwrap();
        assert_ne!(a.policy_version(), b.policy_version());
    }

    const ROUTE: &str = "[routes.a]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\n";

    #[test]
    fn values_that_would_silently_disable_a_control_are_refused() {
        for (extra, key) in [
            ("timeout = \"0s\"\n", "routes.a.timeout"),
            (
                "extra_headers = { Authorization = \"x\" }\n",
                "routes.a.extra_headers",
            ),
            (
                "extra_headers = { x-api-key = \"x\" }\n",
                "routes.a.extra_headers",
            ),
            ("allow = [\"GET /v1/a%20b\"]\n", "routes.a.allow"),
            ("prefix = \"/a:b\"\n", "routes.a.prefix"),
        ] {
            let text = if extra.starts_with("prefix") {
                ROUTE.replace("prefix = \"/a\"\n", extra)
            } else {
                format!("{ROUTE}{extra}")
            };
            let e = load(&text)
                .err()
                .unwrap_or_else(|| panic!("{extra} was accepted"));
            assert_eq!(e.key, key, "{e}");
        }
        let e = load(&format!(
            "{ROUTE}[agents.x]\nbudget_tokens = {{ per = \"0s\", limit = 5 }}\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "agents.x.budget_tokens", "{e}");
    }

    #[test]
    fn budget_reserve_is_read_for_routes_and_budgeted_agents_only() {
        let c = load(&format!(
            "{ROUTE}budget_reserve = 16\n[agents.x]\nbudget_tokens = {{ per = \"day\", limit = 5000 }}\nbudget_reserve = 512\n"
        ))
        .unwrap();
        assert_eq!(c.routes[0].budget_reserve, Some(16));
        assert_eq!(c.agents[0].budget_reserve, Some(512));
        let e = load(&format!("{ROUTE}[agents.x]\nbudget_reserve = 512\n")).unwrap_err();
        assert_eq!(e.key, "agents.x.budget_reserve", "{e}");
        assert_eq!(e.line, 5, "{e}");
    }
}
