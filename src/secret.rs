//! Secrets: the one type that holds a credential's value, and the sources it is fetched from.
//!
//! Input: a [`SecretSpec`] from config. Output: a [`Secret`] held by `credential`.
//!
//! Architecture invariant: a [`Secret`] has no `Display` and no `Serialize`; its `Debug` prints
//! `[REDACTED key_id]`, and its bytes are zeroized on drop. The only way to its value is
//! [`Secret::expose`], called where a credential is attached to an upstream request and where the
//! redaction engine is built from the held values.

pub mod aws;
pub mod github_app;
pub mod http;
pub mod oauth2;
pub mod openbao;
mod source;

pub use openbao::BaoToken;
pub use source::{FetchError, SecretSource, SecretSpec};

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

/// A credential value. Cloning copies the bytes into another zeroizing buffer.
///
/// Its bytes are out of reach outside the crate, and inside it only `credential` may read them:
///
/// ```compile_fail,E0624
/// let s = keygate::secret::Secret::new("openai", b"sk-not-a-real-key-0000".to_vec());
/// let leaked = s.expose();
/// ```
#[derive(Clone)]
pub struct Secret {
    value: Zeroizing<Vec<u8>>,
    key_id: KeyId,
    /// When the source says the value stops working (a lease, an OAuth token's `expires_in`);
    /// the cache fetches afresh before then.
    expires: Option<std::time::SystemTime>,
    /// The secret manager's handle for a dynamic value (an OpenBao lease id), to renew or revoke
    /// it; never shown, as some managers accept the id alone to revoke.
    lease: Option<Zeroizing<String>>,
}

/// What audit records and dry-run answers show instead of a value: the secret's name and a short,
/// non-reversible fingerprint of its value, e.g. `openai#3f2a9c1d`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct KeyId(Arc<str>);

impl Secret {
    /// Wraps a fetched value. Surrounding whitespace (a trailing newline from `op read`) is not
    /// part of a credential, so it is trimmed here, once, for every source.
    pub fn new(name: &str, raw: Vec<u8>) -> Self {
        let raw = Zeroizing::new(raw);
        let trimmed = raw.trim_ascii();
        let value = Zeroizing::new(trimmed.to_vec());
        let key_id = KeyId::fingerprint(name, &value);
        Secret {
            value,
            key_id,
            expires: None,
            lease: None,
        }
    }

    /// Names the value by the version its secret manager gives it (`openai#v7`, an AWS version
    /// id) instead of a fingerprint, so audit records match the manager's own history.
    pub fn versioned(mut self, name: &str, version: &str) -> Self {
        self.key_id = KeyId(format!("{name}#{version}").into());
        self
    }

    /// Marks when the value stops working, as its source says.
    pub fn expiring(mut self, at: std::time::SystemTime) -> Self {
        self.expires = Some(at);
        self
    }

    /// Attaches the manager's lease id of a dynamic value.
    pub fn leased(mut self, lease_id: String) -> Self {
        self.lease = Some(Zeroizing::new(lease_id));
        self
    }

    /// When the value stops working, if its source said.
    pub fn expires(&self) -> Option<std::time::SystemTime> {
        self.expires
    }

    /// The lease id of a dynamic value, for the source that renews or revokes it.
    pub fn lease(&self) -> Option<&str> {
        self.lease.as_deref().map(String::as_str)
    }

    /// The raw bytes. Only the `credential` stage calls this, to attach the credential upstream
    /// or to teach the redactor; clippy's `disallowed-methods` refuses every other call site.
    pub(crate) fn expose(&self) -> &[u8] {
        &self.value
    }

    /// The value's length in bytes, for bounds checks that need no more.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    /// The id that stands for the value in records and answers.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// Whether the value is empty after trimming (a source that returned nothing).
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[REDACTED {}]", self.key_id.0)
    }
}

impl KeyId {
    fn fingerprint(name: &str, value: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        // Domain-separated so the fingerprint cannot be matched against a bare SHA-256 of a key
        // published elsewhere; 32 bits identify a rotation without helping anyone guess the value.
        let mut h = Sha256::new();
        h.update(b"keygate key-id v1\0");
        h.update(value);
        let digest = h.finalize();
        KeyId(format!("{name}#{}", hex::encode(&digest[..4])).into())
    }

    /// The id of a secret that was not fetched (dry-run, `none`): just its name.
    pub fn unfetched(name: &str) -> Self {
        KeyId(name.into())
    }

    /// The id as text, e.g. `openai#3f2a9c1d`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id shared, for an audit record: a reference count, not a copy.
    pub fn shared(&self) -> Arc<str> {
        Arc::clone(&self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests compare held values
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("openai", b"sk-live-canary-123456\n".to_vec());
        let dbg = format!("{s:?} {:?}", Some(&s));
        assert!(!dbg.contains("canary"), "{dbg}");
        assert!(dbg.starts_with("[REDACTED openai#"), "{dbg}");
    }

    #[test]
    fn trailing_newline_from_a_command_is_not_part_of_the_key() {
        let s = Secret::new("x", b"  abc\r\n".to_vec());
        assert_eq!(s.expose(), b"abc");
    }

    #[test]
    fn a_versioned_key_id_names_the_version_and_debug_still_hides_the_value() {
        let s = Secret::new("vaulted", b"sk-live-canary-123456".to_vec())
            .versioned("vaulted", "v7")
            .leased("database/creds/agent/abc".into());
        assert_eq!(s.key_id().as_str(), "vaulted#v7");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("canary") && !dbg.contains("abc"), "{dbg}");
    }

    #[test]
    fn key_id_changes_when_the_key_rotates() {
        let a = Secret::new("k", b"one".to_vec());
        let b = Secret::new("k", b"two".to_vec());
        assert_ne!(a.key_id(), b.key_id());
        assert_eq!(a.key_id(), Secret::new("k", b"one".to_vec()).key_id());
    }
}
