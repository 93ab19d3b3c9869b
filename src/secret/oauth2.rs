//! The `oauth2` source: an access token from an OAuth 2.0 token endpoint, by the
//! client-credentials grant or the refresh-token grant (RFC 6749 §4.4, §6).
//!
//! Input: the validated [`OAuth2Settings`]. Output: a [`Secret`] holding the access token, marked
//! to expire when the endpoint says (`expires_in`), so `credential`'s cache fetches afresh
//! shortly before; its single-flight fetch makes N concurrent requests cause one token request,
//! and its 401 invalidation makes an upstream's refusal cause one.
//!
//! A refresh token is keygate's own: it goes only to the token endpoint. When the endpoint
//! rotates it, the new one replaces the old in memory and in the state store (`source_state`),
//! so a restart does not fall back to a token the provider has already retired. The stored one is
//! used only while the configured refresh token is the one it descends from: a user who puts a new
//! refresh token in the source (after re-consenting) is not overridden by an old rotation.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use zeroize::Zeroizing;

use super::http::{Answer, BackendClient};
use super::{FetchError, Secret, SecretSpec};
use crate::state::StateStore;

/// Which grant keygate uses at the token endpoint (`grant`).
#[derive(Clone, Debug)]
pub enum Grant {
    /// `client_credentials`: the client's own identity, no user.
    ClientCredentials,
    /// `refresh_token`: a user's consent, held as a refresh token that comes from another
    /// secret (`refresh_token = "NAME"`) and is replaced whenever the endpoint rotates it.
    RefreshToken {
        /// Where the first refresh token is read from.
        initial: Box<SecretSpec>,
    },
}

/// How the client authenticates to the token endpoint (`client_auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic with the form-encoded id and secret (`client_secret_basic`, the default every
    /// server must support).
    Basic,
    /// `client_id` and `client_secret` in the form body (`client_secret_post`).
    Post,
}

/// A validated `[secrets.NAME]` table with `source = "oauth2"`.
#[derive(Clone, Debug)]
pub struct OAuth2Settings {
    /// The token endpoint (https, or http to a loopback address).
    pub token_url: String,
    /// The grant.
    pub grant: Grant,
    /// The client id (not secret).
    pub client_id: String,
    /// Where the client secret is read from (another secret); `None` for a public client.
    pub client_secret: Option<Box<SecretSpec>>,
    /// How the client secret is sent.
    pub client_auth: ClientAuth,
    /// `scope`, sent as written.
    pub scope: Option<String>,
    /// `audience` (Auth0, Okta and others use it to pick the API the token is for).
    pub audience: Option<String>,
    /// An extra CA for the token endpoint's certificate.
    pub ca_file: Option<PathBuf>,
    /// How long one exchange with the endpoint may take.
    pub timeout: Duration,
}

/// An `oauth2` source: its settings and the refresh token it holds at run time.
pub struct OAuth2 {
    /// What config says.
    pub settings: OAuth2Settings,
    client: OnceLock<BackendClient>,
    /// The refresh token in use; the lock also makes refreshes one at a time, as a rotating
    /// endpoint retires the old token with the first use.
    refresh: tokio::sync::Mutex<Option<Held>>,
    store: OnceLock<Arc<dyn StateStore>>,
}

/// A refresh token and the fingerprint of the configured one it descends from.
struct Held {
    token: Zeroizing<String>,
    seed: String,
}

impl std::fmt::Debug for OAuth2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The runtime state holds a refresh token: only the settings (names, never values).
        f.debug_struct("OAuth2")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What a token endpoint answers on success (RFC 6749 §5.1).
#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Number>,
    #[serde(default)]
    refresh_token: Option<String>,
}

/// What a token endpoint answers on failure (RFC 6749 §5.2): only `error` is read; its
/// `error_description` is free text and is not repeated anywhere.
#[derive(serde::Deserialize)]
struct ErrorAnswer {
    error: Option<String>,
}

/// What the state store keeps for a refresh-token source.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    seed: String,
    refresh_token: String,
}

impl OAuth2 {
    /// A source with nothing fetched yet.
    pub fn new(settings: OAuth2Settings) -> OAuth2 {
        OAuth2 {
            settings,
            client: OnceLock::new(),
            refresh: tokio::sync::Mutex::new(None),
            store: OnceLock::new(),
        }
    }

    /// Where a rotated refresh token is kept across restarts; set once, by `credential`.
    pub fn keep_in(&self, store: Arc<dyn StateStore>) {
        let _ = self.store.set(store);
    }

