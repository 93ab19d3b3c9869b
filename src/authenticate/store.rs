//! Issued tokens, kept in the state store (`state_dir/state.db`), written by
//! `keygate token issue|revoke` and read by a running keygate, which notices changes within a
//! second (the store's token revision). Only SHA-256 hashes are stored; the token itself is
//! printed once, at issue.
//!
//! A `tokens.json` left by an earlier keygate is migrated into the store the first time the store
//! is opened and renamed `tokens.json.migrated`. Each write is one SQLite transaction, so a
//! reader never sees half a change and two writers never lose each other's.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::state::StateStore;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One issued token, as stored (no token value).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Issued {
    /// Short public id, for `list` and `revoke`.
    pub id: String,
    /// The name of the agent the token authenticates as.
    pub agent: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds after which the token is refused.
    pub expires: u64,
    /// Set by `token revoke`; a revoked token is refused but kept so `list` can show it.
    #[serde(default)]
    pub revoked: bool,
    /// Minted for a `keygate run` lease: valid only while a running keygate holds the lease, so
    /// a keygate starting after a crash revokes it.
    #[serde(default)]
    pub lease: bool,
}

#[derive(Default, Serialize, Deserialize)]
struct File {
    tokens: Vec<Issued>,
}

/// Why issuing, listing or revoking tokens failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The config names no state dir and none could be derived from the environment.
    #[error(
        "no state_dir is configured; add state_dir = \"~/.local/state/keygate\" to the config"
    )]
    NoStateDir,
    /// Reading the legacy token file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The legacy token file is not JSON of the expected shape.
    #[error("{}: not a keygate token file: {reason}", path.display())]
    Corrupt {
        /// The token file.
        path: PathBuf,
        /// The parse error.
        reason: String,
    },
    /// The state store refused the operation.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// `--ttl` was below one second, which would issue a token already expired.
    #[error("a token's lifetime must be at least 1s (got {0:?})")]
    TtlTooShort(Duration),
}

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `kg_` + 40 base62 characters (238 bits) from the OS-seeded CSPRNG.
pub fn mint() -> String {
    let mut rng = rand::rng();
    let mut t = String::with_capacity(43);
    t.push_str("kg_");
    for _ in 0..40 {
        t.push(BASE62[rng.random_range(0..BASE62.len())] as char);
    }
    t
}

/// Lower-case hex SHA-256 of a token: the only form in which a token is stored or compared.
pub fn hash_hex(token: &[u8]) -> String {
    hex::encode(Sha256::digest(token))
}

/// Unix seconds now, for `created` and `expires` (0 if the clock is before 1970).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn json_path(dir: &Path) -> PathBuf {
    dir.join("tokens.json")
}

/// Opens the state store in `dir`, first moving a `tokens.json` from an earlier keygate into it.
pub fn open(dir: &Path) -> Result<Arc<dyn StateStore>, StoreError> {
    let store = crate::state::open(dir)?;
    migrate(dir, &*store)?;
    Ok(store)
}

fn migrate(dir: &Path, store: &dyn StateStore) -> Result<(), StoreError> {
    let path = json_path(dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::Io { path, source: e }),
    };
    let file: File = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // Ids are unique and inserting one twice keeps the first, so two processes migrating at
    // once, or a migration interrupted before the rename, end in the same state.
    for t in &file.tokens {
        store.add_token(t)?;
    }
    match fs::rename(&path, dir.join("tokens.json.migrated")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::Io { path, source: e }),
    }
    tracing::info!(
        tokens = file.tokens.len(),
        "migrated tokens.json into the state store"
    );
    Ok(())
}

/// Opens the store the config names: the shared one when `state` says so, else the embedded one
/// in `state_dir` (migrating a `tokens.json`).
pub fn open_for(config: &crate::config::Config) -> Result<Arc<dyn StateStore>, StoreError> {
    if let crate::config::StateBackend::Redis(_) = config.state {
        return crate::state::open_configured(config)?.ok_or(StoreError::NoStateDir);
    }
    match &config.state_dir {
        Some(dir) => open(dir),
        None => Err(StoreError::NoStateDir),
    }
}

/// Reads the issued tokens; a store not created yet is empty.
pub fn read(dir: &Path) -> Result<Vec<Issued>, StoreError> {
    Ok(open(dir)?.tokens()?)
}

