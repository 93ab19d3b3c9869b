//! Issued tokens: `state_dir/tokens.json`, written by `keygate token issue|revoke` and read by a
//! running keygate, which notices changes within a second. Only SHA-256 hashes are stored; the
//! token itself is printed once, at issue.
//!
//! Writers hold an exclusive `flock` on `tokens.lock` and replace the file atomically (write to a
//! temporary file, then rename), so a reader never sees half a file and two writers never lose
//! each other's change.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One issued token, as stored (no token value).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Issued {
    /// Short public id, for `list` and `revoke`.
    pub id: String,
    pub agent: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Unix seconds.
    pub created: u64,
    pub expires: u64,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Default, Serialize, Deserialize)]
struct File {
    tokens: Vec<Issued>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "no state_dir is configured; add state_dir = \"~/.local/state/keygate\" to the config"
    )]
    NoStateDir,
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a keygate token file: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// Anyone who can write the token file (or replace it in its directory) can mint tokens.
    #[error("{}: {why}; keygate does not trust it (fix: chown to yourself and chmod {fix})", path.display())]
    Untrusted {
        path: PathBuf,
        why: String,
        fix: &'static str,
    },
    #[error("a token's lifetime must be at least 1s (got {0:?})")]
    TtlTooShort(Duration),
}

/// Refuses a state dir or token file that another user could have written: owned by another
/// uid, or writable by group or others.
fn check_trusted(path: &Path, meta: &fs::Metadata, fix: &'static str) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let why = if meta.uid() != me {
        format!("owned by uid {}, not by keygate's uid {me}", meta.uid())
    } else if meta.mode() & 0o022 != 0 {
        format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o777
        )
    } else {
        return Ok(());
    };
    Err(StoreError::Untrusted {
        path: path.to_path_buf(),
        why,
        fix,
    })
}

/// Checks the state dir and token file, where they exist.
fn check_store(dir: &Path) -> Result<(), StoreError> {
    match fs::metadata(dir) {
        Ok(m) => check_trusted(dir, &m, "700")?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir)(e)),
    }
    let path = tokens_path(dir);
    match fs::symlink_metadata(&path) {
        Ok(m) => check_trusted(&path, &m, "600"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(&path)(e)),
    }
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

pub fn hash_hex(token: &[u8]) -> String {
    hex::encode(Sha256::digest(token))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn tokens_path(dir: &Path) -> PathBuf {
    dir.join("tokens.json")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the issued tokens; a missing file is an empty store, one another user could have
/// written is refused.
pub fn read(dir: &Path) -> Result<Vec<Issued>, StoreError> {
    check_store(dir)?;
    let path = tokens_path(dir);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<File>(&bytes)
            .map(|f| f.tokens)
            .map_err(|e| StoreError::Corrupt {
                path,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::Io { path, source: e }),
    }
}

/// Runs `change` on the token list under the writers' lock and saves the result atomically.
fn update<T>(dir: &Path, change: impl FnOnce(&mut Vec<Issued>) -> T) -> Result<T, StoreError> {
    // Checked before the chmod below, which would otherwise quietly bless a dir someone else
    // could have written into.
    check_store(dir)?;
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let lock_path = dir.join("tokens.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    let _guard =
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
            StoreError::Io {
                path: lock_path.clone(),
                source: e.into(),
            }
        })?;
    let mut tokens = read(dir)?;
    let out = change(&mut tokens);
    let path = tokens_path(dir);
    let tmp = dir.join(format!(".tokens.json.{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(&File { tokens }).unwrap_or_default();
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(out)
}

/// Issues a token for `agent`, valid for `ttl`; returns the token (shown once) and its record.
pub fn issue(dir: &Path, agent: &str, ttl: Duration) -> Result<(String, Issued), StoreError> {
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
    };
    let stored = rec.clone();
    update(dir, move |t| {
        // Expired tokens are dropped as new ones are issued, so the file does not grow forever.
        let cutoff = now();
        t.retain(|x| x.expires > cutoff);
        t.push(stored);
    })?;
    Ok((token, rec))
}

/// Revokes the token with this id, or every token of this agent; returns how many.
pub fn revoke(dir: &Path, id: Option<&str>, agent: Option<&str>) -> Result<usize, StoreError> {
    update(dir, |t| {
        let mut n = 0;
        for x in t.iter_mut().filter(|x| !x.revoked) {
            if id.is_some_and(|i| i == x.id) || agent.is_some_and(|a| a == x.agent) {
                x.revoked = true;
                n += 1;
            }
        }
        n
    })
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
        let dir = tempfile::tempdir().unwrap();
        let (token, rec) = issue(dir.path(), "coder", Duration::from_secs(60)).unwrap();
        let text = fs::read_to_string(dir.path().join("tokens.json")).unwrap();
        assert!(!text.contains(&token));
        assert!(text.contains(&rec.sha256));
        let mode = fs::metadata(dir.path().join("tokens.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
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
    fn a_token_file_or_dir_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        issue(dir.path(), "coder", Duration::from_secs(60)).unwrap();
        let file = dir.path().join("tokens.json");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o620)).unwrap();
        let e = read(dir.path()).unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        assert!(issue(dir.path(), "coder", Duration::from_secs(60)).is_err());
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = read(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::Untrusted { .. }), "{e}");
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
