//! Configuration: the two file formats keygate reads, and the validated model the rest of the
//! program uses.
//!
//! Input: a `.toml` (native, [`native`]) or `.json` (the lab broker's format, [`seed`]) file.
//! Each format lowers its text into the same [`spec::Spec`]; [`validate`] checks it once and
//! builds a [`Config`] ("parse, don't validate"), so no other module re-checks a value, meets an
//! unknown key, or looks a name up: cross-references are ids ([`RouteId`], [`AgentId`],
//! [`SecretId`]).
//!
//! Architecture invariant: config holds *where* secrets live, never their values. Agent tokens are
//! resolved from the environment by `serve` at start-up and kept only as hashes.

mod native;
pub mod schema;
mod seed;
mod spec;
#[cfg(test)]
mod tests;
mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Serialize;

use crate::authorize::rule::{Rate, Rule};
use crate::secret::SecretSpec;

/// A route, by its place in [`Config::routes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteId(pub usize);

/// An agent, by its place in [`Config::agents`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AgentId(pub usize);

/// A secret, by its place in [`Config::secrets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SecretId(pub usize);

impl std::ops::Index<RouteId> for Vec<Route> {
    type Output = Route;
    fn index(&self, id: RouteId) -> &Route {
        &self[id.0]
    }
}

impl std::ops::Index<AgentId> for Vec<Agent> {
    type Output = Agent;
    fn index(&self, id: AgentId) -> &Agent {
        &self[id.0]
    }
}

impl std::ops::Index<SecretId> for Vec<SecretSpec> {
    type Output = SecretSpec;
    fn index(&self, id: SecretId) -> &SecretSpec {
        &self[id.0]
    }
}

/// A config that could not be loaded: `file:line: key: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ConfigError {
    /// The config file that was read.
    pub file: PathBuf,
    /// 1-based line the wrong value was written on; 0 when the error is about the whole file
    /// (unreadable, or neither `.toml` nor `.json`).
    pub line: usize,
    /// The key to fix, spelled as the file's format spells it (`routes.openai.timeout`,
    /// `upstream_timeout_seconds`); `(file)` for the file as a whole.
    pub key: String,
    /// What is wrong and, where it helps, how to write it instead.
    pub message: String,
}

impl ConfigError {
    /// `file:line: key: message`; an error about the whole file has no line or key to name.
    fn describe(&self) -> String {
        if self.line == 0 && self.key == "(file)" {
            if self.message.starts_with("cannot read ") {
                return self.message.clone();
            }
            return format!("{}: {}", self.file.display(), self.message);
        }
        format!(
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.key,
            self.message
        )
    }
}

