//! Configuration: the two file formats keygate reads, and the validated model the rest of the
//! program uses.
//!
//! Input: a `.toml` (native, [`native`]) or `.json` (the lab broker's format, [`seed`]) file.
//! Output: a [`Config`], checked once at load ("parse, don't validate"), so no other module
//! re-checks a value or meets an unknown key.
//!
//! Architecture invariant: config holds *where* secrets live, never their values. Agent tokens are
//! resolved from the environment by `serve` at start-up and kept only as hashes.

mod native;
mod seed;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Serialize;

use crate::authorize::{Rate, Rule};
use crate::secret::SecretSpec;

/// A config that could not be loaded: `file:line: key: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {key}: {message}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub key: String,
    pub message: String,
}

#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    pub format: Format,
    pub listen: Vec<Listen>,
    pub mode: Mode,
    pub audit_log: PathBuf,
    /// Hash-chain audit records (`prev_hash`/`hash`).
    pub audit_chain: bool,
    /// Refuse requests when the audit log cannot be written (the default) rather than serve
    /// them unaudited.
    pub audit_fail_closed: bool,
    pub state_dir: Option<PathBuf>,
    /// The admin socket; `state_dir/admin.sock` when unset.
    pub admin_socket: Option<PathBuf>,
    /// Run (no shell) for each new pending approval, with the approval as JSON on stdin.
    pub approval_notify: Vec<String>,
    pub max_request_bytes: u64,
    pub connect_timeout: Duration,
    pub connections: Connections,
    /// Browser origins allowed to call keygate; none by default, so a web page cannot.
    pub allowed_origins: Vec<String>,
    pub secrets: Vec<SecretSpec>,
    /// Longest prefix first, so the first match is the most specific.
    pub routes: Vec<Route>,
    pub agents: Vec<Agent>,
    /// The lab broker's fields, kept for `/healthz` when the config came from its JSON format.
    pub seed: Option<SeedInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Native,
    Seed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Proxy,
    DryRun,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Listen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

#[derive(Debug, Serialize)]
pub struct Route {
    pub name: String,
    /// `/openai`; `/` for the lab's single route.
    pub prefix: String,
    pub upstream: Upstream,
    /// Name of the secret attached to requests, if any.
    pub secret: Option<String>,
    pub inject: Inject,
    pub allow: Vec<Rule>,
    pub classification: String,
    #[serde(serialize_with = "ser_headers")]
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    pub approval: Approval,
    /// Time allowed for the upstream's response headers, and between body chunks after that.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// The lab broker refused bodies that are not JSON (400); its routes keep doing so.
    pub require_json: bool,
    /// What to do with a request that carries a secret or a credential.
    pub request_scan: RequestScan,
    /// A bound on the whole response, headers to last byte; `None` lets a stream run as long as
    /// it keeps moving.
    #[serde(skip_serializing_if = "Option::is_none", with = "humantime_serde_opt")]
    pub max_response_time: Option<Duration>,
    /// Output tokens a budgeted agent's request on this route books when its body names no
    /// `max_tokens`; overrides the agent's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_reserve: Option<u64>,
    /// Whether `Range` (and `If-Range`, `Request-Range`) go upstream; off, they are dropped.
    pub allow_range: bool,
}

/// Bounds on every connection a listener accepts (`[connections]`), so idle or stalled peers
/// cannot hold keygate's file descriptors.
#[derive(Clone, Debug, Serialize)]
pub struct Connections {
    /// Time from accept to the first request head; a silent peer is closed after it.
    #[serde(with = "humantime_serde_compat")]
    pub first_request_timeout: Duration,
    /// Time a connection may sit with no request in flight (HTTP/1 keep-alive and HTTP/2).
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Open connections per listener; when full the longest-idle one is closed, or the newcomer
    /// gets 503 `too_many_connections` when none is idle.
    pub max_per_listener: usize,
    /// Time allowed between request body chunks (408 `request_body_timeout`).
    #[serde(with = "humantime_serde_compat")]
    pub request_body_timeout: Duration,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_per_listener: 1024,
            request_body_timeout: Duration::from_secs(30),
        }
    }
}

/// The request exfiltration scan: a request from an agent whose headers or body hold a secret
/// keygate holds, or something shaped like a credential, is refused or redacted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestScan {
    /// 403 `secret_in_request` for a held secret or a high-confidence credential format;
    /// generic findings (`password = …`, JWTs) are only reported in the audit record. The body
    /// is read whole before anything is forwarded.
    Refuse,
    /// As `Refuse`, and generic findings are refused too.
    #[serde(rename = "refuse-strict", alias = "refuse_strict")]
    RefuseStrict,
    /// Forward with every strong finding replaced by `[REDACTED:label]`; the body streams.
    Redact,
    Off,
}

