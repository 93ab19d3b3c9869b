//! AWS: keygate's own credentials from the standard chain, SigV4 signing for routes with
//! `inject = "aws-sigv4"`, and the `aws-secrets-manager` source (GetSecretValue).
//!
//! Signing is the `aws-sigv4` crate's (the AWS SDK for Rust's own signer), so canonicalisation
//! follows AWS exactly; keygate chooses only what is signed (host, content type and md5, every
//! `x-amz-*` header) and how the payload is committed to (its SHA-256, or `UNSIGNED-PAYLOAD`
//! for a streamed S3 body). The SDK itself (`aws-config`, `aws-sdk-secretsmanager`) is not used:
//! it brings a second HTTP stack, and one JSON call over `BackendClient` is all it would do here.
//!
//! The credential chain, in the SDK's order, stops at the first that has keys: the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), the shared files
//! (`~/.aws/credentials`, `~/.aws/config`, or `AWS_SHARED_CREDENTIALS_FILE`/`AWS_CONFIG_FILE`)
//! for the profile (`profile` in config, else `AWS_PROFILE`, else `default`), and the container
//! credentials endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`/`_RELATIVE_URI`). A profile named
//! in config skips the environment's keys. EC2 instance metadata is not asked: on every other
//! machine that probe only costs a timeout.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::SystemTime;

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::http::{BackendClient, DEFAULT_TIMEOUT};

/// Signature headers an agent may send: keygate signs afresh, so the agent's are dropped.
pub const AGENT_SIGNATURE_HEADERS: [&str; 4] = [
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
];

/// Query parameters of a presigned URL: an agent's presignature is dropped before signing.
pub const PRESIGN_PARAMS: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// An access key pair, with a session token for temporary credentials. Never formatted.
pub struct Keys {
    access_key_id: Zeroizing<String>,
    secret_access_key: Zeroizing<String>,
    session_token: Option<Zeroizing<String>>,
    /// When temporary credentials stop working (container endpoint's `Expiration`).
    pub expires: Option<SystemTime>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys([REDACTED])")
    }
}

/// The JSON form a `Secret` holds them in: the shape of AWS's own credential answers (container
/// endpoint, `credential_process`), so a secret manager can hold a key pair in it too.
#[derive(Deserialize, serde::Serialize)]
struct KeysJson {
    #[serde(rename = "AccessKeyId")]
    access_key_id: String,
    #[serde(rename = "SecretAccessKey")]
    secret_access_key: String,
    #[serde(rename = "SessionToken", alias = "Token", default)]
    session_token: Option<String>,
    #[serde(
        rename = "Expiration",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    expiration: Option<String>,
}

impl Keys {
    /// Keys from their parts; an empty session token is none.
    pub fn new(access_key_id: &str, secret_access_key: &str, session_token: Option<&str>) -> Keys {
        Keys {
            access_key_id: Zeroizing::new(access_key_id.to_string()),
            secret_access_key: Zeroizing::new(secret_access_key.to_string()),
            session_token: session_token
                .filter(|t| !t.is_empty())
                .map(|t| Zeroizing::new(t.to_string())),
            expires: None,
        }
    }

    /// Reads keys back from a secret's value (`{"AccessKeyId": …, "SecretAccessKey": …}`).
    pub fn from_json(value: &[u8]) -> Option<Keys> {
        let j: KeysJson = serde_json::from_slice(value).ok()?;
        let j = Zeroizing::new(j);
        if j.access_key_id.is_empty() || j.secret_access_key.is_empty() {
            return None;
        }
        let mut keys = Keys::new(
            &j.access_key_id,
            &j.secret_access_key,
            j.session_token.as_deref(),
        );
        keys.expires = j
            .expiration
            .as_deref()
            .and_then(|e| humantime::parse_rfc3339_weak(e).ok());
        Some(keys)
    }