/// A checked config: every value valid, every default filled in, every name resolved to an id.
/// Built once by [`Config::load`]; it says where secrets live and never holds their values.
#[derive(Debug)]
pub struct Config {
    /// The file it was loaded from; errors and the audit `start` record name it.
    pub file: PathBuf,
    /// The format the file was written in; a lab config keeps the lab broker's behaviours.
    pub format: Format,
    /// Where agents connect; never empty, and plaintext TCP addresses are loopback unless
    /// `allow_plaintext_non_loopback` (or its older name `allow_non_loopback`) is set.
    pub listen: Vec<Listen>,
    /// Certificate and key of the `https://` listeners; set exactly when there is one.
    pub tls: Option<TlsFiles>,
    /// Whether allowed requests are forwarded or only described.
    pub mode: Mode,
    /// The JSONL audit log appended to (`audit_log`, the lab's `event_log`; `events.jsonl` by
    /// default).
    pub audit_log: PathBuf,
    /// Hash-chain audit records (`prev_hash`/`hash`).
    pub audit_chain: bool,
    /// Refuse requests when the audit log cannot be written (the default) rather than serve
    /// them unaudited.
    pub audit_fail_closed: bool,
    /// keygate's own state: the state store (`state.db`: tokens, freezes, budgets, approvals),
    /// the audit signing key (`audit.key`) and the admin socket. Must not be writable by group
    /// or others.
    pub state_dir: Option<PathBuf>,
    /// The admin socket; `state_dir/admin.sock` when unset.
    pub admin_socket: Option<PathBuf>,
    /// Run (no shell) for each new pending approval, with the approval as JSON on stdin.
    pub approval_notify: Vec<String>,
    /// Largest request body accepted, in bytes (262144 by default); a larger one gets 413
    /// `request_too_large`.
    pub max_request_bytes: u64,
    /// Time allowed to open the TCP connection to an upstream; for a lab config never more than
    /// its `upstream_timeout_seconds`.
    pub connect_timeout: Duration,
    /// Bounds on accepted connections (`[connections]`; the defaults for a lab config).
    pub connections: Connections,
    /// Browser origins allowed to call keygate; none by default, so a web page cannot.
    pub allowed_origins: Vec<String>,
    /// What the unauthenticated `/healthz` of a native config says.
    pub healthz: Healthz,
    /// Every configured secret, indexed by [`SecretId`]: where its value lives, not the value.
    pub secrets: Vec<SecretSpec>,
    /// Longest prefix first, so the first match is the most specific.
    pub routes: Vec<Route>,
    /// The agents that may call keygate, indexed by [`AgentId`].
    pub agents: Vec<Agent>,
    /// The lab broker's fields, kept for `/healthz` when the config came from its JSON format.
    pub seed: Option<SeedInfo>,
    /// Where tokens, freezes, approvals, budgets and rates live (`state`): the embedded store in
    /// `state_dir` unless a shared Redis/Valkey is configured.
    pub state: StateBackend,
    /// This keygate's name (`instance`), written in each audit record and pending approval;
    /// the host name when unset and the state is shared.
    pub instance: Option<String>,
    /// `[run]`: what `keygate run` also drops from the agent's environment and lets it reach.
    pub run: RunSettings,
    /// The forward proxy (`proxy_listen`, `egress`, …); no listener when `listen` is empty.
    pub proxy: ProxySettings,
}

/// Where the control-plane state lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum StateBackend {
    /// SQLite in `state_dir` (the default): one keygate.
    Embedded,
    /// A Redis or Valkey server shared by several keygates.
    Redis(RedisState),
}

/// `state = { backend = "redis", … }`: how to reach the shared store. Holds no password, only
/// the secret that has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RedisState {
    /// `redis://host:port/db` or `unix:/path` (`rediss://` implies `tls`).
    pub url: String,
    /// TLS to the server (`rediss://`).
    pub tls: bool,
    /// The ACL user (`AUTH username password`), if any.
    pub username: Option<String>,
    /// The secret (a `[secrets.NAME]` entry) that holds the password, if any.
    #[serde(skip)]
    pub password_from: Option<SecretId>,
    /// What a rate-limit decision does while the store is unreachable.
    pub rate_limits: FailMode,
    /// How old the replicated view of tokens and freezes may grow (no successful sync) before
    /// every request is refused with 503 `state_unavailable`.
    #[serde(with = "humantime_serde")]
    pub max_stale: Duration,
}

/// Whether a decision that needs an unreachable store refuses (`closed`) or lets the request
/// through, audited as such (`open`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailMode {
    /// Refuse with 503 `state_unavailable` (the default).
    FailClosed,
    /// Allow, and say so in the audit record (`state: "rate_fail_open"`).
    FailOpen,
}

/// The forward proxy's settings, checked: loopback listeners, the egress policy for hosts no
/// route names, the CONNECT ports allowed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProxySettings {
    /// `proxy_listen`: loopback `IP:PORT` only.
    pub listen: Vec<std::net::SocketAddr>,
    /// `egress`: what a CONNECT to a host no route names gets.
    pub egress: Egress,
    /// `egress_allow`: hosts (exact, or `*.suffix`) tunnelled without inspection.
    pub egress_allow: Vec<String>,
    /// `egress_connect`: where a tunnel to an allowed host connects instead of what DNS says
    /// (self-hosted mirrors, tests).
    pub egress_connect: Vec<(String, std::net::SocketAddr)>,
    /// `proxy_ports`: the ports a CONNECT may name (443 by default).
    pub ports: Vec<u16>,
}

