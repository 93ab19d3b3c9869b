//! Validation of the token-minting sources, `oauth2` and `github-app`, and of the per-route
//! scope of a GitHub App token. Both take credentials from other secrets by name
//! (`client_secret = "NAME"`), resolved here to a copy of that secret's spec; such a secret must
//! be a plain source, so references cannot form a cycle.

use std::sync::Arc;

use super::super::spec::{RouteSpec, SecretSpecRaw};
use super::{expand_home, Cx, DEFAULT_COMMAND_TIMEOUT};
use crate::config::{ConfigError, Route, SecretId};
use crate::secret::github_app::{GitHubApp, GitHubAppSettings, Scope};
use crate::secret::oauth2::{ClientAuth, Grant, OAuth2, OAuth2Settings};
use crate::secret::{SecretSource, SecretSpec};

/// The sources that read other secrets; none of them may be read by another.
const MINTING: &[&str] = &["oauth2", "oauth2-client-credentials", "github-app"];

/// `source = "oauth2"` (and the older `oauth2-client-credentials`).
pub(super) fn oauth2(
    cx: &Cx,
    s: &SecretSpecRaw,
    all: &[SecretSpecRaw],
) -> Result<SecretSource, ConfigError> {
    let t = &s.token;
    let at = |k: &str| s.table.child(k);
    let token_url = match &t.token_url {
        Some(u) => u.clone(),
        None => return cx.err(&at("token_url"), "source oauth2 needs token_url"),
    };
    check_url(&token_url).or_else(|m| cx.err(&at("token_url"), m))?;
    let default_grant = if s.source.value == "oauth2-client-credentials" {
        "client_credentials"
    } else {
        t.grant.as_deref().unwrap_or("client_credentials")
    };
    let grant = match default_grant {
        "client_credentials" => Grant::ClientCredentials,
        "refresh_token" => match &t.refresh_token {
            Some(r) => Grant::RefreshToken {
                initial: referenced(cx, s, "refresh_token", r, all)?,
            },
            None => {
                return cx.err(
                    &at("refresh_token"),
                    "grant refresh_token needs refresh_token = \"NAME\" (the secret holding the first refresh token)",
                )
            }
        },
        other => {
            return cx.err(
                &at("grant"),
                format!("unknown grant {other:?}; use client_credentials or refresh_token"),
            )
        }
    };
    let client_id = match &t.client_id {
        Some(c) if !c.is_empty() => c.clone(),
        _ => return cx.err(&at("client_id"), "source oauth2 needs client_id"),
    };
    let client_secret = match &t.client_secret {
        Some(c) => Some(referenced(cx, s, "client_secret", c, all)?),
        None => None,
    };
    if client_secret.is_none() && matches!(grant, Grant::ClientCredentials) {
        return cx.err(
            &at("client_secret"),
            "grant client_credentials needs client_secret = \"NAME\" (the secret holding it)",
        );
    }
    let client_auth = match t.client_auth.as_deref() {
        None | Some("basic") => ClientAuth::Basic,
        Some("post") => ClientAuth::Post,
        Some(other) => {
            return cx.err(
                &at("client_auth"),
                format!("unknown client_auth {other:?}; use basic or post"),
            )
        }
    };
    Ok(SecretSource::OAuth2(Arc::new(OAuth2::new(
        OAuth2Settings {
            token_url,
            grant,
            client_id,
            client_secret,
            client_auth,
            scope: t.scope.clone(),
            audience: t.audience.clone(),
            ca_file: s.ca_file.as_deref().map(expand_home),
            timeout: cx.duration_or(&s.timeout, DEFAULT_COMMAND_TIMEOUT)?,
        },
    ))))
}

