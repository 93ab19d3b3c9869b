//! The native TOML format (`keygate.toml`). Raw serde types stay here, at the edge, and are
//! lowered into the common [`Spec`]; values checked after parsing are `Spanned` so an error can
//! name the line they were written on.

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::Deserialize;

use super::schema::Spanned;

use super::spec::{
    AgentSpec, At, ConnectionsSpec, Dur, ListenSpec, Pos, RouteSpec, RuleSpec, SecretSpecRaw, Spec,
    StateSpec,
};
use super::*;

/// keygate's native config (`keygate.toml`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "NativeConfig")]
struct Raw {
    listen: Option<Spanned<Vec<String>>>,
    allow_non_loopback: Option<bool>,
    allow_plaintext_non_loopback: Option<bool>,
    tls: Option<Spanned<RawTls>>,
    mode: Option<Mode>,
    audit_log: Option<String>,
    audit_chain: Option<bool>,
    audit_fail_closed: Option<bool>,
    state_dir: Option<String>,
    admin_socket: Option<String>,
    state: Option<Spanned<RawState>>,
    instance: Option<Spanned<String>>,
    approval_notify: Option<Spanned<Vec<String>>>,
    max_request_bytes: Option<u64>,
    upstream_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    allowed_origins: Option<Vec<String>>,
    request_scan: Option<RequestScan>,
    connections: Option<RawConnections>,
    #[serde(default)]
    secrets: BTreeMap<String, RawSecret>,
    #[serde(default)]
    routes: BTreeMap<String, RawRoute>,
    #[serde(default)]
    agents: BTreeMap<String, RawAgent>,
    run: Option<RawRun>,
    /// `brief` (default): `/healthz` says only ok, version and mode; `detail` adds the routes.
    healthz: Option<Healthz>,
    /// The forward proxy (issue 15): `proxy_listen`, `egress`, `egress_allow`, …
    proxy_listen: Option<Spanned<Vec<String>>>,
    egress: Option<Spanned<String>>,
    #[serde(default)]
    egress_allow: Vec<Spanned<String>>,
    #[serde(default)]
    egress_connect: BTreeMap<String, Spanned<String>>,
    proxy_ports: Option<Spanned<Vec<u16>>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Run")]
struct RawRun {
    #[serde(default)]
    drop_env: Vec<String>,
    #[serde(default)]
    allow_ports: Vec<u16>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Tls")]
struct RawTls {
    cert: String,
    key: String,
    client_ca: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "State")]
struct RawState {
    backend: Spanned<String>,
    url: Option<Spanned<String>>,
    tls: Option<bool>,
    username: Option<String>,
    password_from: Option<Spanned<String>>,
    rate_limits: Option<Spanned<String>>,
    max_stale: Option<Spanned<String>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Connections")]
struct RawConnections {
    first_request_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_per_listener: Option<Spanned<usize>>,
    request_body_timeout: Option<Spanned<String>>,
    /// `true` (default): plain listeners also speak h2c; `false`: HTTP/1.1 only.
    h2c: Option<bool>,
    /// `"shared"` (default) or `"per-core"`.
    runtime: Option<crate::config::Runtime>,
    /// `"keygate"` (default) or `"hyper"`.
    http1: Option<crate::config::Http1>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Secret")]
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
    /// aws-secrets-manager, aws-credentials: the shared-file profile of keygate's AWS keys.
    profile: Option<String>,
    // openbao: TLS, login, dynamic secrets
    ca_file: Option<String>,
    auth: Option<String>,
    auth_mount: Option<String>,
    role_id: Option<String>,
    role: Option<String>,
    secret_id_from: Option<String>,
    jwt_from: Option<String>,
    dynamic: Option<String>,
    params: Option<BTreeMap<String, String>>,
    /// openbao dynamic: how many leases may be outstanding at once.
    max_leases: Option<Spanned<usize>>,
    // oauth2, github-app
    token_url: Option<String>,
    grant: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_auth: Option<String>,
    refresh_token: Option<String>,
    scope: Option<String>,
    audience: Option<String>,
    app_id: Option<IdText>,
    installation_id: Option<IdText>,
    private_key: Option<String>,
    api_url: Option<String>,
    // keychain
    service: Option<String>,
    account: Option<String>,
}

/// An id GitHub shows as a number and users may quote.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum IdText {
    Number(u64),
    Text(String),
}

impl IdText {
    fn text(&self) -> String {
        match self {
            IdText::Number(n) => n.to_string(),
            IdText::Text(t) => t.clone(),
        }
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Route")]
struct RawRoute {
    prefix: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
    /// The forward proxy: the host this route serves, and an extra CA for its upstream.
    host: Option<Spanned<String>>,
    upstream_ca: Option<Spanned<String>>,
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
    /// `github-app` secrets: the repositories and permissions the route's token is narrowed to.
    repositories: Option<Spanned<Vec<String>>>,
    permissions: Option<Spanned<BTreeMap<String, String>>>,
    query: Option<Spanned<Vec<String>>>,
    /// `inject = "aws-sigv4"`: the region and signing name of the service.
    region: Option<String>,
    service: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    /// `request`, `run` or `ttl`: how long a dynamic OpenBao credential serves.
    jit: Option<Spanned<String>>,
    placeholder_env: Option<Spanned<String>>,
    placeholder_in: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Agent")]
struct RawAgent {
    person: Option<String>,
    token_env: Option<String>,
    routes: Option<Spanned<Vec<String>>>,
    rate: Option<Spanned<String>>,
    budget_tokens: Option<Spanned<RawBudget>>,
    budget_reserve: Option<Spanned<u64>>,
    #[serde(default)]
    unix_uids: Vec<u32>,
    person_header: Option<Spanned<String>>,
    client_cert_subject: Option<Spanned<String>>,
    rate_per_person: Option<Spanned<String>>,
    budget_tokens_per_person: Option<Spanned<RawBudget>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Budget")]
struct RawBudget {
    per: String,
    limit: u64,
}

/// Byte offsets to `file:line: key` positions.
struct Lines<'a> {
    text: &'a str,
}

impl Lines<'_> {
    fn at<T>(&self, v: &Spanned<T>, key: impl Into<String>) -> Pos {
        Pos::new(line_of(self.text, v.span().start), key)
    }

    fn spanned<T: Clone>(&self, v: &Spanned<T>, key: impl Into<String>) -> At<T> {
        At::new(v.get_ref().clone(), self.at(v, key))
    }

    fn dur(&self, v: &Option<Spanned<String>>, key: impl Into<String>) -> Option<At<Dur>> {
        v.as_ref()
            .map(|v| At::new(Dur::Text(v.get_ref().clone()), self.at(v, key)))
    }

    /// The line of a table header such as `[routes.openai]`, for errors about a missing key.
    fn table(&self, header: &str) -> Pos {
        let needle = format!("[{header}]");
        let line = self
            .text
            .find(&needle)
            .map(|o| line_of(self.text, o))
            .unwrap_or(0);
        Pos::new(line, header)
    }
}

/// The native format's schema, a definition in `generator`.
pub(super) fn schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    generator.subschema_for::<Raw>()
}

pub(super) fn parse(file: &Path, text: &str) -> Result<Spec, ConfigError> {
    let raw: Raw = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
    let lines = Lines { text };

    let listen = match &raw.listen {
        Some(l) => At::new(
            Some(l.get_ref().iter().cloned().map(ListenSpec::Text).collect()),
            lines.at(l, "listen"),
        ),
        None => At::new(None, Pos::new(1, "listen")),
    };
    let secrets = raw
        .secrets
        .iter()
        .map(|(name, s)| {
            let table = format!("secrets.{name}");
            let key = |k: &str| format!("{table}.{k}");
            SecretSpecRaw {
                name: name.clone(),
                table: lines.table(&table),
                source: lines.spanned(&s.source, key("source")),
                var: s.name.clone(),
                path: s.path.clone(),
                argv: s.argv.clone(),
                env: s.env.clone(),
                timeout: lines.dur(&s.timeout, key("timeout")),
                ttl: lines.dur(&s.ttl, key("ttl")),
                fetch: s.fetch.as_ref().map(|f| lines.spanned(f, key("fetch"))),
                address: s.address.clone(),
                token_env: s.token_env.clone(),
                token_file: s.token_file.clone(),
                mount: s.mount.clone(),
                field: s.field.clone(),
                secret_id: s.secret_id.clone(),
                region: s.region.clone(),
                endpoint: s.endpoint.clone(),
                token: super::spec::TokenKeys {
                    token_url: s.token_url.clone(),
                    grant: s.grant.clone(),
                    client_id: s.client_id.clone(),
                    client_secret: s.client_secret.clone(),
                    client_auth: s.client_auth.clone(),
                    refresh_token: s.refresh_token.clone(),
                    scope: s.scope.clone(),
                    audience: s.audience.clone(),
                    app_id: s.app_id.as_ref().map(IdText::text),
                    installation_id: s.installation_id.as_ref().map(IdText::text),
                    private_key: s.private_key.clone(),
                    api_url: s.api_url.clone(),
                    service: s.service.clone(),
                    account: s.account.clone(),
                },
                profile: s.profile.clone(),
                ca_file: s.ca_file.clone(),
                auth: s.auth.clone(),
                auth_mount: s.auth_mount.clone(),
                role_id: s.role_id.clone(),
                role: s.role.clone(),
                secret_id_from: s.secret_id_from.clone(),
                jwt_from: s.jwt_from.clone(),
                dynamic: s.dynamic.clone(),
                params: s.params.clone(),
                max_leases: s
                    .max_leases
                    .as_ref()
                    .map(|m| lines.spanned(m, key("max_leases"))),
            }
        })
        .collect();
    let routes = raw
        .routes
        .iter()
        .map(|(name, r)| {
            let key = |k: &str| format!("routes.{name}.{k}");
            RouteSpec {
                name: name.clone(),
                // A route the forward proxy serves by host needs neither; an empty prefix is
                // "not served by path", and the upstream defaults to https://HOST.
                prefix: match &r.prefix {
                    Some(p) => lines.spanned(p, key("prefix")),
                    None => At::new(String::new(), lines.table(&format!("routes.{name}"))),
                },
                upstream: match (&r.upstream, &r.host) {
                    (Some(u), _) => lines.spanned(u, key("upstream")),
                    (None, Some(h)) => {
                        At::new(format!("https://{}", h.get_ref()), lines.at(h, key("host")))
                    }
                    (None, None) => At::new(String::new(), lines.table(&format!("routes.{name}"))),
                },
                proxy: super::spec::RouteProxySpec {
                    host: r.host.as_ref().map(|h| lines.spanned(h, key("host"))),
                    upstream_ca: r.upstream_ca.as_ref().map(|c| {
                        At::new(expand_home(c.get_ref()), lines.at(c, key("upstream_ca")))
                    }),
                },
                secret: r.secret.as_ref().map(|s| lines.spanned(s, key("secret"))),
                inject: r.inject.as_ref().map(|i| lines.spanned(i, key("inject"))),
                jit: r.jit.as_ref().map(|j| lines.spanned(j, key("jit"))),
                inject_format: r.inject_format.clone(),
                basic_username: r.basic_username.clone(),
                allow: r
                    .allow
                    .iter()
                    .map(|a| {
                        At::new(
                            RuleSpec::Pattern(a.get_ref().clone()),
                            lines.at(a, key("allow")),
                        )
                    })
                    .collect(),
                classification: r.classification.clone(),
                extra_headers: r
                    .extra_headers
                    .iter()
                    .map(|(k, v)| {
                        At::new(
                            (k.clone(), v.get_ref().clone()),
                            lines.at(v, key("extra_headers")),
                        )
                    })
                    .collect(),
                approval: r
                    .approval
                    .as_ref()
                    .map(|a| lines.spanned(a, key("approval"))),
                approval_timeout: lines.dur(&r.approval_timeout, key("approval_timeout")),
                timeout: lines.dur(&r.timeout, key("timeout")),
                require_json: r.require_json,
                request_scan: r.request_scan,
                allow_range: r.allow_range,
                budget_reserve: r.budget_reserve,
                max_response_time: lines.dur(&r.max_response_time, key("max_response_time")),
                github_scope: github_scope(&lines, r, &key),
                query: r.query.as_ref().map(|q| lines.spanned(q, key("query"))),
                placeholder_env: r
                    .placeholder_env
                    .as_ref()
                    .map(|v| lines.spanned(v, key("placeholder_env"))),
                placeholder_in: r
                    .placeholder_in
                    .as_ref()
                    .map(|v| lines.spanned(v, key("placeholder_in"))),
                region: r.region.clone(),
                service: r.service.clone(),
                env: r
                    .env
                    .iter()
                    .map(|(k, v)| {
                        At::new((k.clone(), v.get_ref().clone()), lines.at(v, key("env")))
                    })
                    .collect(),
            }
        })
        .collect();
    let agents = raw
        .agents
        .iter()
        .map(|(name, a)| {
            let key = |k: &str| format!("agents.{name}.{k}");
            AgentSpec {
                name: name.clone(),
                person: a.person.clone(),
                token_env: a.token_env.clone(),
                open: false,
                routes: a.routes.as_ref().map(|r| lines.spanned(r, key("routes"))),
                rate: a.rate.as_ref().map(|r| lines.spanned(r, key("rate"))),
                budget_reserve: a
                    .budget_reserve
                    .as_ref()
                    .map(|r| lines.spanned(r, key("budget_reserve"))),
                budget: a.budget_tokens.as_ref().map(|b| {
                    let v = b.get_ref();
                    At::new((v.per.clone(), v.limit), lines.at(b, key("budget_tokens")))
                }),
                unix_uids: a.unix_uids.clone(),
                person_header: a
                    .person_header
                    .as_ref()
                    .map(|h| lines.spanned(h, key("person_header"))),
                client_cert_subject: a
                    .client_cert_subject
                    .as_ref()
                    .map(|h| lines.spanned(h, key("client_cert_subject"))),
                rate_per_person: a
                    .rate_per_person
                    .as_ref()
                    .map(|r| lines.spanned(r, key("rate_per_person"))),
                budget_per_person: a.budget_tokens_per_person.as_ref().map(|b| {
                    let v = b.get_ref();
                    At::new(
                        (v.per.clone(), v.limit),
                        lines.at(b, key("budget_tokens_per_person")),
                    )
                }),
            }
        })
        .collect();

    Ok(Spec {
        format: Format::Native,
        listen,
        allow_non_loopback: raw.allow_non_loopback.unwrap_or(false),
        allow_plaintext_non_loopback: raw.allow_plaintext_non_loopback.unwrap_or(false),
        tls: raw.tls.as_ref().map(|t| {
            let v = t.get_ref();
            At::new(
                super::spec::TlsSpec {
                    cert: v.cert.clone(),
                    key: v.key.clone(),
                    client_ca: v.client_ca.clone(),
                },
                lines.at(t, "tls"),
            )
        }),
        mode: raw.mode,
        audit_log: raw.audit_log.as_deref().map(expand_home),
        audit_chain: raw.audit_chain,
        audit_fail_closed: raw.audit_fail_closed,
        state_dir: raw.state_dir.as_deref().map(expand_home),
        admin_socket: raw.admin_socket.as_deref().map(expand_home),
        state: raw.state.as_ref().map(|st| {
            let v = st.get_ref();
            let key = |k: &str| format!("state.{k}");
            StateSpec {
                table: lines.at(st, "state"),
                backend: lines.spanned(&v.backend, key("backend")),
                url: v.url.as_ref().map(|u| lines.spanned(u, key("url"))),
                tls: v.tls,
                username: v.username.clone(),
                password_from: v
                    .password_from
                    .as_ref()
                    .map(|p| lines.spanned(p, key("password_from"))),
                rate_limits: v
                    .rate_limits
                    .as_ref()
                    .map(|r| lines.spanned(r, key("rate_limits"))),
                max_stale: lines.dur(&v.max_stale, key("max_stale")),
            }
        }),
        instance: raw.instance.as_ref().map(|i| lines.spanned(i, "instance")),
        approval_notify: raw
            .approval_notify
            .as_ref()
            .map(|a| lines.spanned(a, "approval_notify")),
        max_request_bytes: raw.max_request_bytes,
        upstream_timeout: lines.dur(&raw.upstream_timeout, "upstream_timeout"),
        connect_timeout: lines.dur(&raw.connect_timeout, "connect_timeout"),
        allowed_origins: raw.allowed_origins.unwrap_or_default(),
        request_scan: raw.request_scan,
        connections: raw.connections.as_ref().map(|c| {
            let key = |k: &str| format!("connections.{k}");
            ConnectionsSpec {
                first_request_timeout: lines
                    .dur(&c.first_request_timeout, key("first_request_timeout")),
                idle_timeout: lines.dur(&c.idle_timeout, key("idle_timeout")),
                max_per_listener: c
                    .max_per_listener
                    .as_ref()
                    .map(|m| lines.spanned(m, key("max_per_listener"))),
                request_body_timeout: lines
                    .dur(&c.request_body_timeout, key("request_body_timeout")),
                h2c: c.h2c,
                runtime: c.runtime,
                http1: c.http1,
            }
        }),
        secrets,
        routes,
        agents,
        seed: None,
        run: raw
            .run
            .map(|r| super::spec::RunSpec {
                drop_env: r.drop_env,
                allow_ports: r.allow_ports,
            })
            .unwrap_or_default(),
        healthz: raw.healthz,
        proxy: super::spec::ProxySpec {
            listen: raw
                .proxy_listen
                .as_ref()
                .map(|l| lines.spanned(l, "proxy_listen")),
            egress: raw.egress.as_ref().map(|e| lines.spanned(e, "egress")),
            egress_allow: raw
                .egress_allow
                .iter()
                .map(|a| lines.spanned(a, "egress_allow"))
                .collect(),
            egress_connect: raw
                .egress_connect
                .iter()
                .map(|(k, v)| {
                    At::new(
                        (k.clone(), v.get_ref().clone()),
                        lines.at(v, "egress_connect"),
                    )
                })
                .collect(),
            ports: raw
                .proxy_ports
                .as_ref()
                .map(|p| lines.spanned(p, "proxy_ports")),
        },
    })
}

/// A route's `repositories` and `permissions`, at the line of whichever was written first.
fn github_scope(
    lines: &Lines<'_>,
    r: &RawRoute,
    key: &dyn Fn(&str) -> String,
) -> Option<At<crate::secret::github_app::Scope>> {
    let pos = match (&r.repositories, &r.permissions) {
        (Some(v), _) => lines.at(v, key("repositories")),
        (None, Some(v)) => lines.at(v, key("permissions")),
        (None, None) => return None,
    };
    let scope = crate::secret::github_app::Scope {
        repositories: r
            .repositories
            .as_ref()
            .map(|v| v.get_ref().clone())
            .unwrap_or_default(),
        permissions: r
            .permissions
            .as_ref()
            .map(|v| v.get_ref().clone())
            .unwrap_or_default(),
    };
    Some(At::new(scope, pos))
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
        let names: Vec<&str> = c.agents[0]
            .routes
            .iter()
            .flatten()
            .map(|&id| c.routes[id].name.as_str())
            .collect();
        assert_eq!(names, ["openai", "anthropic"]);
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
    fn route_env_for_keygate_run_is_read_and_a_bad_template_names_its_line() {
        let c = load("[run]\ndrop_env = [\"MY_TOKEN\"]\nallow_ports = [3000]\n[routes.a]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\n[routes.a.env]\nA_TOKEN = \"{token}\"\nA_URL = \"{base_url}/v1\"\n").unwrap();
        assert_eq!(c.routes[0].env.len(), 2);
        assert_eq!(c.run.drop_env, ["MY_TOKEN"]);
        assert_eq!(c.run.allow_ports, [3000]);
        let e = load("[routes.a]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\n[routes.a.env]\nA_TOKEN = \"{secret}\"\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (5, "routes.a.env"), "{e}");
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
    fn a_route_query_key_constrains_rules_that_name_no_query() {
        let c = load(&format!(
            "{ROUTE}query = [\"beta\"]\nallow = [\"POST /v1/messages\", \"GET /v1/models?limit\"]\n"
        ))
        .unwrap();
        let post = http::Method::POST;
        let get = http::Method::GET;
        let rules = &c.routes[0].allow;
        assert!(rules[0].matches(&post, "/v1/messages", Some("beta=true")));
        assert!(!rules[0].matches(&post, "/v1/messages", Some("x=1")));
        assert!(rules[1].matches(&get, "/v1/models", Some("limit=2")));
        assert!(!rules[1].matches(&get, "/v1/models", Some("beta=1")));
    }

    #[test]
    fn tls_and_https_listeners_go_together() {
        let https = "listen = [\"https://0.0.0.0:8443\"]\n";
        let e = load(https).unwrap_err();
        assert_eq!(e.key, "listen", "{e}");
        let tls = "tls = { cert = \"c.pem\", key = \"k.pem\" }\n";
        let e = load(tls).unwrap_err();
        assert_eq!(e.key, "tls", "{e}");
        let c = load(&format!("{https}{tls}")).unwrap();
        assert_eq!(c.listen, vec![Listen::Tls("0.0.0.0:8443".parse().unwrap())]);
        let e = load(&format!(
            "{https}{tls}[agents.ci]\nclient_cert_subject = \"CN=ci\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "agents.ci.client_cert_subject", "{e}");
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