/// `egress = "deny" | "tunnel"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    /// Only hosts a route names, or `egress_allow` lists (the default).
    #[default]
    Deny,
    /// Any other host is tunnelled without inspection (still audited).
    Tunnel,
}

/// `[run]`: settings for `keygate run`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunSettings {
    /// Variables removed from the agent's environment besides the built-in list of provider keys.
    pub drop_env: Vec<String>,
    /// Local TCP ports the sandboxed agent may connect to besides keygate's own (dev servers).
    pub allow_ports: Vec<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
/// The file format a config was written in, chosen by the file's extension.
pub enum Format {
    /// keygate's own TOML (`.toml`).
    Native,
    /// The lab broker's JSON (`.json`): its routes answer only `POST`, and a secret that cannot
    /// be fetched at start-up is fetched again at first use instead of stopping start-up.
    Seed,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
/// What keygate does with an allowed request (`mode`).
pub enum Mode {
    /// Forward it upstream with the credential attached (the default).
    Proxy,
    /// Answer with what would have been sent, the credential named by its key id; no secret is
    /// fetched and no upstream is contacted.
    DryRun,
}

#[derive(Clone, Debug, PartialEq, Eq)]
/// One address agents connect to.
pub enum Listen {
    /// A TCP address such as `127.0.0.1:8791`.
    Tcp(std::net::SocketAddr),
    /// A Unix socket (`unix:/path`, `~/` expanded); audit records name the connecting process.
    Unix(PathBuf),
    /// A TLS listener (`https://0.0.0.0:8443`) with the certificate in [`Config::tls`]: the
    /// backend mode, where agents on other machines connect.
    Tls(std::net::SocketAddr),
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Listen::Tcp(a) => s.collect_str(a),
            Listen::Unix(p) => s.collect_str(&format_args!("unix:{}", p.display())),
            Listen::Tls(a) => s.collect_str(&format_args!("https://{a}")),
        }
    }
}

/// The files of the TLS listeners (`tls = { cert, key, client_ca }`), read when keygate starts
/// and again at each `keygate reload`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
    /// PEM CA certificates; when set, every client must present a certificate they issued.
    pub client_ca: Option<PathBuf>,
}

/// One upstream keygate forwards to (`[routes.NAME]`): which requests reach it, what they may
/// do there and how the credential is attached.
#[derive(Debug, Serialize)]
pub struct Route {
    /// `NAME` in `[routes.NAME]` (`default` for a lab config); audit records and errors show it.
    pub name: String,
    /// What this route's audit records name, made once so that a record takes reference counts.
    #[serde(skip)]
    pub recorded: RouteNames,
    /// `/openai`; `/` for the lab's single route.
    pub prefix: String,
    /// Where matching requests go; the path after the prefix is appended to its base path.
    pub upstream: Upstream,
    /// The secret attached to requests, if any (`effective_policy` shows its name).
    #[serde(skip)]
    pub secret: Option<SecretId>,
    /// How the secret is attached to the upstream request (`inject`; bearer by default).
    pub inject: Inject,
    /// `METHOD /path` rules; a request matching none gets 403 `path_not_allowed`.
    pub allow: Vec<Rule>,
    /// A data classification label (`unclassified` by default), copied into the route's audit
    /// records; keygate does not act on it.
    pub classification: String,
    /// Headers set on every upstream request; none of them is the credential's header, a
    /// caller-credential header or a framing header (such a config is refused at load).
    #[serde(serialize_with = "ser_headers")]
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether a person must approve each request before it is forwarded.
    pub approval: Approval,
    /// Time allowed for the upstream's response headers, and between body chunks after that.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The lab broker refused bodies that are not JSON (400); its routes keep doing so.
    pub require_json: bool,
    /// What to do with a request that carries a secret or a credential.
    pub request_scan: RequestScan,
    /// A bound on the whole response, headers to last byte; `None` lets a stream run as long as
    /// it keeps moving.
    #[serde(skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub max_response_time: Option<Duration>,
    /// Output tokens a budgeted agent's request on this route books when its body names no
    /// `max_tokens`; overrides the agent's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_reserve: Option<u64>,
    /// Whether `Range` (and `If-Range`, `Request-Range`) go upstream; off, they are dropped.
    pub allow_range: bool,
    /// `[routes.R.env]`: variables `keygate run` sets for the agent, `{token}` and `{base_url}`
    /// filled in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// `placeholder_env`: the variable `keygate run` sets to the run's placeholder for this
    /// route (`crate::placeholder`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placeholder_env: Option<String>,
    /// `placeholder_in`: where beyond credential headers the placeholder is replaced.
    #[serde(skip_serializing_if = "crate::placeholder::Positions::is_empty")]
    pub placeholder_in: crate::placeholder::Positions,
    /// `host`: the forward proxy serves this host with this route (lower case, no port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `upstream_ca`: a PEM file of CAs trusted for this route's upstream besides the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca: Option<PathBuf>,
}

