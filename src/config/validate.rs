//! The one validation pass: a [`Spec`] from either format in, a [`Config`] out. Defaults are
//! defined here once; names (agent → route → secret) are resolved to ids here, so nothing looks
//! a name up per request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::spec::{
    AgentSpec, At, ConnectionsSpec, Dur, ListenSpec, Pos, RouteSpec, RuleSpec, SecretSpecRaw, Spec,
    StateSpec,
};
use super::*;
use crate::authorize::rule::{Rate, Rule};
use crate::secret::openbao::Jit;
use crate::secret::{BaoToken, SecretSource, SecretSpec};

mod proxy;
mod tokens;

const DEFAULT_LISTEN: &str = "127.0.0.1:8791";
const DEFAULT_AUDIT_LOG: &str = "events.jsonl";
const DEFAULT_MAX_REQUEST_BYTES: u64 = 262_144;
const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(120);
const DEFAULT_REQUEST_SCAN: RequestScan = RequestScan::Refuse;
/// How long a keygate keeps serving from its view of tokens and freezes without reaching the
/// shared store.
const DEFAULT_MAX_STALE: Duration = Duration::from_secs(5);
/// The lab broker's `upstream_timeout_seconds` allowed at most a day.
const MAX_SECONDS: f64 = 86_400.0;

/// Headers keygate itself sets on the way out: the credential and the message framing.
const RESERVED_HEADERS: [&str; 5] = [
    "authorization",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
];

struct Cx<'a> {
    file: &'a Path,
}

impl Cx<'_> {
    fn err<T>(&self, pos: &Pos, message: impl Into<String>) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: self.file.to_path_buf(),
            line: pos.line,
            key: pos.key.clone(),
            message: message.into(),
        })
    }

    /// A duration that must be longer than zero.
    fn duration(&self, d: &At<Dur>) -> Result<Duration, ConfigError> {
        match &d.value {
            Dur::Text(t) => {
                let v = parse_duration(t).or_else(|m| self.err(&d.pos, m))?;
                if v.is_zero() {
                    return self.err(&d.pos, "must be longer than 0s");
                }
                Ok(v)
            }
            Dur::Seconds(s) => {
                if !(*s > 0.0 && *s <= MAX_SECONDS) {
                    return self.err(&d.pos, "must be a number of seconds between 0 and 86400");
                }
                Ok(Duration::from_secs_f64(*s))
            }
        }
    }

    fn duration_or(&self, d: &Option<At<Dur>>, default: Duration) -> Result<Duration, ConfigError> {
        match d {
            Some(d) => self.duration(d),
            None => Ok(default),
        }
    }
}