/// `source = "github-app"`.
pub(super) fn github_app(
    cx: &Cx,
    s: &SecretSpecRaw,
    all: &[SecretSpecRaw],
) -> Result<SecretSource, ConfigError> {
    let t = &s.token;
    let at = |k: &str| s.table.child(k);
    let app_id = match &t.app_id {
        Some(a) if !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric()) => a.clone(),
        Some(_) => return cx.err(&at("app_id"), "app_id must be the app's id or client id"),
        None => return cx.err(&at("app_id"), "source github-app needs app_id"),
    };
    let installation_id = match t.installation_id.as_deref().map(str::parse::<u64>) {
        Some(Ok(n)) => n,
        Some(Err(_)) => return cx.err(&at("installation_id"), "installation_id must be a number"),
        None => {
            return cx.err(
                &at("installation_id"),
                "source github-app needs installation_id",
            )
        }
    };
    let private_key = match &t.private_key {
        Some(k) => referenced(cx, s, "private_key", k, all)?,
        None => return cx.err(
            &at("private_key"),
            "source github-app needs private_key = \"NAME\" (the secret holding the app's PEM key)",
        ),
    };
    let api_url = t
        .api_url
        .clone()
        .unwrap_or_else(|| "https://api.github.com".into());
    check_url(&api_url).or_else(|m| cx.err(&at("api_url"), m))?;
    Ok(SecretSource::GitHubApp(Arc::new(GitHubApp::new(
        GitHubAppSettings {
            app_id,
            installation_id,
            private_key,
            api_url,
            ca_file: s.ca_file.as_deref().map(expand_home),
            timeout: cx.duration_or(&s.timeout, DEFAULT_COMMAND_TIMEOUT)?,
            scope: None,
        },
    ))))
}

/// `source = "keychain"`: the OS keychain's entry (`service`, `account`), read by the platform's
/// own tool as a `command` source (`secret-tool lookup` for the Secret Service on Linux,
/// `security find-generic-password` on macOS), so it runs with a cleared environment (plus
/// `DBUS_*`), in its own process group, under the command timeout.
pub(super) fn keychain(cx: &Cx, s: &SecretSpecRaw) -> Result<SecretSource, ConfigError> {
    let t = &s.token;
    let (service, account) = match (&t.service, &t.account) {
        (Some(svc), Some(acc)) if !svc.is_empty() && !acc.is_empty() => (svc.clone(), acc.clone()),
        _ => {
            return cx.err(
                &s.table.child("service"),
                "source keychain needs service and account (the entry's attributes)",
            )
        }
    };
    let argv = if cfg!(target_os = "macos") {
        vec![
            "security".into(),
            "find-generic-password".into(),
            "-s".into(),
            service,
            "-a".into(),
            account,
            "-w".into(),
        ]
    } else {
        vec![
            "secret-tool".into(),
            "lookup".into(),
            "service".into(),
            service,
            "account".into(),
            account,
        ]
    };
    Ok(SecretSource::Command {
        argv,
        timeout: cx.duration_or(&s.timeout, DEFAULT_COMMAND_TIMEOUT)?,
        env: Vec::new(),
    })
}

/// Gives each route that names `repositories` or `permissions` its own secret, `NAME@ROUTE`,
/// minting tokens narrowed to that scope. `routes` are in the order of `specs`.
pub(super) fn scope_routes(
    cx: &Cx,
    specs: &[RouteSpec],
    routes: &mut [Route],
    secrets: &mut Vec<SecretSpec>,
) -> Result<(), ConfigError> {
    for (spec, route) in specs.iter().zip(routes.iter_mut()) {
        let Some(scope) = &spec.github_scope else {
            continue;
        };
        let base = route.secret.and_then(|id| secrets.get(id.0));
        let Some((base, SecretSource::GitHubApp(app))) = base.map(|b| (b, &b.source)) else {
            return cx.err(
                &scope.pos,
                "repositories and permissions narrow a github-app secret's token; this route's secret is not one",
            );
        };
        check_scope(&scope.value).or_else(|m| cx.err(&scope.pos, m))?;
        let mut settings = app.settings.clone();
        settings.scope = Some(scope.value.clone());
        let derived = SecretSpec {
            name: format!("{}@{}", base.name, route.name),
            source: SecretSource::GitHubApp(Arc::new(GitHubApp::new(settings))),
            ttl: base.ttl,
            lazy: base.lazy,
        };
        route.secret = Some(SecretId(secrets.len()));
        secrets.push(derived);
    }
    Ok(())
}