/// Issues a token for `agent`, valid for `ttl`; returns the token (shown once) and its record.
pub fn issue(dir: &Path, agent: &str, ttl: Duration) -> Result<(String, Issued), StoreError> {
    issue_in(&*open(dir)?, agent, ttl)
}

/// Issues a token for `agent` in `store`, valid for `ttl`.
pub fn issue_in(
    store: &dyn StateStore,
    agent: &str,
    ttl: Duration,
) -> Result<(String, Issued), StoreError> {
    if ttl < Duration::from_secs(1) {
        return Err(StoreError::TtlTooShort(ttl));
    }
    let token = mint();
    let created = now();
    let rec = Issued {
        id: format!("tok_{}", &hash_hex(token.as_bytes())[..12]),
        agent: agent.to_string(),
        sha256: hash_hex(token.as_bytes()),
        created,
        expires: created.saturating_add(ttl.as_secs()),
        revoked: false,
        lease: false,
    };
    store.add_token(&rec)?;
    Ok((token, rec))
}

/// Revokes the token with this id, or every token of this agent; returns how many.
pub fn revoke(dir: &Path, id: Option<&str>, agent: Option<&str>) -> Result<usize, StoreError> {
    Ok(open(dir)?.revoke_tokens(id, agent)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_have_the_scanner_friendly_shape() {
        let t = mint();
        assert!(t.starts_with("kg_") && t.len() == 43, "{t}");
        assert!(t[3..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(mint(), t);
    }

    #[test]
    fn issue_stores_only_a_hash_and_revoke_marks_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (token, rec) = issue(dir.path(), "coder", Duration::from_secs(60)).unwrap();
        let db = dir.path().join("state.db");
        let bytes = fs::read(&db).unwrap();
        let wal = fs::read(dir.path().join("state.db-wal")).unwrap_or_default();
        let has = |b: &[u8], s: &str| b.windows(s.len()).any(|w| w == s.as_bytes());
        assert!(!has(&bytes, &token) && !has(&wal, &token));
        assert!(has(&bytes, &rec.sha256) || has(&wal, &rec.sha256));
        let mode = fs::metadata(&db).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(revoke(dir.path(), Some(&rec.id), None).unwrap(), 1);
        assert!(read(dir.path()).unwrap()[0].revoked);
        assert_eq!(
            revoke(dir.path(), None, Some("coder")).unwrap(),
            0,
            "already revoked"
        );
    }

    #[test]
    fn a_tokens_json_from_an_earlier_keygate_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        let old = Issued {
            id: "tok_0123456789ab".into(),
            agent: "coder".into(),
            sha256: hash_hex(b"kg_old"),
            created: now(),
            expires: now() + 3600,
            revoked: false,
            lease: false,
        };
        let json = serde_json::to_vec(&File {
            tokens: vec![old.clone()],
        })
        .unwrap();
        fs::write(dir.path().join("tokens.json"), json).unwrap();
        assert_eq!(read(dir.path()).unwrap(), vec![old.clone()]);
        assert!(!dir.path().join("tokens.json").exists());
        assert!(dir.path().join("tokens.json.migrated").exists());
        issue(dir.path(), "coder", Duration::from_secs(60)).unwrap();
        assert_eq!(read(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn a_token_store_or_dir_others_can_write_is_refused() {
        use crate::state::StateError;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        issue(dir.path(), "coder", Duration::from_secs(60)).unwrap();
        let file = dir.path().join("state.db");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o620)).unwrap();
        let e = read(dir.path()).unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        assert!(issue(dir.path(), "coder", Duration::from_secs(60)).is_err());
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = read(dir.path()).unwrap_err();
        assert!(
            matches!(e, StoreError::State(StateError::Untrusted { .. })),
            "{e}"
        );
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(read(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn a_lifetime_under_one_second_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for ttl in [Duration::ZERO, Duration::from_millis(999)] {
            let e = issue(dir.path(), "coder", ttl).unwrap_err();
            assert!(matches!(e, StoreError::TtlTooShort(_)), "{e}");
        }
        assert!(issue(dir.path(), "coder", Duration::from_secs(1)).is_ok());
    }
}