pub(super) fn validate(file: &Path, spec: Spec) -> Result<Config, ConfigError> {
    let cx = Cx { file };

    let listen = listeners(&cx, &spec)?;
    let tls = tls_files(&cx, &spec, &listen)?;

    let jits = route_jits(&cx, &spec)?;
    let mut secrets = Vec::new();
    for s in &spec.secrets {
        secrets.push(secret(&cx, s, &spec.secrets, &jits)?);
    }

    let upstream_timeout = cx.duration_or(&spec.upstream_timeout, DEFAULT_UPSTREAM_TIMEOUT)?;
    let mut connect_timeout = cx.duration_or(&spec.connect_timeout, DEFAULT_CONNECT_TIMEOUT)?;
    if spec.format == Format::Seed {
        // The lab broker's one timeout bounded the whole exchange, connecting included.
        connect_timeout = connect_timeout.min(upstream_timeout);
    }

    let connections = match &spec.connections {
        Some(c) => connections(&cx, c)?,
        None => Connections::default(),
    };

    let scan = spec.request_scan.unwrap_or(DEFAULT_REQUEST_SCAN);
    let mut routes = Vec::new();
    for r in &spec.routes {
        routes.push(route(&cx, r, &secrets, upstream_timeout, scan)?);
    }
    tokens::scope_routes(&cx, &spec.routes, &mut routes, &mut secrets)?;
    for (i, a) in routes.iter().enumerate() {
        proxy::unique_host(&cx, &spec.routes[i], a, &routes[..i])?;
        if let Some(b) = routes[..i]
            .iter()
            .find(|b| b.prefix == a.prefix && !a.prefix.is_empty())
        {
            return cx.err(
                &spec.routes[i].prefix.pos,
                format!("prefix {} is already used by route {}", a.prefix, b.name),
            );
        }
    }
    // Longest prefix first, so the first match is the most specific; stable, so routes of equal
    // length keep the order they were written in. Ids are given after this, so they index the
    // sorted list.
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));

    let mut agents = Vec::new();
    for a in &spec.agents {
        let built = agent(&cx, a, &routes)?;
        if let (Some(subject), false) = (
            &a.client_cert_subject,
            tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        ) {
            return cx.err(
                &subject.pos,
                "client_cert_subject needs tls = { ..., client_ca = FILE }, so that client certificates are verified",
            );
        }
        if let Some(subject) = &built.client_cert_subject {
            if let Some(other) = agents
                .iter()
                .find(|o: &&Agent| o.client_cert_subject.as_ref() == Some(subject))
            {
                return cx.err(
                    &a.client_cert_subject
                        .as_ref()
                        .map_or(a_pos(a), |s| s.pos.clone()),
                    format!("agent {} already has this client_cert_subject", other.name),
                );
            }
        }
        agents.push(built);
    }

    let seed = spec.seed.map(|s| SeedInfo {
        listen_host: s.listen_host,
        listen_port: s.listen_port,
        upstream_base_url: s.upstream_base_url,
        allowed_paths: s.allowed_paths,
        client_auth: s.client_auth,
        backend: s.backend.map(|b| b.secret_env),
        secret_source: secrets
            .first()
            .map(|x| x.source.label())
            .unwrap_or_else(|| "none".into()),
    });

    let approval_notify = match &spec.approval_notify {
        Some(argv) if argv.value.first().is_none_or(|p| p.is_empty()) => {
            return cx.err(
                &argv.pos,
                "write the command as [\"program\", \"arg\", ...]; it runs without a shell",
            )
        }
        Some(argv) => argv.value.clone(),
        None => Vec::new(),
    };

    let state = match &spec.state {
        Some(st) => state_backend(&cx, st, &secrets)?,
        None => StateBackend::Embedded,
    };
    let instance = match &spec.instance {
        Some(i) if !valid_instance(&i.value) => {
            return cx.err(
                &i.pos,
                "an instance name is 1 to 64 letters, digits, '.', '_' or '-'",
            )
        }
        Some(i) => Some(i.value.clone()),
        None => None,
    };

    Ok(Config {
        file: file.to_path_buf(),
        format: spec.format,
        listen,
        tls,
        mode: spec.mode.unwrap_or(Mode::Proxy),
        audit_log: spec
            .audit_log
            .unwrap_or_else(|| PathBuf::from(DEFAULT_AUDIT_LOG)),
        audit_chain: spec.audit_chain.unwrap_or(true),
        audit_fail_closed: spec.audit_fail_closed.unwrap_or(true),
        state_dir: spec.state_dir,
        admin_socket: spec.admin_socket,
        approval_notify,
        max_request_bytes: spec.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES),
        connect_timeout,
        connections,
        allowed_origins: spec.allowed_origins,
        secrets,
        routes,
        agents,
        seed,
        state,
        instance,
        run: RunSettings {
            drop_env: spec.run.drop_env,
            allow_ports: spec.run.allow_ports,
        },
        healthz: spec.healthz.unwrap_or(Healthz::Brief),
        proxy: proxy::settings(&cx, &spec.proxy)?,
    })
}