fn check_scope(scope: &Scope) -> Result<(), String> {
    if scope.repositories.len() > 500 {
        return Err("GitHub narrows a token to at most 500 repositories".into());
    }
    if let Some(r) = scope.repositories.iter().find(|r| {
        r.is_empty()
            || !r
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    }) {
        return Err(format!(
            "{r:?} is not a repository name (name only, without owner/)"
        ));
    }
    for (name, level) in &scope.permissions {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(format!("{name:?} is not a GitHub permission name"));
        }
        if !["read", "write", "admin"].contains(&level.as_str()) {
            return Err(format!(
                "permission {name} must be \"read\", \"write\" or \"admin\""
            ));
        }
    }
    Ok(())
}

/// The spec of the secret `name` that `key` of `s` refers to.
fn referenced(
    cx: &Cx,
    s: &SecretSpecRaw,
    key: &str,
    name: &str,
    all: &[SecretSpecRaw],
) -> Result<Box<SecretSpec>, ConfigError> {
    let pos = s.table.child(key);
    let Some(other) = all.iter().find(|o| o.name == name) else {
        return cx.err(&pos, format!("no [secrets.{name}] is defined"));
    };
    if other.name == s.name || MINTING.contains(&other.source.value.as_str()) {
        return cx.err(
            &pos,
            format!("[secrets.{name}] must be a plain source (env, file, command, ...), not one that reads other secrets"),
        );
    }
    // An openbao secret may itself log in with another secret; that one must be plain too, or
    // references could go round (oauth2 -> openbao -> oauth2 -> ...).
    let logins = [&other.secret_id_from, &other.jwt_from];
    if let Some(login) = logins.into_iter().flatten().find(|login| {
        all.iter()
            .any(|o| &o.name == *login && MINTING.contains(&o.source.value.as_str()))
    }) {
        return cx.err(
            &pos,
            format!("[secrets.{name}] logs in with [secrets.{login}], which reads other secrets itself; name a plain source"),
        );
    }
    Ok(Box::new(super::secret(
        cx,
        other,
        all,
        &std::collections::BTreeMap::new(),
    )?))
}