    /// The value a `Secret` holds for these keys.
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        let j = Zeroizing::new(KeysJson {
            access_key_id: self.access_key_id.to_string(),
            secret_access_key: self.secret_access_key.to_string(),
            session_token: self.session_token.as_ref().map(|t| t.to_string()),
            expiration: None,
        });
        Zeroizing::new(serde_json::to_vec(&*j).unwrap_or_default())
    }

    /// The parts that must never come back to an agent on their own: the secret key and the
    /// session token (the access key id is an identifier, sent in every signature).
    pub fn secret_parts(&self) -> Vec<&[u8]> {
        let mut parts = vec![self.secret_access_key.as_bytes()];
        if let Some(t) = &self.session_token {
            parts.push(t.as_bytes());
        }
        parts
    }

    /// The access key id, for key ids and messages; it is not secret.
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }
}

impl zeroize::Zeroize for KeysJson {
    fn zeroize(&mut self) {
        self.access_key_id.zeroize();
        self.secret_access_key.zeroize();
        self.session_token.zeroize();
    }
}

/// How the request body is committed to in the signature.
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    /// The body's SHA-256, lowercase hex.
    Sha256(&'a str),
    /// `UNSIGNED-PAYLOAD`: the body streams and is not covered (S3 accepts this over TLS).
    Unsigned,
}

/// Where and as what a request is signed.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    /// The region (`us-east-1`).
    pub region: &'a str,
    /// The signing name of the service (`s3`, `bedrock`, `secretsmanager`).
    pub service: &'a str,
}

/// The settings AWS's SDK uses for `service`: S3 neither normalises nor double-encodes the path,
/// and wants the payload hash in `x-amz-content-sha256` (sent for every service: it is harmless
/// and lets `UNSIGNED-PAYLOAD` be said).
pub fn settings(service: &str) -> SigningSettings {
    let mut s = SigningSettings::default();
    s.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    if service == "s3" || service == "s3-outposts" || service == "s3express" {
        s.percent_encoding_mode = PercentEncodingMode::Single;
        s.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    }
    s
}

/// Whether a header is covered by keygate's signature: host, content type and md5, and every
/// `x-amz-*` (S3 refuses a request with an unsigned one).
pub fn signs_header(name: &str) -> bool {
    name == "host" || name == "content-type" || name == "content-md5" || name.starts_with("x-amz-")
}

/// Signs a request for `url` in place: the agent's signature headers are dropped first, then
/// `authorization`, `x-amz-date`, `x-amz-content-sha256` (and `x-amz-security-token`) are set.
/// `url` is exactly what is sent (scheme, authority, path and query, already encoded).
// One call per signature input, as SigV4 defines them; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn sign_headers(
    keys: &Keys,
    scope: Scope<'_>,
    settings: SigningSettings,
    method: &Method,
    url: &str,
    headers: &mut HeaderMap,
    payload: Payload<'_>,
    time: SystemTime,
) -> Result<(), String> {
    for h in AGENT_SIGNATURE_HEADERS {
        headers.remove(h);
    }
    let uri: http::Uri = url.parse().map_err(|_| "the URL cannot be signed")?;
    let host = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .ok_or("the URL has no host")?;
    let mut signed: Vec<(String, String)> = vec![("host".into(), host)];
    for (name, value) in headers.iter() {
        let n = name.as_str();
        if n == "host" || !signs_header(n) {
            continue;
        }
        let v = value
            .to_str()
            .map_err(|_| format!("header {n} holds bytes SigV4 cannot sign"))?;
        signed.push((n.to_string(), v.to_string()));
    }
    let identity = aws_credential_types::Credentials::new(
        reveal(&keys.access_key_id),
        reveal(&keys.secret_access_key),
        keys.session_token.as_ref().map(|t| t.to_string()),
        None,
        "keygate",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(scope.region)
        .name(scope.service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| format!("SigV4 parameters: {e}"))?
        .into();
    let body = match payload {
        Payload::Sha256(h) => SignableBody::Precomputed(h.to_string()),
        Payload::Unsigned => SignableBody::UnsignedPayload,
    };
    let request = SignableRequest::new(
        method.as_str(),
        url,
        signed.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        body,
    )
    .map_err(|e| format!("SigV4: {e}"))?;
    let (instructions, _) = sign(request, &params)
        .map_err(|e| format!("SigV4: {e}"))?
        .into_parts();
    let (new_headers, _) = instructions.into_parts();
    for h in new_headers {
        let name = HeaderName::from_static(h.name());
        let mut value = HeaderValue::from_str(h.value())
            .map_err(|_| format!("SigV4 produced an invalid {} header", h.name()))?;
        value.set_sensitive(h.sensitive() || name == http::header::AUTHORIZATION);
        headers.insert(name, value);
    }
    Ok(())
}

fn reveal(s: &Zeroizing<String>) -> String {
    s.to_string()
}

/// The lowercase hex SHA-256 of a body, as `x-amz-content-sha256` carries it.
pub fn payload_sha256(body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(body))
}

