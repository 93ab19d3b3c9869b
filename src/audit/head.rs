//! The end anchor: `state_dir/audit.head`, naming the last signed record keygate wrote.
//!
//! A log cut right after a signed checkpoint or `stop` record looks whole: everything up to the
//! cut verifies and is signed. Only something kept apart from the log can say how far it went.
//! The writer thread rewrites this file (temporary file + rename, mode 0600) each time a signed
//! record reaches the log, and `keygate audit verify --head FILE` then requires the log to reach
//! that record. The head is signed too, under its own label, so a signature copied from a
//! record cannot pass for a head that points at an earlier record.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::key::{self, AuditKey};

/// The head file's name in `state_dir`.
pub const HEAD_FILE: &str = "audit.head";

/// What is signed: the label, then the log path, the record's hash and its line, one per line.
const DOMAIN: &[u8] = b"keygate audit head v1\n";

/// Larger than this is not a head file.
const MAX_HEAD: u64 = 64 * 1024;

/// The end anchor as written: which record of which log keygate signed last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The log the record is in, as keygate opened it.
    pub log: PathBuf,
    /// The `hash` of the last signed record written.
    pub hash: String,
    /// Its line number in the log.
    pub line: u64,
    /// When it was written (not signed: for the reader only).
    pub time: String,
    /// The key's signature over `log`, `hash` and `line`.
    pub sig: String,
}

fn message(log: &Path, hash: &str, line: u64) -> Vec<u8> {
    let mut msg = DOMAIN.to_vec();
    msg.extend_from_slice(log.as_os_str().as_encoded_bytes());
    msg.push(b'\n');
    msg.extend_from_slice(hash.as_bytes());
    msg.push(b'\n');
    msg.extend_from_slice(line.to_string().as_bytes());
    msg
}

impl Head {
    /// A head naming `hash` at `line` of `log`, signed with `key`.
    pub fn new(key: &AuditKey, log: &Path, hash: &str, line: u64) -> Head {
        Head {
            log: log.to_path_buf(),
            hash: hash.to_string(),
            line,
            time: super::now_rfc3339(),
            sig: key.sign(&message(log, hash, line)),
        }
    }

    /// Reads a head file and checks its signature.
    pub fn read(path: &Path, public: &VerifyingKey) -> Result<Head, String> {
        let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.len() > MAX_HEAD {
            return Err(format!("{}: not an audit head file", path.display()));
        }
        let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let head: Head = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not an audit head file ({e})", path.display()))?;
        if !key::holds_message(
            public,
            &message(&head.log, &head.hash, head.line),
            &head.sig,
        ) {
            return Err(format!(
                "{}: the head's signature does not hold (edited, or signed by another key)",
                path.display()
            ));
        }
        Ok(head)
    }

    /// Replaces the file at `path` whole: a reader sees the old head or the new one.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        text.push(b'\n');
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_data()?;
            fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn head_is_written_private_and_read_back_only_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HEAD_FILE);
        let k = AuditKey::from_seed([1; 32]);
        let h = Head::new(&k, Path::new("/var/log/a.jsonl"), &"ab".repeat(32), 27);
        h.write(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Head::read(&path, &k.public()).unwrap(), h);
        let other = AuditKey::from_seed([2; 32]);
        assert!(Head::read(&path, &other.public()).is_err());

        // Pointing the head at an earlier record without the key does not hold.
        let text = fs::read_to_string(&path).unwrap().replace("27", "5");
        fs::write(&path, text).unwrap();
        let err = Head::read(&path, &k.public()).unwrap_err();
        assert!(err.contains("does not hold"), "{err}");
        // A record's own signature (over its hash) is not a head signature.
        let mut forged = h.clone();
        forged.sig = k.sign_hash(&h.hash);
        forged.write(&path).unwrap();
        assert!(Head::read(&path, &k.public()).is_err());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