impl RequestScan {
    /// Whether a finding refuses the request (the body is then read whole first).
    pub fn refuses(self) -> bool {
        matches!(self, RequestScan::Refuse | RequestScan::RefuseStrict)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Upstream {
    /// As written in config, for display.
    pub url: String,
    #[serde(skip)]
    pub scheme: http::uri::Scheme,
    #[serde(skip)]
    pub authority: http::uri::Authority,
    /// Host name, for audit `destination`.
    pub host: String,
    /// Path of the base URL without a trailing `/` (`""` for none); prepended to every request.
    pub base_path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Inject {
    /// `Authorization: Bearer <secret>`
    Bearer,
    /// `<name>: <format with {secret} replaced>`; format defaults to `{secret}`.
    Header {
        #[serde(serialize_with = "ser_header_name")]
        name: HeaderName,
        format: String,
    },
    /// `Authorization: Basic base64(<username>:<secret>)`; without a username the secret is
    /// taken to be `user:password` already.
    Basic { username: Option<String> },
    /// `?<name>=<secret>` appended to the query string.
    Query { name: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    Never,
    /// A person approves each request.
    Each {
        #[serde(with = "humantime_serde_compat")]
        timeout: Duration,
    },
    /// A person approves the first request of each token on this route.
    OncePerToken {
        #[serde(with = "humantime_serde_compat")]
        timeout: Duration,
    },
}

impl Approval {
    /// How long a request waits for a person, when it needs one.
    pub fn timeout(&self) -> Option<Duration> {
        match self {
            Approval::Never => None,
            Approval::Each { timeout } | Approval::OncePerToken { timeout } => Some(*timeout),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Agent {
    pub name: String,
    /// The person this agent acts for, recorded in audit.
    pub person: Option<String>,
    /// Environment variable holding this agent's token, read once at start-up.
    pub token_env: Option<String>,
    /// The lab broker without `client_token_env` let anyone on loopback call it; only its
    /// config can produce such an agent.
    pub open: bool,
    /// Routes this agent may use; `None` means every route.
    pub routes: Option<Vec<String>>,
    pub rate: Option<Rate>,
    pub budget: Option<Budget>,
    /// Callers on a Unix listener with one of these peer uids are this agent, without a token.
    pub unix_uids: Vec<u32>,
    /// Output tokens this agent's request books when its body names no `max_tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_reserve: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Budget {
    pub limit: u64,
    #[serde(with = "humantime_serde_compat")]
    pub per: Duration,
}

#[derive(Debug, Serialize)]
pub struct SeedInfo {
    pub listen_host: String,
    pub listen_port: u16,
    pub upstream_base_url: String,
    pub allowed_paths: Vec<String>,
    pub client_auth: bool,
    pub secret_source: String,
}

impl Config {
    /// Loads and validates a config file; the format follows the extension.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::from_text(path, &text)
    }

    pub fn from_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut config = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => seed::parse(path, text)?,
            Some("toml") => native::parse(path, text)?,
            _ => {
                return Err(ConfigError {
                    file: path.to_path_buf(),
                    line: 0,
                    key: "(file)".into(),
                    message: "config must be a .toml (native) or .json (lab broker) file".into(),
                })
            }
        };
        config
            .routes
            .sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(config)
    }

    pub fn secret(&self, name: &str) -> Option<&SecretSpec> {
        self.secrets.iter().find(|s| s.name == name)
    }

    /// The policy as `check` prints it and as `policy_version` hashes it: everything that decides
    /// a request, nothing secret.
    pub fn effective_policy(&self) -> serde_json::Value {
        let secrets: serde_json::Map<String, serde_json::Value> = self
            .secrets
            .iter()
            .map(|s| {
                let v = serde_json::json!({
                    "source": s.source.label(),
                    "ttl": s.ttl.map(|t| humantime::format_duration(t).to_string()),
                });
                (s.name.clone(), v)
            })
            .collect();
        serde_json::json!({
            "format": self.format,
            "mode": self.mode,
            "listen": self.listen,
            "audit_log": self.audit_log,
            "audit_chain": self.audit_chain,
            "audit_fail_closed": self.audit_fail_closed,
            "max_request_bytes": self.max_request_bytes,
            "allowed_origins": self.allowed_origins,
            "approval_notify": self.approval_notify,
            "secrets": secrets,
            "routes": self.routes,
            "agents": self.agents,
        })
    }

    /// A short hash of the effective policy, recorded in every audit record so a decision can be
    /// traced to the policy that made it.
    pub fn policy_version(&self) -> String {
        use sha2::{Digest, Sha256};
        let canonical = serde_json::to_vec(&self.effective_policy()).unwrap_or_default();
        hex::encode(&Sha256::digest(&canonical)[..6])
    }
}

/// Parses an upstream base URL: `http` or `https`, a host, an optional path, no query, no
/// credentials in the URL.
pub(crate) fn parse_upstream(url: &str) -> Result<Upstream, String> {
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

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}; write a duration such as 30s, 15m or 1h"))
}

/// `NAME:` style inject spec, e.g. `bearer`, `header:x-api-key`, `basic`, `query:key`.
pub(crate) fn parse_inject(
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
        ("aws-sigv4", _) => Err("aws-sigv4 injection is not supported by this build yet".into()),
        _ => Err(format!(
            "{s:?} is not one of bearer, header:NAME, basic, query:NAME"
        )),
    }
}

pub(crate) fn parse_listen(s: &str) -> Result<Listen, String> {
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

pub(crate) fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// Refuses a listener a browser or another machine could reach unless config allows it.
pub(crate) fn check_loopback(listen: &[Listen], allow_non_loopback: bool) -> Result<(), String> {
    for l in listen {
        if let Listen::Tcp(addr) = l {
            if !addr.ip().is_loopback() && !allow_non_loopback {
                return Err(format!(
                    "{addr} is not a loopback address; keygate listens on 127.0.0.1 or ::1 unless allow_non_loopback = true"
                ));
            }
        }
    }
    Ok(())
}

fn ser_headers<S: serde::Serializer>(
    h: &[(HeaderName, HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(h.len()))?;
    for (k, v) in h {
        m.serialize_entry(k.as_str(), v.to_str().unwrap_or("(binary)"))?;
    }
    m.end()
}

fn ser_header_name<S: serde::Serializer>(h: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(h.as_str())
}

mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

mod humantime_serde_opt {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::humantime_serde_compat::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

/// 1-based line of a byte offset.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