/// Bounds on every connection a listener accepts (`[connections]`), so idle or stalled peers
/// cannot hold keygate's file descriptors.
#[derive(Clone, Debug, Serialize)]
pub struct Connections {
    /// Time from accept to the first request head; a silent peer is closed after it.
    #[serde(with = "humantime_serde")]
    pub first_request_timeout: Duration,
    /// Time a connection may sit with no request in flight (HTTP/1 keep-alive and HTTP/2).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open connections per listener; when full the longest-idle one is closed, or the newcomer
    /// gets 503 `too_many_connections` when none is idle.
    pub max_per_listener: usize,
    /// Time allowed between request body chunks (408 `request_body_timeout`).
    #[serde(with = "humantime_serde")]
    pub request_body_timeout: Duration,
    /// Plain listeners also speak HTTP/2 with prior knowledge (h2c); when false they serve
    /// HTTP/1.1 directly, without looking for the HTTP/2 preface first.
    pub h2c: bool,
    /// How the runtime serves connections (fixed at start-up).
    pub runtime: Runtime,
    /// Who serves HTTP/1.1 connections (fixed at start-up).
    pub http1: Http1,
}

/// `connections.http1`: which HTTP/1.1 server serves plain and TLS HTTP/1.1 connections.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Http1 {
    /// keygate's own connection (`listen/h1.rs`) for ordinary requests, hyper for the rest.
    #[default]
    Keygate,
    /// hyper's HTTP/1.1 server for every request.
    Hyper,
}

/// `connections.runtime`: which async runtime serves connections.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    /// One work-stealing runtime with a thread per CPU.
    #[default]
    Shared,
    /// One single-threaded runtime per CPU; each connection stays on the thread it was given.
    PerCore,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_per_listener: 1024,
            request_body_timeout: Duration::from_secs(30),
            h2c: true,
            runtime: Runtime::default(),
            http1: Http1::default(),
        }
    }
}

/// What `/healthz` shows of a native config (`healthz`); the lab formats keep the lab's fields.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Healthz {
    /// `ok`, version, mode, audit state and policy version: nothing about routes or secrets.
    #[default]
    Brief,
    /// Also every route's prefix, upstream, secret source label and rules.
    Detail,
}

/// The request exfiltration scan: a request from an agent whose headers or body hold a secret
/// keygate holds, or something shaped like a credential, is refused or redacted.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
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
    /// No scan: requests are forwarded as the agent wrote them.
    Off,
}

impl RequestScan {
    /// Whether a finding refuses the request (the body is then read whole first).
    pub fn refuses(self) -> bool {
        matches!(self, RequestScan::Refuse | RequestScan::RefuseStrict)
    }
}

