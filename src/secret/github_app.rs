//! The `github-app` source: a GitHub App installation access token, minted by keygate.
//!
//! Input: the validated [`GitHubAppSettings`] (app id, installation id, the app's private key from
//! another secret) and, per route, the [`Scope`] it names (`repositories`, `permissions`).
//! Output: a [`Secret`] holding the installation token (`ghs_…`), marked to expire so that
//! `credential`'s cache replaces it 5 minutes before GitHub's `expires_at`.
//!
//! The app JWT (RS256, `iat` 60 s in the past for clock drift, `exp` 9 minutes ahead, `iss` the
//! app id) is made for one exchange and dropped; the private key is read from its source for each
//! mint and never kept. A route with a scope gets its own secret (`NAME@ROUTE`, built by config
//! validation), so a token narrowed for one route is never attached to another.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use zeroize::Zeroizing;

use super::http::BackendClient;
use super::{FetchError, Secret, SecretSpec};

/// How long before GitHub's `expires_at` a token is replaced.
const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);

/// What a route narrows its installation token to.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Scope {
    /// Repository names (without owner) the token may reach; empty: every one the installation
    /// can.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<String>,
    /// Permission name to `read`, `write` or `admin`; empty: every one the app has.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub permissions: BTreeMap<String, String>,
}

/// A validated `[secrets.NAME]` table with `source = "github-app"`.
#[derive(Clone, Debug)]
pub struct GitHubAppSettings {
    /// The app's id (or client id), the JWT's `iss`.
    pub app_id: String,
    /// The installation the tokens are for.
    pub installation_id: u64,
    /// Where the app's private key (PEM) is read from (another secret).
    pub private_key: Box<SecretSpec>,
    /// The REST API's base URL (`https://api.github.com`; GitHub Enterprise's `/api/v3`).
    pub api_url: String,
    /// An extra CA for the API's certificate.
    pub ca_file: Option<PathBuf>,
    /// How long one exchange may take.
    pub timeout: Duration,
    /// What the tokens are narrowed to; `None`: everything the installation grants.
    pub scope: Option<Scope>,
}

/// A `github-app` source.
pub struct GitHubApp {
    /// What config says.
    pub settings: GitHubAppSettings,
    client: OnceLock<BackendClient>,
}

impl std::fmt::Debug for GitHubApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubApp")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iat: u64,
    exp: u64,
    iss: &'a str,
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    token: String,
    expires_at: String,
}

impl GitHubApp {
    /// A source with nothing fetched yet.
    pub fn new(settings: GitHubAppSettings) -> GitHubApp {
        GitHubApp {
            settings,
            client: OnceLock::new(),
        }
    }

    /// `github-app:INSTALLATION` and the scope, so the effective policy (and its version)
    /// changes when a route's repositories or permissions do.
    pub fn label(&self) -> String {
        let s = &self.settings;
        let mut label = format!("github-app:{}", s.installation_id);
        if let Some(scope) = &s.scope {
            if !scope.repositories.is_empty() {
                label.push_str(&format!(" repositories={}", scope.repositories.join(",")));
            }
            if !scope.permissions.is_empty() {
                let p: Vec<String> = scope
                    .permissions
                    .iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect();
                label.push_str(&format!(" permissions={}", p.join(",")));
            }
        }
        label
    }

    /// Mints a fresh installation token for the secret `name`.
    pub(crate) async fn fetch(&self, name: &str) -> Result<Secret, FetchError> {
        let s = &self.settings;
        let jwt = self.app_jwt(name).await?;
        let client = self.client(name)?;
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_bytes(format!("Bearer {}", jwt.as_str()).as_bytes())
            .map_err(|_| FetchError::TokenAnswer {
                secret: name.into(),
                what: "the app JWT cannot be sent in a header",
            })?;
        auth.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, auth);
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.github+json"),
        );
        headers.insert(
            "x-github-api-version",
            HeaderValue::from_static("2022-11-28"),
        );
        headers.insert(header::USER_AGENT, HeaderValue::from_static("keygate"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let body = match &s.scope {
            Some(scope) => serde_json::to_vec(scope).unwrap_or_default(),
            None => b"{}".to_vec(),
        };
        let url = format!(
            "{}/app/installations/{}/access_tokens",
            s.api_url.trim_end_matches('/'),
            s.installation_id
        );
        let answer = client
            .send(Method::POST, &url, headers, Bytes::from(body))
            .await
            .map_err(|e| FetchError::TokenUnreachable {
                secret: name.into(),
                reason: e.to_string(),
            })?;
        if !answer.status.is_success() {
            // GitHub's error body is free text (`message`): only the status is repeated.
            return Err(FetchError::TokenRefused {
                secret: name.into(),
                endpoint: "GitHub installation token endpoint",
                status: answer.status.as_u16(),
                code: "(none)".into(),
            });
        }
        let parsed: TokenAnswer =
            serde_json::from_slice(&answer.body).map_err(|_| FetchError::TokenAnswer {
                secret: name.into(),
                what: "GitHub's answer holds no installation token",
            })?;
        let token = Zeroizing::new(parsed.token);
        let expires = humantime::parse_rfc3339_weak(&parsed.expires_at).map_err(|_| {
            FetchError::TokenAnswer {
                secret: name.into(),
                what: "GitHub's answer has no readable expires_at",
            }
        })?;
        // `credential` fetches afresh `EXPIRY_MARGIN` (30 s) before a value's expiry; the mark is
        // set so that this happens RENEW_BEFORE ahead of GitHub's.
        let mark = expires
            .checked_sub(RENEW_BEFORE.saturating_sub(crate::credential::EXPIRY_MARGIN))
            .unwrap_or(expires);
        Ok(Secret::new(name, token.as_bytes().to_vec()).expiring(mark))
    }

    /// The RS256 app JWT GitHub asks for, signed with the private key from its source.
    async fn app_jwt(&self, name: &str) -> Result<Zeroizing<String>, FetchError> {
        let pem = Zeroizing::new(super::oauth2::fetch_value(&self.settings.private_key).await?);
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| {
            FetchError::TokenAnswer {
                secret: name.into(),
                what: "the app's private key is not an RSA private key in PEM",
            }
        })?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            iat: now.saturating_sub(60),
            exp: now + 9 * 60,
            iss: &self.settings.app_id,
        };
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        jsonwebtoken::encode(&header, &claims, &key)
            .map(Zeroizing::new)
            .map_err(|_| FetchError::TokenAnswer {
                secret: name.into(),
                what: "the app JWT could not be signed with the private key",
            })
    }

    fn client(&self, name: &str) -> Result<BackendClient, FetchError> {
        BackendClient::cached(
            &self.client,
            self.settings.ca_file.as_deref(),
            self.settings.timeout,
        )
        .map_err(|e| FetchError::TokenUnreachable {
            secret: name.into(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_is_sent_as_github_names_it_and_an_empty_part_is_left_out() {
        let scope = Scope {
            repositories: vec!["keygate".into()],
            permissions: BTreeMap::from([("contents".into(), "read".into())]),
        };
        assert_eq!(
            serde_json::to_string(&scope).unwrap(),
            r#"{"repositories":["keygate"],"permissions":{"contents":"read"}}"#
        );
        let only = Scope {
            repositories: vec![],
            permissions: BTreeMap::from([("issues".into(), "write".into())]),
        };
        assert_eq!(
            serde_json::to_string(&only).unwrap(),
            r#"{"permissions":{"issues":"write"}}"#
        );
    }
}
