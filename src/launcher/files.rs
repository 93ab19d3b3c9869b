//! What points a run's tools at keygate's forward proxy, when keygate has one: the proxy
//! variables (with the run's token as proxy credentials), a CA bundle of the system roots plus
//! keygate's CA in every variable common tools read, an AWS shared-credentials file and git
//! settings holding placeholders where a route asks for them.
//!
//! keygate decides the contents ([`grant`], in the lease answer); the launcher writes the files
//! ([`prepare`]) into a private directory, `keygate-run-UID/run-PID` (0700) under
//! `XDG_RUNTIME_DIR` or the temp dir, before CMD starts (so the sandbox's snapshot of grants
//! includes it), and removes it when CMD ends. A launcher that was SIGKILLed cannot remove its
//! own: the next `keygate run` removes every `run-PID` whose launcher is gone. The files hold no
//! secret (placeholders, a public CA, the run's token which dies with the run).

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::config::{Inject, Route};

/// The forward proxy as `keygate run` needs it.
#[derive(Clone, Debug)]
pub struct ProxyInfo {
    /// The proxy listeners' bound addresses.
    pub addrs: Vec<SocketAddr>,
    /// keygate's CA certificate (PEM), which signs the leaf certificates the proxy presents.
    pub ca_pem: String,
}

/// Variables tools read for their CA bundle; `SSL_CERT_FILE` replaces the system store, so the
/// bundle holds the system roots too.
pub const CA_VARS: [&str; 6] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "CURL_CA_BUNDLE",
    "AWS_CA_BUNDLE",
];

/// Where the usual system root bundles live (Debian, Fedora, Alpine/macOS).
const SYSTEM_ROOTS: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// keygate's side: the proxy variables go into `set`; the files' contents are returned for the
/// launcher. Loopback goes direct (`NO_PROXY`), so SDK base URLs on keygate's reverse proxy do.
pub(crate) fn grant(
    proxy: &ProxyInfo,
    token: &str,
    routes: &[&Route],
    placeholders: &[(String, String)],
    set: &mut Map<String, Value>,
) -> Value {
    let Some(addr) = proxy.addrs.first() else {
        return Value::Null;
    };
    let url = format!("http://keygate:{token}@{addr}");
    for k in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
        set.insert(k.into(), url.clone().into());
    }
    for k in ["NO_PROXY", "no_proxy"] {
        set.insert(k.into(), "127.0.0.1,localhost,::1".into());
    }
    let of = |r: &Route| {
        placeholders
            .iter()
            .find(|(name, _)| *name == r.name)
            .map(|(_, v)| v.clone())
    };
    let asks = |r: &&&Route| r.placeholder_env.is_some();
    let git: Vec<Value> = routes
        .iter()
        .filter(asks)
        .filter_map(|r| Some(json!([format!("https://{}", r.host.as_ref()?), of(r)?])))
        .collect();
    let aws = routes
        .iter()
        .filter(asks)
        .find(|r| matches!(r.inject, Inject::AwsSigV4 { .. }))
        .and_then(|r| of(r));
    json!({"ca_pem": proxy.ca_pem, "proxy_url": url, "git": git, "aws": aws})
}

/// The launcher's private directory for one run; removed by [`RunFiles::remove`].
#[derive(Debug)]
pub struct RunFiles {
    dir: PathBuf,
}

impl RunFiles {
    /// Removes the run's files.
    pub fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The launcher's side: writes the files `files` (the lease answer's) describes and adds the
/// variables naming them to `set`. `Ok(None)` when keygate has no forward proxy.
pub fn prepare(files: &Value, set: &mut Map<String, Value>) -> Result<Option<RunFiles>, String> {
    let Some(ca_pem) = files["ca_pem"].as_str() else {
        return Ok(None);
    };
    let base = private_base()?;
    clean_stale(&base);
    let dir = base.join(format!("run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let run = RunFiles { dir: dir.clone() };
    let written = fill(&dir, files, ca_pem, set);
    if let Err(e) = written {
        run.remove();
        return Err(e);
    }
    Ok(Some(run))
}

fn fill(
    dir: &Path,
    files: &Value,
    ca_pem: &str,
    set: &mut Map<String, Value>,
) -> Result<(), String> {
    let mut bundle = SYSTEM_ROOTS
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(ca_pem);
    let ca = write(dir, "ca-bundle.pem", &bundle)?;
    for var in CA_VARS {
        set.insert(var.into(), ca.clone().into());
    }
    if let Some(p) = files["aws"].as_str() {
        let text = format!("[default]\naws_access_key_id = {p}\naws_secret_access_key = {p}\n");
        let path = write(dir, "aws-credentials", &text)?;
        set.insert("AWS_SHARED_CREDENTIALS_FILE".into(), path.into());
    }
    // git reads GIT_CONFIG_COUNT/KEY_n/VALUE_n; entries the user set already are kept.
    let mut entries: Vec<(String, String)> = Vec::new();
    if let Some(url) = files["proxy_url"].as_str() {
        entries.push(("http.proxy".into(), url.into()));
        // git (libcurl's anyauth) otherwise sends the token only after a 407, and a CONNECT to a
        // placeholder route without one is served (identity by placeholder), so it never would.
        entries.push(("http.proxyAuthMethod".into(), "basic".into()));
    }
    entries.push(("http.sslCAInfo".into(), ca));
    for pair in files["git"].as_array().into_iter().flatten() {
        let (Some(url), Some(p)) = (pair[0].as_str(), pair[1].as_str()) else {
            continue;
        };
        // A helper that answers only `get`, with the placeholder as the password.
        let helper = format!(
            "!f() {{ test \"$1\" = get && echo username=x-access-token && echo password={p}; }}; f"
        );
        entries.push((format!("credential.{url}.helper"), helper));
    }
    let first: usize = std::env::var("GIT_CONFIG_COUNT")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    for (i, (k, v)) in entries.iter().enumerate() {
        set.insert(format!("GIT_CONFIG_KEY_{}", first + i), k.clone().into());
        set.insert(format!("GIT_CONFIG_VALUE_{}", first + i), v.clone().into());
    }
    set.insert(
        "GIT_CONFIG_COUNT".into(),
        (first + entries.len()).to_string().into(),
    );
    Ok(())
}

fn write(dir: &Path, name: &str, text: &str) -> Result<String, String> {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path.display().to_string())
}

/// `keygate-run-UID` under `XDG_RUNTIME_DIR`, else `~/.cache`, else the temp dir: created 0700,
/// and passed over when it is a link, another user's, or open to others (another user may
/// pre-create it in a shared `/tmp` to block runs, so the next place is tried).
fn private_base() -> Result<PathBuf, String> {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| format!("/proc/self: {e}"))?;
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        roots.push(xdg);
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        let cache = PathBuf::from(home).join(".cache");
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cache);
        roots.push(cache);
    }
    roots.push(std::env::temp_dir());
    private_base_in(&roots, uid)
}