/// A route's upstream base URL, split once at load so no request parses it again.
#[derive(Clone, Debug, Serialize)]
pub struct Upstream {
    /// As written in config, for display.
    pub url: String,
    /// `http` or `https`; no other scheme is accepted.
    #[serde(skip)]
    pub scheme: http::uri::Scheme,
    /// `host[:port]`, also sent as the upstream request's `Host`; never holds credentials.
    #[serde(skip)]
    pub authority: http::uri::Authority,
    /// Host name, for audit `destination`.
    pub host: String,
    /// Path of the base URL without a trailing `/` (`""` for none); prepended to every request.
    pub base_path: String,
}

/// How a route attaches its secret to the upstream request (`inject`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Inject {
    /// `Authorization: Bearer <secret>`
    Bearer,
    /// `<name>: <format with {secret} replaced>`; format defaults to `{secret}`.
    Header {
        /// The header the credential goes in (`header:NAME`).
        #[serde(serialize_with = "ser_header_name")]
        name: HeaderName,
        /// The header's value (`inject_format`); always contains `{secret}`.
        format: String,
    },
    /// `Authorization: Basic base64(<username>:<secret>)`; without a username the secret is
    /// taken to be `user:password` already.
    Basic {
        /// `basic_username`; `None` when the secret is `user:password` already.
        username: Option<String>,
    },
    /// `?<name>=<secret>` appended to the query string.
    Query {
        /// The query parameter (`query:NAME`); the agent's own parameters of that name, in
        /// every spelling an upstream may read as it, are dropped first.
        name: String,
    },
    /// The request is signed with AWS Signature Version 4 by the route's AWS keys (a secret
    /// holding `{"AccessKeyId":…,"SecretAccessKey":…}`, as `aws-credentials` fetches); the
    /// agent's own signature headers are dropped.
    #[serde(rename = "aws_sigv4")]
    AwsSigV4 {
        /// The region signed for (`region`).
        region: String,
        /// The signing name of the service (`service`: `s3`, `bedrock`, …).
        service: String,
        /// Whether a streamed body is sent as `UNSIGNED-PAYLOAD` (S3 allows it); otherwise the
        /// body is read whole (up to `max_request_bytes`) and its hash signed.
        unsigned_payload: bool,
    },
}

impl Inject {
    /// Whether the body must be read whole before the credential is attached (its hash is
    /// signed).
    pub fn needs_whole_body(&self) -> bool {
        matches!(
            self,
            Inject::AwsSigV4 {
                unsigned_payload: false,
                ..
            }
        )
    }
}

/// `inject = "aws-sigv4"` with its route keys `region` and `service`.
pub(crate) fn sigv4_inject(
    region: Option<&str>,
    service: Option<&str>,
    has_secret: bool,
) -> Result<Inject, String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    };
    let (Some(region), Some(service)) = (region, service) else {
        return Err(
            "aws-sigv4 needs region and service (e.g. region = \"us-east-1\", service = \"s3\")"
                .into(),
        );
    };
    if !ok(region) || !ok(service) {
        return Err("region and service must be plain names such as us-east-1 and bedrock".into());
    }
    if !has_secret {
        return Err("aws-sigv4 needs secret = a secret with source = \"aws-credentials\"".into());
    }
    Ok(Inject::AwsSigV4 {
        region: region.into(),
        service: service.into(),
        unsigned_payload: service == "s3",
    })
}

