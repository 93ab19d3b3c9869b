//! The raw spec both file formats produce: what was written, where, and nothing checked yet.
//!
//! `native` (TOML) and `seed` (the lab broker's JSON) each deserialize their own serde types at
//! the edge and lower them into a [`Spec`]; [`super::validate`] is the one pass that checks a
//! spec and builds the [`super::Config`]. So a rule (a reserved header, a default, a duration's
//! lower bound) is written once and holds for both formats.
//!
//! A new key: add it to the format's raw serde type (`native.rs`, and `seed.rs` if the lab format
//! has it), lower it into a field here (`Option`, with an [`At`] when it can be wrong), and check
//! it and define its default in `validate.rs`.
//!
//! Every value that can be wrong carries a [`Pos`]: the line it was written on and the key to
//! name in the error, in the spelling of its own format (`routes.openai.timeout`,
//! `upstream_timeout_seconds`).

use std::path::PathBuf;

use super::{Format, Healthz, Mode, RequestScan};

/// Where a value was written: `file:line: key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pos {
    /// 1-based; 0 when no line can be named.
    pub line: usize,
    /// The key in its format's spelling, dotted for nested tables.
    pub key: String,
}

impl Pos {
    /// The position of `key`, written on `line`.
    pub(crate) fn new(line: usize, key: impl Into<String>) -> Pos {
        Pos {
            line,
            key: key.into(),
        }
    }

    /// A key inside this table, reported at the table's line (for a key that is missing).
    pub(crate) fn child(&self, key: &str) -> Pos {
        Pos::new(self.line, format!("{}.{key}", self.key))
    }
}

/// A value and where it was written.
#[derive(Clone, Debug)]
pub(crate) struct At<T> {
    pub value: T,
    pub pos: Pos,
}

impl<T> At<T> {
    /// `value`, written at `pos`.
    pub(crate) fn new(value: T, pos: Pos) -> At<T> {
        At { value, pos }
    }
}

/// A duration as the format writes it.
#[derive(Clone, Debug)]
pub(crate) enum Dur {
    /// humantime text: `30s`, `15m`, `1h`.
    Text(String),
    /// A JSON number of seconds (the lab broker's `*_seconds` keys).
    Seconds(f64),
}

/// A listener as the format writes it.
#[derive(Clone, Debug)]
pub(crate) enum ListenSpec {
    /// `127.0.0.1:8791` or `unix:/path`.
    Text(String),
    /// The lab broker's `listen_host` (an IP or `localhost`) and `listen_port`.
    HostPort(String, u16),
}

/// An allow rule as the format writes it.
#[derive(Clone, Debug)]
pub(crate) enum RuleSpec {
    /// `METHOD /path` with `*` and `**`.
    Pattern(String),
    /// One exact path for `POST` (the lab's `allowed_paths`): `*` in it is literal, and a
    /// request with a query string does not match (the lab compared the whole target).
    ExactPost(String),
}

/// A whole config as written; `None` is "not written", so the default is chosen in one place.
#[derive(Debug)]
pub(crate) struct Spec {
    pub format: Format,
    /// `None`: the default listener.
    pub listen: At<Option<Vec<ListenSpec>>>,
    pub allow_non_loopback: bool,
    /// `allow_plaintext_non_loopback`: a non-loopback listener without TLS.
    pub allow_plaintext_non_loopback: bool,
    /// `tls = { cert, key, client_ca }`, for `https://` listeners.
    pub tls: Option<At<TlsSpec>>,
    pub mode: Option<Mode>,
    pub audit_log: Option<PathBuf>,
    pub audit_chain: Option<bool>,
    pub audit_fail_closed: Option<bool>,
    pub state_dir: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    /// `state = { backend = … }`; `None` is the embedded store.
    pub state: Option<StateSpec>,
    /// `instance = "name"`.
    pub instance: Option<At<String>>,
    /// `approval_notify = [argv…]`.
    pub approval_notify: Option<At<Vec<String>>>,
    pub max_request_bytes: Option<u64>,
    /// Default for every route's `timeout`.
    pub upstream_timeout: Option<At<Dur>>,
    pub connect_timeout: Option<At<Dur>>,
    pub allowed_origins: Vec<String>,
    /// Default for every route's `request_scan`.
    pub request_scan: Option<RequestScan>,
    /// `[connections]`; the lab format has none.
    pub connections: Option<ConnectionsSpec>,
    pub secrets: Vec<SecretSpecRaw>,
    pub routes: Vec<RouteSpec>,
    pub agents: Vec<AgentSpec>,
    pub seed: Option<SeedSpec>,
    /// `[run]`: what `keygate run` drops and allows.
    pub run: RunSpec,
    /// `healthz = "detail"`: `/healthz` lists routes (native format only).
    pub healthz: Option<Healthz>,
    /// The forward-proxy keys; all absent in the lab format.
    pub proxy: ProxySpec,
}