/// keygate's own AWS credentials, from the chain this module's header describes.
pub async fn chain(profile: Option<&str>) -> Result<Keys, String> {
    if profile.is_none() {
        if let Some(k) = from_env() {
            return Ok(k);
        }
    }
    let env_profile = std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty());
    let name = profile
        .map(str::to_string)
        .or(env_profile)
        .unwrap_or_else(|| "default".into());
    if let Some(k) = from_files(&name).await? {
        return Ok(k);
    }
    if profile.is_some() {
        return Err(format!(
            "profile {name} has no aws_access_key_id/aws_secret_access_key in the shared credentials or config file"
        ));
    }
    if let Some(k) = from_container().await? {
        return Ok(k);
    }
    Err(format!("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or keys for profile {name} in ~/.aws/credentials, or a container credentials endpoint"))
}

fn from_env() -> Option<Keys> {
    let id = std::env::var("AWS_ACCESS_KEY_ID")
        .ok()
        .filter(|v| !v.is_empty())?;
    let id = Zeroizing::new(id);
    let secret = Zeroizing::new(
        std::env::var("AWS_SECRET_ACCESS_KEY")
            .ok()
            .filter(|v| !v.is_empty())?,
    );
    let token = std::env::var("AWS_SESSION_TOKEN").ok().map(Zeroizing::new);
    Some(Keys::new(&id, &secret, token.as_ref().map(|t| t.as_str())))
}

fn home_file(var: &str, default: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(default)),
    }
}

/// Keys of a profile from the credentials file (`[NAME]`), else the config file
/// (`[profile NAME]`, or `[default]`).
async fn from_files(profile: &str) -> Result<Option<Keys>, String> {
    let files = [
        (
            home_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"),
            profile.to_string(),
        ),
        (
            home_file("AWS_CONFIG_FILE", ".aws/config"),
            if profile == "default" {
                "default".to_string()
            } else {
                format!("profile {profile}")
            },
        ),
    ];
    for (path, section) in files {
        let Some(path) = path else { continue };
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => Zeroizing::new(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let values = ini_section(&text, &section);
        let get = |k: &str| values.get(k).map(|v| v.as_str());
        if let (Some(id), Some(secret)) = (get("aws_access_key_id"), get("aws_secret_access_key")) {
            return Ok(Some(Keys::new(id, secret, get("aws_session_token"))));
        }
    }
    Ok(None)
}

/// The `key = value` pairs of one `[section]` of an AWS shared file (comments `#`/`;`, keys
/// lowercased, nested `s3 =` blocks skipped).
fn ini_section(text: &str, section: &str) -> HashMap<String, Zeroizing<String>> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            inside = name.split_whitespace().collect::<Vec<_>>().join(" ") == section;
            continue;
        }
        if !inside || line.starts_with(char::is_whitespace) {
            continue;
        }
        if let Some((k, v)) = t.split_once('=') {
            out.insert(
                k.trim().to_ascii_lowercase(),
                Zeroizing::new(v.trim().to_string()),
            );
        }
    }
    out
}

