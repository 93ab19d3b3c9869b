//! The audit signing key: `state_dir/audit.key`, an ed25519 seed in hex, mode 0600, created on
//! first use. Anyone who can write the log can recompute every hash; only the holder of this key
//! can sign a checkpoint, so `keygate audit verify --key PUB` catches an edit made without it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use zeroize::Zeroizing;

/// The key's file name inside `state_dir`.
pub const KEY_FILE: &str = "audit.key";

/// What is signed: the record's `hash`, under a label so the signature means nothing elsewhere.
const DOMAIN: &[u8] = b"keygate audit record v1\n";

/// Why the audit key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the key file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    #[error("{}: readable by other users (mode {mode:03o}); run `chmod 600` on it, or remove it to make a new key (logs signed with the old key then verify only with the old public key)", path.display())]
    /// The key file is readable or writable by other users, so it is not used.
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a hex ed25519 seed.
    #[error("{}: not an audit key (64 hex characters expected)", path.display())]
    Corrupt {
        /// The key file.
        path: PathBuf,
    },
}

/// The private key. `Debug` shows the public half only.
pub struct AuditKey(SigningKey);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditKey(public {})", self.public_hex())
    }
}

impl AuditKey {
    /// Reads `dir/audit.key`, creating it (and `dir`, 0700) when missing. A key file that group
    /// or others can read is refused, not repaired: whoever could read it could forge a log.
    pub fn load_or_create(dir: &Path) -> Result<AuditKey, KeyError> {
        let path = dir.join(KEY_FILE);
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| KeyError::Io { path: p, source }
        };
        match Self::load(&path) {
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut seed[..]);
        let text = Zeroizing::new(hex::encode(&seed[..]) + "\n");
        // Written whole under a temporary name and linked into place: a keygate starting at
        // the same moment sees either no key or the whole key, and only one key wins.
        let tmp = dir.join(format!(".{KEY_FILE}.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(KeyError::Io {
                path: tmp,
                source: e,
            });
        }
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(KeyError::Io { path, source: e }),
        }
        Self::load(&path)
    }

    fn load(path: &Path) -> Result<AuditKey, KeyError> {
        let err = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(err)?);
        let corrupt = || KeyError::Corrupt {
            path: path.to_path_buf(),
        };
        let mut seed = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), &mut seed[..]).map_err(|_| corrupt())?;
        Ok(AuditKey(SigningKey::from_bytes(&seed)))
    }

    /// The public half, which `keygate audit verify --key` checks signatures with.
    pub fn public(&self) -> VerifyingKey {
        self.0.verifying_key()
    }

    /// The public key in hex, as `keygate audit key` prints it for `audit verify --key`.
    pub fn public_hex(&self) -> String {
        hex::encode(self.public().as_bytes())
    }

    /// Signs a record's `hash` (64 hex characters); the signature in hex.
    pub fn sign_hash(&self, hash: &str) -> String {
        let mut msg = Vec::with_capacity(DOMAIN.len() + hash.len());
        msg.extend_from_slice(DOMAIN);
        msg.extend_from_slice(hash.as_bytes());
        self.sign(&msg)
    }

    /// Signs a message that begins with its own label (the head file's); the signature in hex.
    pub fn sign(&self, msg: &[u8]) -> String {
        hex::encode(self.0.sign(msg).to_bytes())
    }

    /// A fixed key, so tests can compare signatures.
    #[cfg(test)]
    pub fn from_seed(seed: [u8; 32]) -> AuditKey {
        AuditKey(SigningKey::from_bytes(&seed))
    }
}

/// A public key as `keygate audit key` prints it (hex), or in base64.
pub fn parse_public(text: &str) -> Result<VerifyingKey, String> {
    let text = text.trim();
    let mut bytes = [0u8; 32];
    let decoded = if hex::decode_to_slice(text, &mut bytes).is_ok() {
        Some(bytes)
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
    };
    let bytes = decoded.ok_or_else(|| {
        "not a public key: expected the 64 hex characters `keygate audit key` prints".to_string()
    })?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not a valid ed25519 public key: {e}"))
}

/// Whether `sig` (hex) is the key's signature of `hash`.
pub fn holds(key: &VerifyingKey, hash: &str, sig: &str) -> bool {
    let mut msg = Vec::with_capacity(DOMAIN.len() + hash.len());
    msg.extend_from_slice(DOMAIN);
    msg.extend_from_slice(hash.as_bytes());
    holds_message(key, &msg, sig)
}

/// Whether `sig` (hex) is the key's signature of `msg`.
pub fn holds_message(key: &VerifyingKey, msg: &[u8], sig: &str) -> bool {
    let mut raw = [0u8; 64];
    if hex::decode_to_slice(sig, &mut raw).is_err() {
        return false;
    }
    key.verify(msg, &Signature::from_bytes(&raw)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_private_on_first_use_and_the_same_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = AuditKey::load_or_create(&state).unwrap();
        let mode = fs::metadata(state.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = AuditKey::load_or_create(&state).unwrap();
        assert_eq!(a.public_hex(), b.public_hex());
        assert!(!format!("{a:?}").contains(&fs::read_to_string(state.join(KEY_FILE)).unwrap()));
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        AuditKey::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = AuditKey::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(err, KeyError::Exposed { mode: 0o640, .. }),
            "{err}"
        );
    }

    #[test]
    fn signature_holds_only_for_its_hash_and_key() {
        let k = AuditKey::from_seed([7; 32]);
        let other = AuditKey::from_seed([8; 32]);
        let h = "ab".repeat(32);
        let sig = k.sign_hash(&h);
        assert!(holds(&k.public(), &h, &sig));
        assert!(!holds(&other.public(), &h, &sig));
        assert!(!holds(&k.public(), &"cd".repeat(32), &sig));
        let b64 = base64::engine::general_purpose::STANDARD.encode(k.public().as_bytes());
        assert_eq!(parse_public(&b64).unwrap(), k.public());
        assert_eq!(parse_public(&k.public_hex()).unwrap(), k.public());
        assert!(parse_public("nope").is_err());
    }
}