/// `proxy_listen`, `egress`, `egress_allow`, `egress_connect`, `proxy_ports`.
#[derive(Debug, Default)]
pub(crate) struct ProxySpec {
    pub listen: Option<At<Vec<String>>>,
    pub egress: Option<At<String>>,
    pub egress_allow: Vec<At<String>>,
    /// `(host, "ip:port")`: where a tunnel to that allowed host connects instead of DNS.
    pub egress_connect: Vec<At<(String, String)>>,
    pub ports: Option<At<Vec<u16>>>,
}

/// A route's forward-proxy keys: `host` and `upstream_ca`.
#[derive(Debug, Default)]
pub(crate) struct RouteProxySpec {
    pub host: Option<At<String>>,
    pub upstream_ca: Option<At<PathBuf>>,
}

/// `[run]`: `drop_env = [names]`, `allow_ports = [ports]`.
#[derive(Debug, Default)]
pub(crate) struct RunSpec {
    pub drop_env: Vec<String>,
    pub allow_ports: Vec<u16>,
}

/// One `[secrets.NAME]` table, or the lab's `secret_source`.
#[derive(Debug, Default)]
pub(crate) struct SecretSpecRaw {
    pub name: String,
    /// The table, for errors about a key it lacks.
    pub table: Pos,
    pub source: At<String>,
    /// `env`: the variable's name.
    pub var: Option<String>,
    /// `file`: the file (`~/` is expanded); openbao: the path inside the mount.
    pub path: Option<String>,
    pub argv: Option<Vec<String>>,
    /// `command`: variables passed through to it (its environment is otherwise cleared).
    pub env: Option<Vec<String>>,
    pub timeout: Option<At<Dur>>,
    pub ttl: Option<At<Dur>>,
    /// `startup` (the default) or `first-use`.
    pub fetch: Option<At<String>>,
    pub address: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    pub mount: Option<String>,
    pub field: Option<String>,
    pub secret_id: Option<String>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub profile: Option<String>,
    /// openbao (and oauth2, github-app): a PEM CA file, the login (`auth`, `auth_mount`, `role_id`, `role`, and the
    /// secrets holding the AppRole secret id or the JWT), a dynamic secret's path and params.
    pub ca_file: Option<String>,
    pub auth: Option<String>,
    pub auth_mount: Option<String>,
    pub role_id: Option<String>,
    pub role: Option<String>,
    pub secret_id_from: Option<String>,
    pub jwt_from: Option<String>,
    pub dynamic: Option<String>,
    pub params: Option<std::collections::BTreeMap<String, String>>,
    /// openbao dynamic: the bound on outstanding leases.
    pub max_leases: Option<At<usize>>,
    /// `oauth2` and `github-app`.
    pub token: TokenKeys,
}

/// The keys of the token-minting sources (`oauth2`, `github-app`), as written.
#[derive(Debug, Default)]
pub(crate) struct TokenKeys {
    pub token_url: Option<String>,
    pub grant: Option<String>,
    pub client_id: Option<String>,
    /// The name of another secret.
    pub client_secret: Option<String>,
    pub client_auth: Option<String>,
    /// The name of another secret.
    pub refresh_token: Option<String>,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub app_id: Option<String>,
    pub installation_id: Option<String>,
    /// The name of another secret.
    pub private_key: Option<String>,
    pub api_url: Option<String>,
    /// `keychain`: the entry's service and account.
    pub service: Option<String>,
    pub account: Option<String>,
}

impl Default for Pos {
    fn default() -> Pos {
        Pos::new(1, "")
    }
}

impl Default for At<String> {
    fn default() -> At<String> {
        At::new(String::new(), Pos::default())
    }
}