/// Keys from the ECS/EKS container credentials endpoint, when one is configured.
async fn from_container() -> Result<Option<Keys>, String> {
    let url = match (
        std::env::var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
        std::env::var("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
    ) {
        (Ok(rel), _) if !rel.is_empty() => format!("http://169.254.170.2{rel}"),
        (_, Ok(full)) if !full.is_empty() => full,
        _ => return Ok(None),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|_| "AWS_CONTAINER_CREDENTIALS_FULL_URI is not a URL".to_string())?;
    // As the SDKs: plain HTTP only to the container agent or this machine, where nobody on the
    // way can read the answer.
    let host = uri.host().unwrap_or_default();
    let local = matches!(
        host,
        "127.0.0.1" | "localhost" | "[::1]" | "::1" | "169.254.170.2" | "169.254.170.23"
    );
    if uri.scheme_str() != Some("https") && !local {
        return Err("the container credentials endpoint must be https or on this machine".into());
    }
    let mut headers = HeaderMap::new();
    let token = match std::env::var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
        Ok(f) if !f.is_empty() => Some(Zeroizing::new(
            tokio::fs::read_to_string(&f)
                .await
                .map_err(|e| format!("cannot read {f}: {e}"))?
                .trim()
                .to_string(),
        )),
        _ => std::env::var("AWS_CONTAINER_AUTHORIZATION_TOKEN")
            .ok()
            .map(Zeroizing::new),
    };
    if let Some(t) = token {
        let mut v = HeaderValue::from_str(&t)
            .map_err(|_| "the container authorization token is not a header value".to_string())?;
        v.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let answer = client()?
        .send(Method::GET, &url, headers, Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    if !answer.status.is_success() {
        return Err(format!(
            "the container credentials endpoint answered {}",
            answer.status
        ));
    }
    Keys::from_json(&answer.body)
        .map(Some)
        .ok_or_else(|| "the container credentials endpoint gave no keys".to_string())
}

fn client() -> Result<&'static BackendClient, String> {
    static CLIENT: OnceLock<BackendClient> = OnceLock::new();
    if let Some(c) = CLIENT.get() {
        return Ok(c);
    }
    let c = BackendClient::new(None, DEFAULT_TIMEOUT).map_err(|e| e.to_string())?;
    Ok(CLIENT.get_or_init(|| c))
}

/// What GetSecretValue gave: the value (a field of it, if asked) and its version id.
pub struct Fetched {
    /// The value.
    pub value: Zeroizing<Vec<u8>>,
    /// The manager's `VersionId`.
    pub version: String,
}

#[derive(Deserialize)]
struct GetSecretValueAnswer {
    #[serde(rename = "VersionId", default)]
    version_id: String,
    #[serde(rename = "SecretString")]
    secret_string: Option<String>,
    #[serde(rename = "SecretBinary")]
    secret_binary: Option<String>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(rename = "__type", default)]
    kind: String,
}