    /// `oauth2:URL` (without its query), for status and the effective policy.
    pub fn label(&self) -> String {
        let url = &self.settings.token_url;
        format!("oauth2:{}", url.split('?').next().unwrap_or(url))
    }

    /// Fetches a fresh access token for the secret `name`.
    pub(crate) async fn fetch(&self, name: &str) -> Result<Secret, FetchError> {
        let client = self.client(name)?;
        let s = &self.settings;
        let mut form: Vec<(&str, Zeroizing<String>)> = Vec::new();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let secret = match &s.client_secret {
            Some(spec) => Some(Zeroizing::new(fetch_value(spec).await?)),
            None => None,
        };
        match (&secret, s.client_auth) {
            (Some(secret), ClientAuth::Basic) => {
                // RFC 6749 §2.3.1: id and secret are form-encoded before they are joined.
                let mut pair = Zeroizing::new(form_encode(s.client_id.as_bytes()));
                pair.push(':');
                pair.push_str(&form_encode(secret.as_bytes()));
                let mut v = Zeroizing::new(b"Basic ".to_vec());
                v.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(pair.as_bytes())
                        .as_bytes(),
                );
                let mut v = HeaderValue::from_bytes(&v).map_err(|_| FetchError::TokenAnswer {
                    secret: name.into(),
                    what: "the client secret cannot be sent in a header",
                })?;
                v.set_sensitive(true);
                headers.insert(header::AUTHORIZATION, v);
            }
            (Some(secret), ClientAuth::Post) => {
                form.push(("client_id", Zeroizing::new(s.client_id.clone())));
                form.push(("client_secret", secret.clone()));
            }
            (None, _) => form.push(("client_id", Zeroizing::new(s.client_id.clone()))),
        }
        if let Some(scope) = &s.scope {
            form.push(("scope", Zeroizing::new(scope.clone())));
        }
        if let Some(audience) = &s.audience {
            form.push(("audience", Zeroizing::new(audience.clone())));
        }
        match &s.grant {
            Grant::ClientCredentials => {
                form.push(("grant_type", Zeroizing::new("client_credentials".into())));
                let answer = self.exchange(&client, name, &form, headers).await?;
                self.token(name, &answer).map(|(secret, _)| secret)
            }
            Grant::RefreshToken { initial } => {
                let mut held = self.refresh.lock().await;
                if held.is_none() {
                    *held = Some(self.load(name, initial).await?);
                }
                let Some(current) = held.as_ref() else {
                    return Err(FetchError::TokenAnswer {
                        secret: name.into(),
                        what: "no refresh token",
                    });
                };
                form.push(("grant_type", Zeroizing::new("refresh_token".into())));
                form.push(("refresh_token", current.token.clone()));
                let seed = current.seed.clone();
                let answer = self.exchange(&client, name, &form, headers).await?;
                let (secret, rotated) = self.token(name, &answer)?;
                if let Some(next) = rotated {
                    self.save(name, &seed, &next);
                    *held = Some(Held { token: next, seed });
                }
                Ok(secret)
            }
        }
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