/// One `[routes.NAME]` table, or the lab's single route at `/`.
#[derive(Debug)]
pub(crate) struct RouteSpec {
    pub name: String,
    pub prefix: At<String>,
    pub upstream: At<String>,
    pub secret: Option<At<String>>,
    pub inject: Option<At<String>>,
    /// `request`, `run` or `ttl` for a dynamic OpenBao secret.
    pub jit: Option<At<String>>,
    pub inject_format: Option<String>,
    pub basic_username: Option<String>,
    pub allow: Vec<At<RuleSpec>>,
    pub classification: Option<String>,
    /// `(name, value)` as written.
    pub extra_headers: Vec<At<(String, String)>>,
    pub approval: Option<At<String>>,
    pub approval_timeout: Option<At<Dur>>,
    pub timeout: Option<At<Dur>>,
    pub require_json: Option<bool>,
    pub request_scan: Option<RequestScan>,
    pub allow_range: Option<bool>,
    pub budget_reserve: Option<u64>,
    pub max_response_time: Option<At<Dur>>,
    /// `repositories` and `permissions`: what a `github-app` token is narrowed to.
    pub github_scope: Option<At<crate::secret::github_app::Scope>>,
    /// `query = ["beta"]`: the query parameters this route's rules allow, unless a rule names
    /// its own (`POST /v1/messages?beta`).
    pub query: Option<At<Vec<String>>>,
    /// `inject = "aws-sigv4"`: region and service the request is signed for.
    pub region: Option<String>,
    pub service: Option<String>,
    /// `[routes.R.env]`: `(name, template)` as written, for `keygate run`.
    pub env: Vec<At<(String, String)>>,
    /// The variable `keygate run` sets to the route's placeholder.
    pub placeholder_env: Option<At<String>>,
    /// Where else the placeholder is replaced: `"query"`, `"body"`.
    pub placeholder_in: Option<At<Vec<String>>>,
    /// `host`, `upstream_ca`: the forward proxy's keys.
    pub proxy: RouteProxySpec,
}

/// One `[agents.NAME]` table, or the lab's single agent.
#[derive(Debug)]
pub(crate) struct AgentSpec {
    pub name: String,
    pub person: Option<String>,
    pub token_env: Option<String>,
    pub open: bool,
    /// Route names; `None` means every route.
    pub routes: Option<At<Vec<String>>>,
    pub rate: Option<At<String>>,
    /// `(per, limit)`.
    pub budget: Option<At<(String, u64)>>,
    pub budget_reserve: Option<At<u64>>,
    /// `unix_uids = [1001]`: Unix-socket peers that are this agent.
    pub unix_uids: Vec<u32>,
    /// `person_header = "X-User-Id"`: this agent is a trusted front end that names the person.
    pub person_header: Option<At<String>>,
    /// `client_cert_subject = "CN=…"`: a verified client certificate with this subject is this
    /// agent.
    pub client_cert_subject: Option<At<String>>,
    pub rate_per_person: Option<At<String>>,
    /// `(per, limit)`.
    pub budget_per_person: Option<At<(String, u64)>>,
}

/// `tls = { cert = FILE, key = FILE, client_ca = FILE }`.
#[derive(Clone, Debug)]
pub(crate) struct TlsSpec {
    pub cert: String,
    pub key: String,
    pub client_ca: Option<String>,
}

/// `[connections]`: bounds on every accepted connection.
#[derive(Debug)]
pub(crate) struct ConnectionsSpec {
    pub first_request_timeout: Option<At<Dur>>,
    pub idle_timeout: Option<At<Dur>>,
    pub max_per_listener: Option<At<usize>>,
    pub request_body_timeout: Option<At<Dur>>,
    pub h2c: Option<bool>,
    pub runtime: Option<crate::config::Runtime>,
    pub http1: Option<crate::config::Http1>,
}

/// The lab broker's own fields, echoed by `/healthz`.
#[derive(Debug)]
pub(crate) struct SeedSpec {
    pub listen_host: String,
    pub listen_port: u16,
    pub upstream_base_url: String,
    pub allowed_paths: Vec<String>,
    pub client_auth: bool,
    /// The backend companion's `secret_env` when the file is its config (`backend_token_env`).
    pub backend: Option<BackendSpec>,
}

/// What the lab's backend companion (`backend-broker/server.py`) adds to the lab broker.
#[derive(Debug, Clone)]
pub(crate) struct BackendSpec {
    /// `secret_env`: the variable holding the provider key, named in dry-run answers.
    pub secret_env: Option<String>,
}

/// `state = { backend, url, tls, username, password_from, rate_limits, max_stale }` as written.
#[derive(Debug)]
pub(crate) struct StateSpec {
    /// The inline table, for errors about a key it lacks.
    pub table: Pos,
    pub backend: At<String>,
    pub url: Option<At<String>>,
    pub tls: Option<bool>,
    pub username: Option<String>,
    pub password_from: Option<At<String>>,
    pub rate_limits: Option<At<String>>,
    pub max_stale: Option<At<Dur>>,
}