/// The first `ROOT/keygate-run-UID` of `roots` that is (or is now created as) a private
/// directory of `uid`.
fn private_base_in(roots: &[PathBuf], uid: u32) -> Result<PathBuf, String> {
    let mut refused = Vec::new();
    for root in roots.iter().filter(|r| r.is_dir()) {
        let base = root.join(format!("keygate-run-{uid}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                refused.push(format!("{}: {e}", base.display()));
                continue;
            }
        }
        match std::fs::symlink_metadata(&base) {
            Ok(m) if m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0 => return Ok(base),
            _ => refused.push(format!(
                "{} is not a private directory of this user (0700)",
                base.display()
            )),
        }
    }
    Err(format!(
        "no private directory for the run's files: {}",
        refused.join("; ")
    ))
}

/// Removes the directories of runs whose launcher is gone (SIGKILLed before it could).
fn clean_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("run-")) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_dir_another_user_planted_is_passed_over_for_the_next_private_place() {
        use std::os::unix::fs::PermissionsExt as _;
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        let shared = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let planted = shared.path().join(format!("keygate-run-{uid}"));
        std::fs::create_dir(&planted).unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
        let roots = [shared.path().to_path_buf(), cache.path().to_path_buf()];
        let base = private_base_in(&roots, uid).unwrap();
        assert_eq!(base, cache.path().join(format!("keygate-run-{uid}")));
        let mode = std::fs::metadata(&base).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Benign neighbour: a clean first place is used.
        let clean = tempfile::tempdir().unwrap();
        let roots = [clean.path().to_path_buf(), cache.path().to_path_buf()];
        assert_eq!(
            private_base_in(&roots, uid).unwrap(),
            clean.path().join(format!("keygate-run-{uid}"))
        );
        // Nowhere private: a clear error, no run.
        assert!(private_base_in(&roots[..0], uid).is_err());
    }

    #[test]
    fn files_hold_keygates_ca_after_the_system_roots_and_are_named_in_every_variable() {
        let files = json!({
            "ca_pem": "-----BEGIN CERTIFICATE-----\nKEYGATE\n-----END CERTIFICATE-----\n",
            "proxy_url": "http://keygate:kg_x@127.0.0.1:1",
            "git": [["https://git.example.test", "kgph_git_abc"]],
            "aws": "kgph_aws_def",
        });
        let mut set = Map::new();
        let run = prepare(&files, &mut set).unwrap().unwrap();
        let ca = set["SSL_CERT_FILE"].as_str().unwrap().to_string();
        for v in CA_VARS {
            assert_eq!(set[v], ca.as_str());
        }
        let bundle = std::fs::read_to_string(&ca).unwrap();
        assert!(bundle.trim_end().ends_with("-----END CERTIFICATE-----"));
        assert!(bundle.contains("KEYGATE"));
        let aws = set["AWS_SHARED_CREDENTIALS_FILE"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(std::fs::read_to_string(&aws)
            .unwrap()
            .contains("= kgph_aws_def"));
        let n: usize = set["GIT_CONFIG_COUNT"].as_str().unwrap().parse().unwrap();
        let keys: Vec<&str> = (0..n)
            .filter_map(|i| {
                set.get(&format!("GIT_CONFIG_KEY_{i}"))
                    .and_then(Value::as_str)
            })
            .collect();
        assert!(keys.contains(&"credential.https://git.example.test.helper"));
        let dir = Path::new(&ca).parent().unwrap().to_path_buf();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        run.remove();
        assert!(!dir.exists());
    }

    #[test]
    fn a_run_directory_whose_launcher_is_gone_is_removed_at_the_next_start() {
        let base = private_base().unwrap();
        // pid_max is at most 2^22: this pid cannot be running.
        let stale = base.join("run-4194999");
        std::fs::create_dir_all(&stale).unwrap();
        clean_stale(&base);
        assert!(!stale.exists());
    }

    #[test]
    fn without_a_proxy_there_are_no_files() {
        let mut set = Map::new();
        assert!(prepare(&Value::Null, &mut set).unwrap().is_none());
        assert!(set.is_empty());
    }
}