/// Whether a person approves a route's requests before they are forwarded (`approval`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// No approval is asked for (the default).
    Never,
    /// A person approves each request over the admin socket (`keygate approve ID`); no answer
    /// within the timeout is 403 `approval_timeout`.
    Each {
        /// How long to wait for the person's answer (`approval_timeout`, 120 s by default).
        #[serde(with = "humantime_serde")]
        timeout: Duration,
    },
    /// A person approves the first request of each token on this route.
    OncePerToken {
        /// How long to wait for the person's answer (`approval_timeout`, 120 s by default).
        #[serde(with = "humantime_serde")]
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

/// A route's names in its audit records (`Record::route`): shared, since every request's
/// record carries them.
#[derive(Debug, Clone, Default)]
pub struct RouteNames {
    /// The route's name.
    pub route: Arc<str>,
    /// The host the route forwards to: the forward proxy's `host`, else the upstream's.
    pub destination: Arc<str>,
    /// The data classification label.
    pub classification: Arc<str>,
    /// The name of the route's secret, the key id until a value is fetched.
    pub secret: Option<Arc<str>>,
}

/// An agent's names in its audit records (`Record::agent`).
#[derive(Debug, Clone, Default)]
pub struct AgentNames {
    /// The agent's name.
    pub agent: Arc<str>,
    /// The person it acts for, if configured.
    pub person: Option<Arc<str>>,
}

/// A caller of keygate (`[agents.NAME]`): who it is, the token that proves it, and what it may
/// use.
#[derive(Debug, Serialize)]
pub struct Agent {
    /// `NAME` in `[agents.NAME]`; audit records show it as `agent`.
    pub name: String,
    /// `name` and `person` as audit records carry them, made once so that a record takes
    /// reference counts.
    #[serde(skip)]
    pub recorded: AgentNames,
    /// The person this agent acts for, recorded in audit.
    pub person: Option<String>,
    /// Environment variable holding this agent's token, read once at start-up.
    pub token_env: Option<String>,
    /// The lab broker without `client_token_env` let anyone on loopback call it; only its
    /// config can produce such an agent.
    pub open: bool,
    /// Routes this agent may use; `None` means every route (`effective_policy` shows names).
    #[serde(skip)]
    pub routes: Option<Vec<RouteId>>,
    /// Requests allowed per period (`rate = "60/min"`); over it, 429 `rate_limited`.
    pub rate: Option<Rate>,
    /// Tokens allowed per period (`budget_tokens`); a request that may cost more than is left
    /// gets 429 `budget_exhausted`.
    pub budget: Option<Budget>,
    /// Callers on a Unix listener with one of these peer uids are this agent, without a token.
    pub unix_uids: Vec<u32>,
    /// Output tokens this agent's request books when its body names no `max_tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_reserve: Option<u64>,
    /// A trusted front end names the person it calls for in this header (`person_header`); it
    /// becomes the audit `person` and keys the per-person limits. Read only after this agent
    /// authenticated; a request without it gets 400 `user_header_required`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_header_name"
    )]
    pub person_header: Option<HeaderName>,
    /// The subject of a verified client certificate that is this agent (`client_cert_subject`,
    /// e.g. `CN=ci-runner`), on a TLS listener with `client_ca`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_subject: Option<String>,
    /// Requests allowed per period for each person of this agent (`rate_per_person`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_person: Option<Rate>,
    /// Tokens allowed per period for each person of this agent (`budget_tokens_per_person`), on
    /// top of the agent's own budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_per_person: Option<Budget>,
}

/// An agent's token budget: at most `limit` tokens in each period of `per`, periods counted
/// from start-up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Budget {
    /// Tokens (input and output, as the upstream reports usage) allowed per period.
    pub limit: u64,
    /// Length of one period (`minute`, `hour`, `day` or a duration as written).
    #[serde(with = "humantime_serde")]
    pub per: Duration,
}

/// The lab broker's own settings, kept so `/healthz` answers as that broker did.
#[derive(Debug, Serialize)]
pub struct SeedInfo {
    /// `listen_host` as written: an IP address or `localhost`.
    pub listen_host: String,
    /// `listen_port` as written; `/healthz` shows the port actually bound (they differ for 0).
    pub listen_port: u16,
    /// `upstream_base_url` as written.
    pub upstream_base_url: String,
    /// `allowed_paths` as written: exact paths, each allowed for `POST`.
    pub allowed_paths: Vec<String>,
    /// Whether `client_token_env` is set, so callers must present a token.
    pub client_auth: bool,
    /// The secret's source label (`env:NAME`, `command:op read`, `none`), never its value.
    pub secret_source: String,
    /// Set when the file is the backend companion's config: its `secret_env`, if any.
    pub backend: Option<Option<String>>,
}