fn valid_instance(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `state = { backend = "redis", … }`, checked: a URL keygate can use and that holds no
/// password (config says where secrets live, never what), a `password_from` naming a secret.
fn state_backend(
    cx: &Cx,
    st: &StateSpec,
    secrets: &[SecretSpec],
) -> Result<StateBackend, ConfigError> {
    match st.backend.value.as_str() {
        "sqlite" | "embedded" => return Ok(StateBackend::Embedded),
        "redis" | "valkey" => {}
        other => {
            return cx.err(
                &st.backend.pos,
                format!(
                    "unknown state backend {other:?}; write \"sqlite\" (the default) or \"redis\""
                ),
            )
        }
    }
    let Some(url) = &st.url else {
        return cx.err(
            &st.table.child("url"),
            "backend redis needs url = \"redis://host:port\" or \"unix:/path\"",
        );
    };
    let u = url.value.as_str();
    let tls = st.tls.unwrap_or(false) || u.starts_with("rediss://");
    if let Some(rest) = u
        .strip_prefix("redis://")
        .or_else(|| u.strip_prefix("rediss://"))
    {
        let authority = rest.split('/').next().unwrap_or("");
        if authority.contains('@') {
            return cx.err(
                &url.pos,
                "the url must not carry a user or password; write username = \"…\" and password_from = \"SECRET\" (a [secrets.SECRET] entry)",
            );
        }
        if authority.is_empty() {
            return cx.err(&url.pos, "the url names no host");
        }
    } else if let Some(path) = u
        .strip_prefix("unix:")
        .or_else(|| u.strip_prefix("redis+unix:"))
    {
        if path.is_empty() {
            return cx.err(&url.pos, "unix: needs the socket's path");
        }
        if tls {
            return cx.err(&url.pos, "tls does not apply to a Unix socket");
        }
    } else {
        return cx.err(
            &url.pos,
            "write redis://host:port, rediss://host:port (TLS) or unix:/path",
        );
    }
    let password_from = match &st.password_from {
        Some(p) => match secrets.iter().position(|s| s.name == p.value) {
            Some(i) => Some(SecretId(i)),
            None => {
                return cx.err(
                    &p.pos,
                    format!("no [secrets.{}] holds the store's password", p.value),
                )
            }
        },
        None => None,
    };
    let rate_limits = match st.rate_limits.as_ref().map(|r| r.value.as_str()) {
        None | Some("fail-closed") => FailMode::FailClosed,
        Some("fail-open") => FailMode::FailOpen,
        Some(other) => {
            return cx.err(
                &st.rate_limits
                    .as_ref()
                    .map(|r| r.pos.clone())
                    .unwrap_or_else(|| st.table.clone()),
                format!("{other:?}: write \"fail-closed\" (the default) or \"fail-open\""),
            )
        }
    };
    let max_stale = cx.duration_or(&st.max_stale, DEFAULT_MAX_STALE)?;
    // `tls = true` on a redis:// url means the same as rediss://.
    let url = match u.strip_prefix("redis://").filter(|_| tls) {
        Some(rest) => format!("rediss://{rest}"),
        None => u.to_string(),
    };
    Ok(StateBackend::Redis(RedisState {
        url,
        tls,
        username: st.username.clone().filter(|u| !u.is_empty()),
        password_from,
        rate_limits,
        max_stale,
    }))
}

fn connections(cx: &Cx, c: &ConnectionsSpec) -> Result<Connections, ConfigError> {
    let d = Connections::default();
    let max_per_listener = match &c.max_per_listener {
        Some(m) if m.value == 0 => return cx.err(&m.pos, "must be at least 1"),
        Some(m) => m.value,
        None => d.max_per_listener,
    };
    Ok(Connections {
        first_request_timeout: cx.duration_or(&c.first_request_timeout, d.first_request_timeout)?,
        idle_timeout: cx.duration_or(&c.idle_timeout, d.idle_timeout)?,
        max_per_listener,
        request_body_timeout: cx.duration_or(&c.request_body_timeout, d.request_body_timeout)?,
        h2c: c.h2c.unwrap_or(d.h2c),
        runtime: c.runtime.unwrap_or(d.runtime),
        http1: c.http1.unwrap_or(d.http1),
    })
}

fn listeners(cx: &Cx, spec: &Spec) -> Result<Vec<Listen>, ConfigError> {
    let pos = &spec.listen.pos;
    let written = match &spec.listen.value {
        Some(l) => l.clone(),
        None => vec![ListenSpec::Text(DEFAULT_LISTEN.into())],
    };
    let mut listen = Vec::new();
    for l in &written {
        let parsed = match l {
            ListenSpec::Text(t) => parse_listen(t),
            ListenSpec::HostPort(h, port) => {
                let ip = match h.as_str() {
                    "localhost" => Ok(std::net::Ipv4Addr::LOCALHOST.into()),
                    h => h
                        .parse::<std::net::IpAddr>()
                        .map_err(|_| format!("{h:?} is not an IP address")),
                };
                ip.map(|ip| Listen::Tcp((ip, *port).into()))
            }
        };
        listen.push(parsed.or_else(|m| cx.err(pos, m))?);
    }
    if listen.is_empty() {
        return cx.err(pos, "at least one listener is needed");
    }
    check_loopback(
        &listen,
        spec.allow_plaintext_non_loopback || spec.allow_non_loopback,
    )
    .or_else(|m| cx.err(pos, m))?;
    Ok(listen)
}

/// `tls` is set exactly when there is an `https://` listener. The files are read when the
/// listener's state is built (`listen::tls`), so that `keygate reload` reads them again.
fn tls_files(cx: &Cx, spec: &Spec, listen: &[Listen]) -> Result<Option<TlsFiles>, ConfigError> {
    let https = listen.iter().any(|l| matches!(l, Listen::Tls(_)));
    match (&spec.tls, https) {
        (None, false) => Ok(None),
        (None, true) => cx.err(
            &spec.listen.pos,
            "an https:// listener needs tls = { cert = FILE, key = FILE }",
        ),
        (Some(t), false) => cx.err(
            &t.pos,
            "tls is set but no listener is https://; write listen = [\"https://0.0.0.0:8443\"]",
        ),
        (Some(t), true) => {
            let file = |f: &str, key: &str| -> Result<PathBuf, ConfigError> {
                if f.is_empty() {
                    return cx.err(&t.pos.child(key), "must name a PEM file");
                }
                Ok(expand_home(f))
            };
            Ok(Some(TlsFiles {
                cert: file(&t.value.cert, "cert")?,
                key: file(&t.value.key, "key")?,
                client_ca: match &t.value.client_ca {
                    Some(ca) => Some(file(ca, "client_ca")?),
                    None => None,
                },
            }))
        }
    }
}

/// Where an agent's table was written, for an error about the agent as a whole.
fn a_pos(a: &AgentSpec) -> Pos {
    Pos::new(0, format!("agents.{}", a.name))
}

/// `all`: every secret of the file, for sources that read another (`client_secret = "NAME"`).
fn secret(
    cx: &Cx,
    s: &SecretSpecRaw,
    all: &[SecretSpecRaw],
    jits: &BTreeMap<String, Jit>,
) -> Result<SecretSpec, ConfigError> {
    let kind = s.source.value.as_str();
    let need = |v: &Option<String>, k: &str| -> Result<String, ConfigError> {
        match v {
            Some(v) if !v.is_empty() => Ok(v.clone()),
            _ => cx.err(&s.table.child(k), format!("source {kind} needs {k}")),
        }
    };
    let source = match kind {
        "none" => SecretSource::None,
        "env" => SecretSource::Env {
            var: need(&s.var, "name")?,
        },
        "file" => SecretSource::File {
            path: expand_home(&need(&s.path, "path")?),
        },
        "command" => {
            let argv = s.argv.clone().unwrap_or_default();
            if argv.first().is_none_or(|p| p.is_empty()) {
                return cx.err(
                    &s.table.child("argv"),
                    "source command needs argv = [\"program\", \"arg\", ...]",
                );
            }
            let timeout = cx.duration_or(&s.timeout, DEFAULT_COMMAND_TIMEOUT)?;
            let env = s.env.clone().unwrap_or_default();
            if let Some(bad) = env.iter().find(|v| v.is_empty() || v.contains('=')) {
                return cx.err(
                    &s.table.child("env"),
                    format!("{bad:?} is not an environment variable name"),
                );
            }
            SecretSource::Command { argv, timeout, env }
        }
        "openbao" | "vault" => openbao(cx, s, all, jits)?,
        "aws-secrets-manager" => SecretSource::AwsSecretsManager {
            secret_id: need(&s.secret_id, "secret_id")?,
            region: need(&s.region, "region")?,
            endpoint: s.endpoint.clone(),
            field: s.field.clone(),
            profile: s.profile.clone(),
        },
        "aws-credentials" => SecretSource::AwsCredentials {
            profile: s.profile.clone(),
        },
        "oauth2" | "oauth2-client-credentials" => tokens::oauth2(cx, s, all)?,
        "github-app" => tokens::github_app(cx, s, all)?,
        "keychain" => tokens::keychain(cx, s)?,
        other => {
            return cx.err(
                &s.source.pos,
                format!("unknown source {other:?}; use env, file, command, keychain, openbao, aws-secrets-manager, oauth2, github-app, aws-credentials or none"),
            )
        }
    };
    let ttl = match &s.ttl {
        Some(t) => Some(cx.duration(t)?),
        None => None,
    };
    let lazy = match &s.fetch {
        None => false,
        Some(f) => match f.value.as_str() {
            "startup" => false,
            "first-use" => true,
            other => {
                return cx.err(
                    &f.pos,
                    format!("unknown fetch {other:?}; use startup or first-use"),
                )
            }
        },
    };
    Ok(SecretSpec {
        name: s.name.clone(),
        source,
        ttl,
        lazy,
    })
}

/// The `jit` each dynamic OpenBao secret serves with, from the routes that use it (`ttl` when
/// none says). Routes sharing one secret must agree: it is one lease cache.
fn route_jits(cx: &Cx, spec: &Spec) -> Result<BTreeMap<String, Jit>, ConfigError> {
    let mut jits: BTreeMap<String, Jit> = BTreeMap::new();
    for r in &spec.routes {
        let Some(j) = &r.jit else { continue };
        let jit = match j.value.as_str() {
            "request" => Jit::Request,
            "run" => Jit::Run,
            "ttl" => Jit::Ttl,
            other => {
                return cx.err(
                    &j.pos,
                    format!("unknown jit {other:?}; use request, run or ttl"),
                )
            }
        };
        let dynamic = r.secret.as_ref().and_then(|name| {
            spec.secrets
                .iter()
                .find(|s| s.name == name.value && s.dynamic.is_some())
        });
        let Some(secret) = dynamic else {
            return cx.err(
                &j.pos,
                "jit needs the route's secret to be an openbao source with dynamic = \"PATH\"",
            );
        };
        if let Some(prev) = jits.insert(secret.name.clone(), jit) {
            if prev != jit {
                return cx.err(
                    &j.pos,
                    format!(
                        "routes using secret {} name different jit values; they share one lease",
                        secret.name
                    ),
                );
            }
        }
    }
    Ok(jits)
}

/// Outstanding leases of one dynamic OpenBao secret when `max_leases` is not set.
const DEFAULT_MAX_LEASES: usize = 64;

/// The largest `max_leases`: a bound that large is no bound on what the redactor must hold.
const MAX_MAX_LEASES: usize = 4096;

/// An `openbao` source: where, how keygate logs in, and what it reads.
fn openbao(
    cx: &Cx,
    s: &SecretSpecRaw,
    all: &[SecretSpecRaw],
    jits: &BTreeMap<String, Jit>,
) -> Result<SecretSource, ConfigError> {
    use crate::secret::openbao::{Auth, Bao, Read, Settings};
    let need = |v: &Option<String>, k: &str| -> Result<String, ConfigError> {
        match v {
            Some(v) if !v.is_empty() => Ok(v.clone()),
            _ => cx.err(&s.table.child(k), format!("source openbao needs {k}")),
        }
    };
    // The secret id or JWT comes from another secret, which cannot itself be an openbao one:
    // no login depends on another login.
    let other = |key: &str, name: &Option<String>| -> Result<Box<SecretSpec>, ConfigError> {
        let name = need(name, key)?;
        match all.iter().find(|o| o.name == name) {
            Some(o) if !matches!(o.source.value.as_str(), "openbao" | "vault") => {
                Ok(Box::new(secret(cx, o, all, jits)?))
            }
            Some(_) => cx.err(
                &s.table.child(key),
                format!("{key} names secret {name}, an openbao source; name an env, file or command secret"),
            ),
            None => cx.err(&s.table.child(key), format!("no [secrets.{name}] is defined")),
        }
    };
    let auth_mount = |default: &str| s.auth_mount.clone().unwrap_or_else(|| default.into());
    let auth = match s.auth.as_deref() {
        None | Some("token") => Auth::Token(match (&s.token_env, &s.token_file) {
            (Some(e), None) => BaoToken::Env(e.clone()),
            (None, Some(f)) => BaoToken::File(expand_home(f)),
            _ => {
                let source = match s.source.value.as_str() {
                    "vault" => "source \"vault\" (an alias of openbao: Vault's HTTP API)",
                    _ => "source \"openbao\"",
                };
                return cx.err(
                    &s.table.child("token_env"),
                    format!("{source} logs in with keygate's own token: set exactly one of token_env = \"VAULT_TOKEN\" or token_file = \"PATH\", or auth = \"approle\" or \"jwt\""),
                );
            }
        }),
        Some("approle") => Auth::AppRole {
            mount: auth_mount("approle"),
            role_id: need(&s.role_id, "role_id")?,
            secret_id: other("secret_id_from", &s.secret_id_from)?,
        },
        Some("jwt") => Auth::Jwt {
            mount: auth_mount("jwt"),
            role: need(&s.role, "role")?,
            jwt: other("jwt_from", &s.jwt_from)?,
        },
        Some(other) => {
            return cx.err(
                &s.table.child("auth"),
                format!("unknown auth {other:?}; use token, approle or jwt"),
            )
        }
    };
    let address = need(&s.address, "address")?;
    if !(address.starts_with("http://") || address.starts_with("https://")) {
        return cx.err(
            &s.table.child("address"),
            "address must be an http:// or https:// URL",
        );
    }
    let read = match &s.dynamic {
        Some(path) => Read::Dynamic {
            path: path.trim_matches('/').to_string(),
            field: need(&s.field, "field")?,
            params: s.params.clone().unwrap_or_default(),
        },
        None => Read::Kv {
            mount: s.mount.clone().unwrap_or_else(|| "secret".into()),
            path: need(&s.path, "path")?,
            field: need(&s.field, "field")?,
        },
    };
    let max_leases = match &s.max_leases {
        None => DEFAULT_MAX_LEASES,
        Some(m) if s.dynamic.is_none() => {
            return cx.err(
                &m.pos,
                "max_leases applies only to a dynamic secret (dynamic = \"PATH\")",
            )
        }
        Some(m) if m.value == 0 || m.value > MAX_MAX_LEASES => {
            return cx.err(
                &m.pos,
                format!("max_leases must be between 1 and {MAX_MAX_LEASES}"),
            )
        }
        Some(m) => m.value,
    };
    let settings = Settings {
        max_leases,
        address: address.trim_end_matches('/').to_string(),
        ca_file: s.ca_file.as_deref().map(expand_home),
        auth,
        read,
        jit: jits.get(&s.name).copied().unwrap_or(Jit::Ttl),
    };
    Ok(SecretSource::OpenBao(Arc::new(Bao::new(settings))))
}

fn route(
    cx: &Cx,
    r: &RouteSpec,
    secrets: &[SecretSpec],
    default_timeout: Duration,
    default_scan: RequestScan,
) -> Result<Route, ConfigError> {
    let (host, upstream_ca) = proxy::route_keys(cx, r)?;
    let prefix = r.prefix.value.trim_end_matches('/').to_string();
    let prefix = if r.prefix.value.is_empty() {
        // A route the forward proxy serves by host only: no path reaches it.
        String::new()
    } else if prefix.is_empty() {
        "/".to_string()
    } else {
        prefix
    };
    let plain = prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._~-".contains(&b));
    if !prefix.is_empty()
        && (!prefix.starts_with('/') || !plain || crate::route::path::check_path(&prefix).is_err())
    {
        return cx.err(
            &r.prefix.pos,
            "prefix must be a plain path such as /openai (letters, digits, / . _ ~ -)",
        );
    }
    let upstream = parse_upstream(&r.upstream.value).or_else(|m| cx.err(&r.upstream.pos, m))?;
    let secret = match &r.secret {
        Some(s) => match secrets.iter().position(|x| x.name == s.value) {
            Some(i) => Some(SecretId(i)),
            None => return cx.err(&s.pos, format!("no [secrets.{}] is defined", s.value)),
        },
        None => None,
    };
    let inject = match &r.inject {
        Some(i) if i.value == "aws-sigv4" => crate::config::sigv4_inject(
            r.region.as_deref(),
            r.service.as_deref(),
            r.secret.is_some(),
        )
        .or_else(|m| cx.err(&i.pos, m))?,
        Some(i) => parse_inject(&i.value, r.inject_format.clone(), r.basic_username.clone())
            .or_else(|m| cx.err(&i.pos, m))?,
        None => Inject::Bearer,
    };
    if !matches!(inject, Inject::AwsSigV4 { .. }) && (r.region.is_some() || r.service.is_some()) {
        let pos = r.inject.as_ref().map_or(&r.prefix.pos, |i| &i.pos);
        return cx.err(pos, "region and service are keys of inject = \"aws-sigv4\"");
    }
    let mut allow = Vec::new();
    for rule in &r.allow {
        let parsed = match &rule.value {
            RuleSpec::Pattern(p) => Rule::parse(p),
            RuleSpec::ExactPost(p) if !p.starts_with('/') => {
                Err(format!("{p:?} must start with /"))
            }
            RuleSpec::ExactPost(p) => Rule::exact("POST", p),
        };
        let parsed = match (&r.query, parsed) {
            (Some(q), Ok(rule)) => rule
                .default_query(&q.value)
                .or_else(|m| cx.err(&q.pos, m))?,
            (_, parsed) => parsed.or_else(|m| cx.err(&rule.pos, m))?,
        };
        allow.push(parsed);
    }
    let mut extra_headers = Vec::new();
    for h in &r.extra_headers {
        let (k, v) = &h.value;
        if sets_itself(&inject, k) {
            return cx.err(
                &h.pos,
                format!("{k} is set by keygate (credential or framing) and cannot be overridden"),
            );
        }
        let hn = HeaderName::from_bytes(k.as_bytes())
            .or_else(|_| cx.err(&h.pos, format!("{k:?} is not a header name")))?;
        let hv = HeaderValue::from_str(v)
            .or_else(|_| cx.err(&h.pos, format!("value of {k} is not a valid header value")))?;
        extra_headers.push((hn, hv));
    }
    let approval = match &r.approval {
        None => Approval::Never,
        Some(a) if a.value == "never" => Approval::Never,
        Some(a) if a.value == "each" => Approval::Each {
            timeout: cx.duration_or(&r.approval_timeout, DEFAULT_APPROVAL_TIMEOUT)?,
        },
        Some(a) if a.value == "once-per-token" => Approval::OncePerToken {
            timeout: cx.duration_or(&r.approval_timeout, DEFAULT_APPROVAL_TIMEOUT)?,
        },
        Some(a) => {
            return cx.err(
                &a.pos,
                "approval must be \"each\", \"once-per-token\" or \"never\"",
            )
        }
    };
    let timeout = cx.duration_or(&r.timeout, default_timeout)?;
    let mut env = Vec::new();
    for e in &r.env {
        let (k, v) = &e.value;
        crate::launcher::check_env_entry(k, v).or_else(|m| cx.err(&e.pos, m))?;
        env.push((k.clone(), v.clone()));
    }
    let placeholder_env = match &r.placeholder_env {
        Some(v) => {
            crate::launcher::check_env_entry(&v.value, "").or_else(|m| cx.err(&v.pos, m))?;
            Some(v.value.clone())
        }
        None => None,
    };
    let placeholder_in = match &r.placeholder_in {
        Some(v) => crate::placeholder::Positions::parse(&v.value).or_else(|m| cx.err(&v.pos, m))?,
        None => crate::placeholder::Positions::default(),
    };
    if let (Some(v), Inject::AwsSigV4 { .. }) = (&r.placeholder_in, &inject) {
        // The stored value is the key pair, not what goes on the wire: replacing a placeholder
        // with it would send the signing secret upstream.
        if !placeholder_in.is_empty() {
            return cx.err(
                &v.pos,
                "this route signs its requests (aws-sigv4): its secret is a signing key, never sent, so it has no query or body placeholder",
            );
        }
    }
    if placeholder_env.is_some() || !placeholder_in.is_empty() {
        if let Some(at) = r
            .placeholder_env
            .as_ref()
            .map(|v| &v.pos)
            .or(r.placeholder_in.as_ref().map(|v| &v.pos))
        {
            if secret.is_none() {
                return cx.err(
                    at,
                    "a placeholder stands in for the route's secret: set secret too",
                );
            }
        }
    }
    let classification = r
        .classification
        .clone()
        .unwrap_or_else(|| "unclassified".into());
    let recorded = crate::config::RouteNames {
        route: r.name.as_str().into(),
        destination: host.as_ref().unwrap_or(&upstream.host).as_str().into(),
        classification: classification.as_str().into(),
        secret: r.secret.as_ref().map(|s| s.value.as_str().into()),
    };
    Ok(Route {
        recorded,
        env,
        placeholder_env,
        placeholder_in,
        host,
        upstream_ca,
        name: r.name.clone(),
        prefix,
        upstream,
        secret,
        inject,
        allow,
        classification,
        extra_headers,
        approval,
        timeout,
        require_json: r.require_json.unwrap_or(false),
        request_scan: r.request_scan.unwrap_or(default_scan),
        allow_range: r.allow_range.unwrap_or(false),
        budget_reserve: r.budget_reserve,
        max_response_time: match &r.max_response_time {
            Some(t) => Some(cx.duration(t)?),
            None => None,
        },
    })
}

/// A header keygate writes itself: the route's credential header, a caller's credential header
/// (stripped from every request) or framing. An extra header of that name would replace the
/// injected key or smuggle a second message.
fn sets_itself(inject: &Inject, header: &str) -> bool {
    let lower = header.to_ascii_lowercase();
    let injected = match inject {
        Inject::Header { name, .. } => name.as_str() == lower,
        Inject::Bearer | Inject::Basic { .. } => lower == "authorization",
        Inject::Query { .. } => false,
        Inject::AwsSigV4 { .. } => {
            lower == "authorization" || crate::secret::aws::signs_header(&lower)
        }
    };
    injected
        || RESERVED_HEADERS.contains(&lower.as_str())
        || crate::authenticate::caller::CALLER_CREDENTIAL_HEADERS.contains(&lower.as_str())
}

fn agent(cx: &Cx, a: &AgentSpec, routes: &[Route]) -> Result<Agent, ConfigError> {
    let agent_routes = match &a.routes {
        Some(list) => {
            let mut ids = Vec::with_capacity(list.value.len());
            for name in &list.value {
                match routes.iter().position(|x| &x.name == name) {
                    Some(i) => ids.push(RouteId(i)),
                    None => return cx.err(&list.pos, format!("no [routes.{name}] is defined")),
                }
            }
            Some(ids)
        }
        None => None,
    };
    let rate = match &a.rate {
        Some(r) => Some(Rate::parse(&r.value).or_else(|m| cx.err(&r.pos, m))?),
        None => None,
    };
    let budget_per_person = parse_budget(cx, &a.budget_per_person)?;
    let budget = parse_budget(cx, &a.budget)?;
    let rate_per_person = match &a.rate_per_person {
        Some(r) => Some(Rate::parse(&r.value).or_else(|m| cx.err(&r.pos, m))?),
        None => None,
    };
    let person_header = match &a.person_header {
        Some(h) => {
            let name = HeaderName::from_bytes(h.value.as_bytes())
                .or_else(|_| cx.err(&h.pos, format!("{:?} is not a header name", h.value)))?;
            if RESERVED_HEADERS.contains(&name.as_str())
                || crate::authenticate::caller::CALLER_CREDENTIAL_HEADERS.contains(&name.as_str())
            {
                return cx.err(
                    &h.pos,
                    format!(
                        "{name} carries credentials or framing; name the person in another header"
                    ),
                );
            }
            Some(name)
        }
        None => None,
    };
    let client_cert_subject = match &a.client_cert_subject {
        Some(s) if s.value.trim().is_empty() => {
            return cx.err(&s.pos, "write the subject, e.g. \"CN=ci-runner\"")
        }
        Some(s) => Some(crate::listen::normalize_subject(&s.value)),
        None => None,
    };
    if let (Some(r), None, None) = (&a.budget_reserve, &budget, &budget_per_person) {
        return cx.err(
            &r.pos,
            "budget_reserve applies to a token budget; set budget_tokens too",
        );
    }
    Ok(Agent {
        recorded: crate::config::AgentNames {
            agent: a.name.as_str().into(),
            person: a.person.as_deref().map(Into::into),
        },
        name: a.name.clone(),
        person: a.person.clone(),
        token_env: a.token_env.clone(),
        open: a.open,
        routes: agent_routes,
        rate,
        budget,
        budget_reserve: a.budget_reserve.as_ref().map(|r| r.value),
        unix_uids: a.unix_uids.clone(),
        person_header,
        client_cert_subject,
        rate_per_person,
        budget_per_person,
    })
}

/// `budget_tokens = { per, limit }` and its per-person twin.
fn parse_budget(cx: &Cx, b: &Option<At<(String, u64)>>) -> Result<Option<Budget>, ConfigError> {
    let Some(b) = b else { return Ok(None) };
    let (per, limit) = &b.value;
    let per = match per.as_str() {
        "minute" => Duration::from_secs(60),
        "hour" => Duration::from_secs(3600),
        "day" => Duration::from_secs(86_400),
        other => match parse_duration(other) {
            Ok(d) if !d.is_zero() => d,
            _ => return cx.err(&b.pos, "per must be minute, hour, day or a duration"),
        },
    };
    Ok(Some(Budget { limit: *limit, per }))
}

/// Parses an upstream base URL: `http` or `https`, a host, an optional path, no query, no
/// credentials in the URL.
fn parse_upstream(url: &str) -> Result<Upstream, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let scheme = uri.scheme().cloned().ok_or("needs http:// or https://")?;
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(format!(
            "scheme {scheme} is not supported; use http or https"
        ));
    }
    let authority = uri.authority().cloned().ok_or("needs a host")?;
    if authority.as_str().contains('@') {
        return Err("credentials in the URL are not allowed; use a secret".into());
    }
    if uri.query().is_some() {
        return Err("a query string is not allowed in an upstream URL".into());
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(Upstream {
        url: url.to_string(),
        scheme,
        host: authority.host().to_string(),
        authority,
        base_path,
    })
}