/// A token endpoint gets a client secret or a signed JWT: https, or http only to this machine.
fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let host = uri.host().unwrap_or("");
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(()),
        Some("http") if ["127.0.0.1", "localhost", "[::1]", "::1"].contains(&host) => Ok(()),
        Some("http") => Err(format!(
            "{url}: credentials are sent there, so it must be https (http only to 127.0.0.1)"
        )),
        _ => Err(format!("{url:?} is not an http(s) URL")),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    const CS: &str = "[secrets.cs]\nsource = \"env\"\nname = \"CS\"\n";

    fn load(text: &str) -> Result<Config, crate::config::ConfigError> {
        Config::from_text(Path::new("c.toml"), text)
    }

    fn oauth(extra: &str) -> String {
        format!("{CS}[secrets.crm]\nsource = \"oauth2\"\ntoken_url = \"https://idp.example/token\"\nclient_id = \"x\"\n{extra}")
    }

    #[test]
    fn an_oauth2_secret_reads_its_client_secret_from_a_defined_plain_secret() {
        assert!(load(&oauth("client_secret = \"cs\"\n")).is_ok());
        let e = load(&oauth("client_secret = \"nope\"\n")).unwrap_err();
        assert_eq!(e.key, "secrets.crm.client_secret", "{e}");
        assert!(e.message.contains("no [secrets.nope]"), "{e}");
        let e = load(&oauth("client_secret = \"crm\"\n")).unwrap_err();
        assert!(e.message.contains("plain source"), "{e}");
    }

    #[test]
    fn references_that_go_round_through_an_openbao_login_are_refused_not_followed() {
        let text = "[secrets.bao]\nsource = \"openbao\"\naddress = \"http://127.0.0.1:8200\"\nauth = \"jwt\"\nrole = \"r\"\njwt_from = \"crm\"\npath = \"p\"\nfield = \"f\"\n[secrets.crm]\nsource = \"oauth2\"\ntoken_url = \"https://idp.example/token\"\nclient_id = \"x\"\nclient_secret = \"bao\"\n";
        let e = load(text).unwrap_err();
        assert!(
            e.message.contains("reads other secrets") || e.message.contains("plain"),
            "{e}"
        );
    }

    #[test]
    fn a_token_endpoint_over_plain_http_is_refused_unless_it_is_this_machine() {
        let local =
            oauth("client_secret = \"cs\"\n").replace("https://idp.example", "http://127.0.0.1:9");
        assert!(load(&local).is_ok());
        let remote = oauth("client_secret = \"cs\"\n").replace("https://", "http://");
        let e = load(&remote).unwrap_err();
        assert_eq!(e.key, "secrets.crm.token_url", "{e}");
    }

    #[test]
    fn the_refresh_grant_needs_the_secret_holding_the_first_refresh_token() {
        let e = load(&oauth(
            "grant = \"refresh_token\"\nclient_secret = \"cs\"\n",
        ))
        .unwrap_err();
        assert_eq!(e.key, "secrets.crm.refresh_token", "{e}");
        assert!(load(&oauth(
            "grant = \"refresh_token\"\nrefresh_token = \"cs\"\n"
        ))
        .is_ok());
        let e = load(&oauth("grant = \"password\"\nclient_secret = \"cs\"\n")).unwrap_err();
        assert_eq!(e.key, "secrets.crm.grant", "{e}");
    }

    #[test]
    fn a_keychain_secret_is_read_by_the_platforms_tool_and_needs_service_and_account() {
        let c = load(
            "[secrets.k]\nsource = \"keychain\"\nservice = \"keygate\"\naccount = \"openai\"\n",
        )
        .unwrap();
        let label = c.secrets[0].source.label();
        assert!(
            label == "command:secret-tool lookup"
                || label == "command:security find-generic-password",
            "{label}"
        );
        let e = load("[secrets.k]\nsource = \"keychain\"\nservice = \"keygate\"\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (1, "secrets.k.service"), "{e}");
    }

    fn github(route_extra: &str) -> String {
        format!("{CS}[secrets.gh]\nsource = \"github-app\"\napp_id = 1\ninstallation_id = 2\nprivate_key = \"cs\"\n[routes.r]\nprefix = \"/r\"\nupstream = \"https://api.github.com\"\nsecret = \"gh\"\n{route_extra}")
    }

    #[test]
    fn a_route_scope_gives_the_route_its_own_github_app_secret() {
        let c = load(&github("repositories = [\"keygate\"]\n")).unwrap();
        let secret = c.routes[0].secret.unwrap();
        assert_eq!(c.secrets[secret.0].name, "gh@r");
        let plain = load(&github("")).unwrap();
        assert_eq!(plain.secrets[plain.routes[0].secret.unwrap().0].name, "gh");
        assert_ne!(c.policy_version(), plain.policy_version());
    }

    #[test]
    fn a_route_scope_with_an_unknown_permission_level_is_refused_at_its_line() {
        let e = load(&github("permissions = { contents = \"all\" }\n")).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (13, "routes.r.permissions"),
            "{e}"
        );
        let e = load(&github("repositories = [\"o/keygate\"]\n")).unwrap_err();
        assert_eq!(e.key, "routes.r.repositories", "{e}");
    }
}