impl Config {
    /// Loads and validates a config file; the format follows the extension.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            key: "(file)".into(),
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Self::from_text(path, &text)
    }

    /// A config to serve needs a route: without one (an empty file, only comments) keygate
    /// would answer nothing but refusals. Other commands (`redact --config`, the hooks) may read
    /// a file that only names secrets.
    /// A forward proxy (`proxy_listen`) may serve egress rules alone.
    pub fn require_routes(&self) -> Result<(), ConfigError> {
        if self.routes.is_empty() && self.proxy.listen.is_empty() {
            return Err(ConfigError {
                file: self.file.clone(),
                line: 1,
                key: "routes".into(),
                message: "no routes: add a [routes.NAME] table with prefix and upstream".into(),
            });
        }
        Ok(())
    }

    /// Validates config text as if read from `path`: its extension picks the format, and errors
    /// name it.
    pub fn from_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let spec = match path.extension().and_then(|e| e.to_str()) {
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
        validate::validate(path, spec)
    }

    /// The secret a route attaches, if any.
    pub fn secret_of(&self, route: &Route) -> Option<&SecretSpec> {
        route.secret.map(|id| &self.secrets[id])
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
        let mut policy = serde_json::json!({
            "format": self.format,
            "mode": self.mode,
            "listen": self.listen,
            "tls": self.tls,
            "audit_log": self.audit_log,
            "audit_chain": self.audit_chain,
            "audit_fail_closed": self.audit_fail_closed,
            "max_request_bytes": self.max_request_bytes,
            "allowed_origins": self.allowed_origins,
            "approval_notify": self.approval_notify,
            "state": self.state,
            "secrets": secrets,
            "routes": self.routes.iter().map(|r| self.route_policy(r)).collect::<Vec<_>>(),
            "agents": self.agents.iter().map(|a| self.agent_policy(a)).collect::<Vec<_>>(),
        });
        // Egress decides requests too; written only with a proxy listener, so a config without
        // one keeps its policy version.
        if let (false, Some(m)) = (self.proxy.listen.is_empty(), policy.as_object_mut()) {
            m.insert(
                "proxy".into(),
                serde_json::to_value(&self.proxy).unwrap_or_default(),
            );
        }
        policy
    }

    /// A route as the policy shows it: ids by name, as written in config.
    fn route_policy(&self, r: &Route) -> serde_json::Value {
        let mut v = serde_json::to_value(r).unwrap_or_default();
        v["secret"] = self.secret_of(r).map(|s| s.name.as_str()).into();
        v
    }

    fn agent_policy(&self, a: &Agent) -> serde_json::Value {
        let mut v = serde_json::to_value(a).unwrap_or_default();
        v["routes"] = a
            .routes
            .as_ref()
            .map(|ids| {
                ids.iter()
                    .map(|&id| self.routes[id].name.as_str())
                    .collect::<Vec<_>>()
            })
            .into();
        v
    }

    /// A short hash of the effective policy, recorded in every audit record so a decision can be
    /// traced to the policy that made it.
    pub fn policy_version(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut policy = self.effective_policy();
        // Where records are written is not policy: `serve --audit-log` reports the version
        // `check` printed for the same file.
        if let Some(fields) = policy.as_object_mut() {
            fields.remove("audit_log");
        }
        let canonical = serde_json::to_vec(&policy).unwrap_or_default();
        hex::encode(&Sha256::digest(&canonical)[..6])
    }
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}; write a duration such as 30s, 15m or 1h"))
}

pub(crate) fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
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

fn ser_opt_header_name<S: serde::Serializer>(
    h: &Option<HeaderName>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match h {
        Some(h) => s.serialize_str(h.as_str()),
        None => s.serialize_none(),
    }
}

fn ser_header_name<S: serde::Serializer>(h: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(h.as_str())
}

/// 1-based line of a byte offset.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
