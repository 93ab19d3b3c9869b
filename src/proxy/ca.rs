//! keygate's local CA for the forward proxy: one key and certificate in the state directory
//! (`proxy-ca.pem`, mode 0600), created on first use, and leaf certificates minted from it for
//! the hosts routes name.
//!
//! Creation is race-safe between two keygates starting at once: each writes a complete file
//! under a private name, then hard-links it to the final name, which fails if the name exists;
//! the loser reads the winner's file. A half-written CA is never visible.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The CA file's name in the state directory.
pub const FILE: &str = "proxy-ca.pem";
/// The CA's subject common name; also how a user finds it in a trust store.
const CA_NAME: &str = "keygate local proxy CA";
/// Leaf certificates kept at once; routes name few hosts, and a reload may name others.
const MAX_LEAVES: usize = 256;
/// A leaf's validity; minted again when it is this old less a day.
const LEAF_LIFE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why the CA could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The state directory or the CA file could not be written or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The CA file does not hold a certificate and key keygate wrote.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// The CA: its key, its certificate as exported, and the leaves minted so far.
pub struct Ca {
    key: KeyPair,
    /// Rebuilt from the key and fixed parameters: a leaf's issuer is the CA's name and key.
    issuer: rcgen::Certificate,
    pem: String,
    leaves: Mutex<HashMap<String, (SystemTime, Arc<rustls::sign::CertifiedKey>)>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA from `dir`, creating it (and `dir`, 0700) on first use.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        let path = dir.join(FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        if !path.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            create(&path).map_err(io(&path))?;
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let invalid = |message: String| CaError::Invalid {
            path: path.clone(),
            message,
        };
        let cert_pem = pem_block(&text, "CERTIFICATE")
            .ok_or_else(|| invalid("no CERTIFICATE block".into()))?;
        let key_pem = pem_block(&text, "PRIVATE KEY")
            .ok_or_else(|| invalid("no PRIVATE KEY block".into()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(e.to_string()))?;
        let issuer = ca_params()
            .self_signed(&key)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Ca {
            key,
            issuer,
            pem: cert_pem,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM, as `keygate ca export` prints it.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate and key for `host`, minted on first use and cached (bounded).
    pub fn leaf(&self, host: &str) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
        let now = SystemTime::now();
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((made, leaf)) = leaves.get(host) {
            if now.duration_since(*made).unwrap_or_default() + Duration::from_secs(86400)
                < LEAF_LIFE
            {
                return Ok(leaf.clone());
            }
        }
        let leaf = Arc::new(self.mint(host, now)?);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(host.to_string(), (now, leaf.clone()));
        Ok(leaf)
    }

    fn mint(&self, host: &str, now: SystemTime) -> Result<rustls::sign::CertifiedKey, String> {
        let mut params =
            CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        // A day back, for clocks a little behind keygate's.
        params.not_before = epoch + since_epoch.saturating_sub(Duration::from_secs(86400));
        params.not_after = epoch + since_epoch + LEAF_LIFE;
        let mut serial: [u8; 16] = rand::random();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from(serial.to_vec()));
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|e| e.to_string())?;
        let der: CertificateDer<'static> = cert.der().clone();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| e.to_string())?;
        Ok(rustls::sign::CertifiedKey::new(vec![der], signing))
    }
}

/// The CA's parameters, fixed, so the issuer rebuilt from the stored key matches the stored
/// certificate's name and key identifier.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "keygate");
    // Leaves only: no intermediate CA can be made from it.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    params
}

/// Writes a new CA to a private name, then links it to `path`; the loser of a race keeps the
/// winner's file.
fn create(path: &Path) -> std::io::Result<()> {
    let key = KeyPair::generate().map_err(std::io::Error::other)?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(std::io::Error::other)?;
    let text = format!("{}{}", cert.pem(), key.serialize_pem());
    let nonce: u64 = rand::random();
    let tmp = path.with_extension(format!("tmp.{}.{nonce:x}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    })();
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// The first PEM block with this label, with its BEGIN and END lines.
fn pem_block(text: &str, label: &str) -> Option<String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = text[start..].find(&end)? + start + end.len();
    Some(format!("{}\n", &text[start..stop]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_created_once_with_mode_0600_and_two_racing_creators_agree() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| Ca::load_or_create(&d).unwrap());
            let b = s.spawn(|| Ca::load_or_create(&d).unwrap());
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(a.pem(), b.pem());
        let mode = std::fs::metadata(d.join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!a.pem().contains("PRIVATE"));
        let again = Ca::load_or_create(&d).unwrap();
        assert_eq!(again.pem(), a.pem());
        let leftovers = std::fs::read_dir(&d).unwrap().count();
        assert_eq!(leftovers, 1, "only the CA file remains");
    }

    #[test]
    fn leaves_are_cached_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let a = ca.leaf("api.example.test").unwrap();
        let b = ca.leaf("api.example.test").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = ca.leaf("other.example.test").unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