/// Calls GetSecretValue for `secret_id`, signed with `keys`. Errors carry the status and AWS's
/// error code (`ResourceNotFoundException`), never the answer's body.
pub async fn get_secret_value(
    keys: &Keys,
    region: &str,
    endpoint: Option<&str>,
    secret_id: &str,
    field: Option<&str>,
) -> Result<Fetched, String> {
    let url = match endpoint {
        Some(e) => format!("{}/", e.trim_end_matches('/')),
        None => format!("https://secretsmanager.{region}.amazonaws.com/"),
    };
    let body = serde_json::to_vec(&serde_json::json!({ "SecretId": secret_id }))
        .map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    headers.insert(
        "x-amz-target",
        HeaderValue::from_static("secretsmanager.GetSecretValue"),
    );
    let hash = payload_sha256(&body);
    sign_headers(
        keys,
        Scope {
            region,
            service: "secretsmanager",
        },
        settings("secretsmanager"),
        &Method::POST,
        &url,
        &mut headers,
        Payload::Sha256(&hash),
        SystemTime::now(),
    )?;
    let answer = client()?
        .send(Method::POST, &url, headers, Bytes::from(body))
        .await
        .map_err(|e| e.to_string())?;
    if !answer.status.is_success() {
        let code = serde_json::from_slice::<ErrorAnswer>(&answer.body)
            .ok()
            .map(|e| e.kind)
            .or_else(|| {
                answer
                    .headers
                    .get("x-amzn-errortype")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        // `__type` may be `namespace#Code`: the code is what a user looks up.
        let code = code.rsplit('#').next().unwrap_or_default();
        let code = code.split(':').next().unwrap_or_default();
        let code: String = code
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
            .take(80)
            .collect();
        return Err(format!(
            "GetSecretValue answered {} {}",
            answer.status.as_u16(),
            if code.is_empty() {
                "(no error code)"
            } else {
                &code
            }
        ));
    }
    let parsed: GetSecretValueAnswer = serde_json::from_slice(&answer.body)
        .map_err(|_| "GetSecretValue answered with JSON keygate cannot read".to_string())?;
    let version = parsed.version_id;
    let raw = match (parsed.secret_string, parsed.secret_binary) {
        (Some(s), _) => Zeroizing::new(s.into_bytes()),
        (None, Some(b)) => {
            use base64::Engine;
            let b = Zeroizing::new(b);
            Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(b.as_bytes())
                    .map_err(|_| "SecretBinary is not base64".to_string())?,
            )
        }
        (None, None) => return Err("the secret has neither SecretString nor SecretBinary".into()),
    };
    let value = match field {
        None => raw,
        Some(f) => json_field(&raw, f)?,
    };
    Ok(Fetched { value, version })
}

/// One string (or number) field of a secret kept as a JSON object.
fn json_field(raw: &[u8], field: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(raw).map_err(|_| {
            format!("field {field:?} was asked for but the secret is not a JSON object")
        })?;
    let out = match map.get(field) {
        Some(serde_json::Value::String(s)) => Zeroizing::new(s.as_bytes().to_vec()),
        Some(serde_json::Value::Number(n)) => Zeroizing::new(n.to_string().into_bytes()),
        Some(_) => return Err(format!("field {field:?} of the secret is not a string")),
        None => return Err(format!("the secret has no field {field:?}")),
    };
    // The parsed map held every field; its strings are dropped here without zeroing, a copy
    // serde_json gives no way to avoid.
    drop(map);
    Ok(out)
}

/// Fetches an `aws-credentials` or `aws-secrets-manager` source. Errors name what failed,
/// never a value.
pub(crate) async fn fetch(
    name: &str,
    source: &super::SecretSource,
) -> Result<super::Secret, String> {
    use super::SecretSource;
    match source {
        SecretSource::AwsCredentials { profile } => {
            let keys = chain(profile.as_deref()).await?;
            let fingerprint = {
                use sha2::{Digest, Sha256};
                hex::encode(&Sha256::digest(keys.access_key_id().as_bytes())[..4])
            };
            // The key id names the key pair by a hash of its access key id, so audit records
            // tell a rotation apart without listing account identifiers.
            let mut secret = super::Secret::new(name, keys.to_json().to_vec())
                .versioned(name, &format!("ak-{fingerprint}"));
            if let Some(at) = keys.expires {
                secret = secret.expiring(at);
            }
            Ok(secret)
        }
        SecretSource::AwsSecretsManager {
            secret_id,
            region,
            endpoint,
            field,
            profile,
        } => {
            let keys = chain(profile.as_deref()).await?;
            let got = get_secret_value(
                &keys,
                region,
                endpoint.as_deref(),
                secret_id,
                field.as_deref(),
            )
            .await?;
            let secret = super::Secret::new(name, got.value.to_vec());
            Ok(if got.version.is_empty() {
                secret
            } else {
                secret.versioned(name, &got.version)
            })
        }
        _ => Err("not an AWS source".into()),
    }
}

#[cfg(test)]
mod tests;