/// `NAME:` style inject spec, e.g. `bearer`, `header:x-api-key`, `basic`, `query:key`.
fn parse_inject(
    s: &str,
    format: Option<String>,
    username: Option<String>,
) -> Result<Inject, String> {
    let (kind, arg) = match s.split_once(':') {
        Some((k, a)) => (k, Some(a)),
        None => (s, None),
    };
    match (kind, arg) {
        ("bearer", None) => Ok(Inject::Bearer),
        ("basic", None) => Ok(Inject::Basic { username }),
        ("header", Some(name)) => {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            let format = format.unwrap_or_else(|| "{secret}".into());
            if !format.contains("{secret}") {
                return Err("inject_format must contain {secret}".into());
            }
            Ok(Inject::Header { name, format })
        }
        ("query", Some(name)) if !name.is_empty() => Ok(Inject::Query { name: name.into() }),
        _ => Err(format!(
            "{s:?} is not one of bearer, header:NAME, basic, query:NAME, aws-sigv4"
        )),
    }
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(addr) = s.strip_prefix("https://") {
        return addr
            .parse::<std::net::SocketAddr>()
            .map(Listen::Tls)
            .map_err(|_| format!("{s:?}: write https://IP:PORT, e.g. https://0.0.0.0:8443"));
    }
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a socket path".into());
        }
        return Ok(Listen::Unix(expand_home(path)));
    }
    s.parse::<std::net::SocketAddr>()
        .map(Listen::Tcp)
        .map_err(|_| format!("{s:?} is neither IP:PORT (e.g. 127.0.0.1:8791) nor unix:/path"))
}

/// Refuses a listener a browser or another machine could reach unless config allows it.
fn check_loopback(listen: &[Listen], allow_non_loopback: bool) -> Result<(), String> {
    for l in listen {
        if let Listen::Tcp(addr) = l {
            if !addr.ip().is_loopback() && !allow_non_loopback {
                return Err(format!(
                    "{addr} is not a loopback address and has no TLS; listen on https://{addr} with tls = {{ cert, key }}, or set allow_plaintext_non_loopback = true"
                ));
            }
        }
    }
    Ok(())
}