    /// The refresh token to start from: the stored rotation of the configured one, else the
    /// configured one.
    async fn load(&self, name: &str, initial: &SecretSpec) -> Result<Held, FetchError> {
        let configured = Zeroizing::new(fetch_value(initial).await?);
        let seed = fingerprint(&configured);
        if let Some(store) = self.store.get() {
            match store.source_state(&store_key(name)) {
                Ok(Some(text)) => match serde_json::from_str::<Stored>(&text) {
                    Ok(stored) if stored.seed == seed => {
                        return Ok(Held {
                            token: Zeroizing::new(stored.refresh_token),
                            seed,
                        })
                    }
                    Ok(_) => {
                        tracing::info!(secret = %name, "the configured refresh token changed; the stored rotation of the old one is not used")
                    }
                    Err(_) => {
                        tracing::warn!(secret = %name, "the stored refresh token is unreadable; using the configured one")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(secret = %name, error = %e, "cannot read the stored refresh token; using the configured one")
                }
            }
        }
        Ok(Held {
            token: configured,
            seed,
        })
    }

    fn save(&self, name: &str, seed: &str, token: &str) {
        let Some(store) = self.store.get() else {
            tracing::warn!(secret = %name, "the refresh token was rotated and there is no state store: a restart will start from the configured one");
            return;
        };
        let stored = Zeroizing::new(
            serde_json::to_string(&Stored {
                seed: seed.into(),
                refresh_token: token.into(),
            })
            .unwrap_or_default(),
        );
        if let Err(e) = store.put_source_state(&store_key(name), &stored) {
            tracing::error!(secret = %name, error = %e, "cannot store the rotated refresh token: a restart will start from the configured one");
        }
    }

    async fn exchange(
        &self,
        client: &BackendClient,
        name: &str,
        form: &[(&str, Zeroizing<String>)],
        headers: HeaderMap,
    ) -> Result<Answer, FetchError> {
        let mut body = Zeroizing::new(String::new());
        for (k, v) in form {
            if !body.is_empty() {
                body.push('&');
            }
            body.push_str(k);
            body.push('=');
            body.push_str(&form_encode(v.as_bytes()));
        }
        let answer = client
            .send(
                Method::POST,
                &self.settings.token_url,
                headers,
                Bytes::copy_from_slice(body.as_bytes()),
            )
            .await
            .map_err(|e| FetchError::TokenUnreachable {
                secret: name.into(),
                reason: e.to_string(),
            })?;
        if !answer.status.is_success() {
            let code = serde_json::from_slice::<ErrorAnswer>(&answer.body)
                .ok()
                .and_then(|e| e.error);
            return Err(FetchError::TokenRefused {
                secret: name.into(),
                endpoint: "token endpoint",
                status: answer.status.as_u16(),
                code: error_code(code.as_deref()),
            });
        }
        Ok(answer)
    }

    /// The access token of a successful answer, and the rotated refresh token if it holds one.
    fn token(
        &self,
        name: &str,
        answer: &Answer,
    ) -> Result<(Secret, Option<Zeroizing<String>>), FetchError> {
        let parsed: TokenAnswer =
            serde_json::from_slice(&answer.body).map_err(|_| FetchError::TokenAnswer {
                secret: name.into(),
                what: "the token endpoint's answer is not a token response (no access_token)",
            })?;
        let access = Zeroizing::new(parsed.access_token);
        let rotated = parsed.refresh_token.map(Zeroizing::new);
        let mut secret = Secret::new(name, access.as_bytes().to_vec());
        if let Some(secs) = parsed.expires_in.as_ref().and_then(|n| n.as_f64()) {
            if secs.is_finite() && secs >= 0.0 {
                let secs = secs.min(365.0 * 86_400.0);
                secret = secret.expiring(SystemTime::now() + Duration::from_secs_f64(secs));
            }
        }
        Ok((secret, rotated.filter(|r| !r.is_empty())))
    }
}

/// Fetches another secret's value (a client secret, a refresh token) as text.
pub(crate) async fn fetch_value(spec: &SecretSpec) -> Result<String, FetchError> {
    let Some(value) = Box::pin(spec.fetch()).await? else {
        return Err(FetchError::Empty {
            secret: spec.name.clone(),
            origin: spec.source.label(),
        });
    };
    #[allow(clippy::disallowed_methods)] // a source sends another secret to its own backend
    let bytes = value.expose();
    String::from_utf8(bytes.to_vec()).map_err(|e| {
        // The bytes are not shown: zeroize them before they are dropped.
        drop(Zeroizing::new(e.into_bytes()));
        FetchError::TokenAnswer {
            secret: spec.name.clone(),
            what: "the value is not UTF-8 text",
        }
    })
}

/// A provider's error code as it may be shown: a short token of the characters RFC 6749 allows
/// in `error`, else a placeholder (an endpoint could put anything there).
pub(crate) fn error_code(code: Option<&str>) -> String {
    match code {
        Some(c)
            if !c.is_empty()
                && c.len() <= 64
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) =>
        {
            c.to_string()
        }
        Some(_) => "(unreadable)".into(),
        None => "(none)".into(),
    }
}

/// `application/x-www-form-urlencoded` for one name or value.
fn form_encode(v: &[u8]) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::percent_encode(v, SET).to_string()
}

fn store_key(name: &str) -> String {
    format!("oauth2/{name}/refresh_token")
}

/// A domain-separated, non-reversible fingerprint of the configured refresh token.
fn fingerprint(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"keygate oauth2 seed v1\0");
    h.update(token.as_bytes());
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_code_is_shown_only_when_it_looks_like_one() {
        assert_eq!(error_code(Some("invalid_grant")), "invalid_grant");
        assert_eq!(error_code(Some("rt-abc def")), "(unreadable)");
        assert_eq!(error_code(Some(&"a".repeat(65))), "(unreadable)");
        assert_eq!(error_code(None), "(none)");
    }

    #[test]
    fn form_values_are_encoded_so_a_secret_cannot_add_a_parameter() {
        assert_eq!(form_encode(b"a&b=c d+e"), "a%26b%3Dc%20d%2Be");
        assert_eq!(form_encode(b"Az09-._~"), "Az09-._~");
    }
}
