//! `keygate doctor`: checks a setup the way `serve` would meet it (config, secret sources,
//! upstreams, audit log, state directory, listen addresses, admin socket, Landlock) and says, for
//! each problem, the one thing to do about it. Outside the request path; it sends no request with
//! a credential and never shows a secret value (not even its length).
//!
//! Every check is bounded: secrets by one overall deadline, each upstream and each probe of a busy
//! port by its own, so a stalled command or server cannot make doctor hang.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Config, Listen, Mode, StateBackend};
use crate::secret::SecretSource;

/// Fetching every secret may take this long in all; a source's own timeout usually ends sooner.
const SECRETS_DEADLINE: Duration = Duration::from_secs(30);
/// Resolving, connecting to and (for https) shaking hands with one upstream.
const UPSTREAM_DEADLINE: Duration = Duration::from_secs(5);
/// Asking whatever holds a busy port for `/healthz`.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);
/// State directory entries looked at; a state dir holds a handful.
const MAX_STATE_ENTRIES: usize = 1000;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// `keygate doctor` arguments.
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Config file to check (default: $KEYGATE_CONFIG, else ./keygate.toml, else
    /// $XDG_CONFIG_HOME/keygate/keygate.toml).
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the findings as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    /// Worth knowing, not a problem: exit 0.
    Warn,
    /// Not checked, and why (the detail says).
    Skip,
    /// A problem: exit 1.
    Fail,
}

/// One finding: what was checked, how it came out and, for a problem, what to do.
#[derive(Debug, Serialize)]
struct Finding {
    check: &'static str,
    subject: String,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn finding(
    check: &'static str,
    subject: impl Into<String>,
    status: Status,
    detail: impl Into<String>,
) -> Finding {
    Finding {
        check,
        subject: subject.into(),
        status,
        detail: detail.into(),
        fix: None,
    }
}

impl Finding {
    fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }
}

/// Runs every check; exit 0 when none found a problem, 1 when one did.
pub fn main(args: DoctorArgs) -> ExitCode {
    let mut out = Vec::new();
    let path = args.config.clone().or_else(default_config);
    match &path {
        None => out.push(
            finding(
                "config",
                "(none)",
                Status::Fail,
                "no config file given and none found",
            )
            .fix("give --config FILE (or set KEYGATE_CONFIG), or write one with `keygate init`"),
        ),
        Some(path) => check_config(path, &mut out),
    }
    out.push(landlock());
    let problems = out.iter().filter(|f| f.status == Status::Fail).count();
    let warnings = out.iter().filter(|f| f.status == Status::Warn).count();
    if args.json {
        let v = serde_json::json!({
            "config": path,
            "ok": problems == 0,
            "problems": problems,
            "warnings": warnings,
            "checks": out,
        });
        println!("{v}");
    } else {
        print_text(path.as_deref(), &out, problems, warnings);
    }
    if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn print_text(path: Option<&Path>, out: &[Finding], problems: usize, warnings: usize) {
    let mut s = String::new();
    if let Some(p) = path {
        s.push_str(&format!("keygate doctor: {}\n", p.display()));
    }
    for f in out {
        let tag = match f.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Skip => "skip",
            Status::Fail => "FAIL",
        };
        s.push_str(&format!(
            "{tag}  {:<12} {}: {}\n",
            f.check, f.subject, f.detail
        ));
        if let Some(fix) = &f.fix {
            s.push_str(&format!("      fix: {fix}\n"));
        }
    }
    let w = match warnings {
        0 => String::new(),
        1 => " (1 warning)".into(),
        n => format!(" ({n} warnings)"),
    };
    match problems {
        0 => s.push_str(&format!("all checks passed{w}\n")),
        1 => s.push_str(&format!("1 problem found{w}\n")),
        n => s.push_str(&format!("{n} problems found{w}\n")),
    }
    print!("{s}");
}

/// `./keygate.toml`, else `$XDG_CONFIG_HOME/keygate/keygate.toml` (`~/.config/…`), when it exists.
fn default_config() -> Option<PathBuf> {
    let here = PathBuf::from("keygate.toml");
    if here.is_file() {
        return Some(here);
    }
    let base = crate::service::config_home()?;
    Some(base.join("keygate/keygate.toml")).filter(|p| p.is_file())
}

fn check_config(path: &Path, out: &mut Vec<Finding>) {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            out.push(
                finding("config", path.display().to_string(), Status::Fail, e.to_string()).fix(format!(
                    "edit {} where the message points (`keygate check --config {}` says the same; docs/config.md lists every key)",
                    path.display(),
                    path.display()
                )),
            );
            return;
        }
    };
    out.push(finding(
        "config",
        path.display().to_string(),
        Status::Ok,
        format!(
            "valid: {} route(s), {} agent(s), {} secret(s) (policy {})",
            config.routes.len(),
            config.agents.len(),
            config.secrets.len(),
            config.policy_version()
        ),
    ));
    if let Some(files) = &config.tls {
        match crate::listen::tls::server_config(files) {
            Ok(_) => out.push(finding(
                "tls",
                "certificate",
                Status::Ok,
                "certificate and key load",
            )),
            Err(e) => out.push(
                finding("tls", "certificate", Status::Fail, e)
                    .fix("point tls at a readable PEM certificate chain and its private key"),
            ),
        }
    }
    check_agent_tokens(&config, out);
    check_secrets(path, &config, out);
    check_upstreams(&config, out);
    check_audit(&config, out);
    check_state_dir(&config, out);
    let running = check_admin_socket(&config, out);
    check_listeners(&config, running, out);
}

// === agent tokens ===

/// `serve` reads each agent's `token_env` at start and refuses to start when one is unset or two
/// agents share a value. Checked here without `Tokens::from_config`, which would open (and
/// tighten) the state store: doctor changes nothing.
fn check_agent_tokens(config: &Config, out: &mut Vec<Finding>) {
    use sha2::{Digest, Sha256};
    let mut seen: Vec<([u8; 32], &str)> = Vec::new();
    let mut problem = false;
    // Mirrors `Tokens::from_config`: in a dry run the first agent whose variable is unset (when
    // no agent is open already) takes token-less callers instead of stopping start-up.
    let mut open = false;
    for agent in &config.agents {
        open |= agent.open;
        let Some(var) = &agent.token_env else {
            continue;
        };
        let value = zeroize::Zeroizing::new(std::env::var(var).unwrap_or_default());
        let value = value.trim();
        let subject = format!("{} (token_env {var})", agent.name);
        if value.is_empty() && config.mode == Mode::DryRun && !open {
            open = true;
            out.push(
                finding("agents", subject, Status::Warn, format!("{var} is not set: in this dry run callers need no token and act as this agent"))
                    .fix(format!("export {var}=… before `keygate serve` to require a token")),
            );
            continue;
        }
        if value.is_empty() {
            problem = true;
            out.push(
                finding("agents", subject, Status::Fail, format!("{var} is not set or empty: serve refuses to start"))
                    .fix(format!("export {var}=… (a long random string: the token this agent will send) before `keygate serve`")),
            );
            continue;
        }
        let digest: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        if let Some((_, other)) = seen.iter().find(|(d, _)| *d == digest) {
            problem = true;
            out.push(
                finding(
                    "agents",
                    subject,
                    Status::Fail,
                    format!("the same token as agent {other}: serve refuses to start"),
                )
                .fix("give each agent its own token"),
            );
        }
        seen.push((digest, &agent.name));
    }
    if !problem && !seen.is_empty() {
        out.push(finding(
            "agents",
            "token_env",
            Status::Ok,
            "every agent's token variable is set (values not shown)",
        ));
    }
}

// === secrets ===

fn check_secrets(path: &Path, config: &Config, out: &mut Vec<Finding>) {
    if config.secrets.is_empty() {
        return;
    }
    if config.mode == Mode::DryRun {
        out.push(finding(
            "secrets",
            "all",
            Status::Skip,
            "mode = \"dry_run\" fetches no secret; switch to proxy and run doctor again to fetch them",
        ));
        return;
    }
    // `check --fetch`'s own code, on a thread of its own so one deadline bounds every source.
    let (tx, rx) = std::sync::mpsc::channel();
    let file = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("doctor-fetch".into())
        .spawn(move || {
            let report = Config::load(&file)
                .map_err(|e| e.to_string())
                .and_then(|c| crate::credential::fetch_report(&c));
            let _ = tx.send(report);
        });
    let report = match spawned {
        Err(e) => Err(format!("cannot start fetching: {e}")),
        Ok(_) => match rx.recv_timeout(SECRETS_DEADLINE) {
            Ok(r) => r,
            Err(_) => Err(format!(
                "fetching the secrets took longer than {}s",
                SECRETS_DEADLINE.as_secs()
            )),
        },
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            out.push(
                finding("secrets", "all", Status::Fail, e)
                    .fix("run `keygate check --fetch --config FILE` to see which source hangs; lower that secret's timeout"),
            );
            return;
        }
    };
    for entry in report {
        let name = entry["name"].as_str().unwrap_or("?").to_string();
        let label = entry["source"].as_str().unwrap_or("?").to_string();
        let subject = format!("{name} ({label})");
        match entry["error"].as_str() {
            None => out.push(finding(
                "secret",
                subject,
                Status::Ok,
                "fetched (value not shown)",
            )),
            Some(error) => {
                let spec = config.secrets.iter().find(|s| s.name == name);
                let fix = spec.map_or_else(
                    || format!("check [secrets.{name}]"),
                    |s| secret_fix(&name, &s.source, error),
                );
                out.push(finding("secret", subject, Status::Fail, error).fix(fix));
            }
        }
    }
}

/// The one thing to do about a secret that could not be fetched, by its source.
fn secret_fix(name: &str, source: &SecretSource, error: &str) -> String {
    match source {
        SecretSource::Env { var } => format!(
            "export {var} in the environment keygate starts in (a service reads it from its EnvironmentFile; `keygate service install` names it)"
        ),
        SecretSource::File { path } if error.contains("readable by group or others") => {
            format!("chmod 600 {}", path.display())
        }
        SecretSource::File { path } if !path.exists() => format!(
            "create {} holding only the key (chmod 600), or point [secrets.{name}] path at the right file",
            path.display()
        ),
        SecretSource::File { path } => format!(
            "make {} a regular file you own, readable only by you (chmod 600)",
            path.display()
        ),
        SecretSource::Command { argv, .. } if error.contains("did not finish") => format!(
            "run `{}` yourself: it must print the key without asking anything (sign in first), or raise [secrets.{name}] timeout",
            argv.first().map(String::as_str).unwrap_or("?")
        ),
        SecretSource::Command { argv, .. } => format!(
            "run `{}` yourself until it prints the key (sign in, check its arguments); keygate runs it with a cleared environment",
            argv.first().map(String::as_str).unwrap_or("?")
        ),
        _ => format!(
            "check [secrets.{name}]'s address and credentials; `keygate check --fetch` shows the same error"
        ),
    }
}

// === upstreams ===

fn check_upstreams(config: &Config, out: &mut Vec<Finding>) {
    if config.routes.is_empty() {
        return;
    }
    if config.mode == Mode::DryRun {
        out.push(finding(
            "upstream",
            "all",
            Status::Skip,
            "mode = \"dry_run\" contacts no upstream",
        ));
        return;
    }
    // One probe per distinct upstream; several routes often share one.
    let mut targets: Vec<Target> = Vec::new();
    for r in &config.routes {
        let tls = r.upstream.scheme == http::uri::Scheme::HTTPS;
        let url = format!(
            "{}://{}",
            if tls { "https" } else { "http" },
            r.upstream.authority
        );
        if let Some(t) = targets.iter_mut().find(|t| t.url == url) {
            t.routes.push(r.name.clone());
            continue;
        }
        let authority = &r.upstream.authority;
        targets.push(Target {
            url,
            tls,
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            routes: vec![r.name.clone()],
        });
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            out.push(finding(
                "upstream",
                "all",
                Status::Fail,
                format!("cannot start the runtime: {e}"),
            ));
            return;
        }
    };
    let client = tls_client();
    let results = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (i, t) in targets.iter().enumerate() {
            let (host, port, tls) = (t.host.clone(), t.port, t.tls.then(|| client.clone()));
            set.spawn(async move {
                let r = tokio::time::timeout(UPSTREAM_DEADLINE, reach(host, port, tls))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!("no answer within {}s", UPSTREAM_DEADLINE.as_secs()))
                    });
                (i, r)
            });
        }
        let mut results = vec![None; targets.len()];
        while let Some(Ok((i, r))) = set.join_next().await {
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(r);
            }
        }
        results
    });
    for (t, r) in targets.into_iter().zip(results) {
        let subject = format!("{} (route {})", t.url, t.routes.join(", "));
        let (host, port) = (&t.host, t.port);
        let reach_fix = format!("check the route's upstream URL and that this machine can reach {host}:{port} (DNS, firewall, VPN, proxy)");
        match r {
            Some(Ok(())) => out.push(finding(
                "upstream",
                subject,
                Status::Ok,
                if t.tls {
                    "reachable, TLS handshake ok"
                } else {
                    "reachable (plain http)"
                },
            )),
            Some(Err(e)) if e.starts_with("TLS") => out.push(
                finding("upstream", subject, Status::Fail, e)
                    .fix(format!("check the route's upstream URL (https:// vs http://) and that {host}'s certificate is issued by a public or system-trusted CA")),
            ),
            Some(Err(e)) => out.push(finding("upstream", subject, Status::Fail, e).fix(reach_fix)),
            None => out.push(
                finding("upstream", subject, Status::Fail, "the probe did not finish").fix(reach_fix),
            ),
        }
    }
}

/// One upstream to probe and the routes that use it.
struct Target {
    /// `scheme://authority`, as findings name it.
    url: String,
    tls: bool,
    host: String,
    port: u16,
    routes: Vec<String>,
}

/// The roots `forward` trusts: webpki's and the system's.
fn tls_client() -> Option<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()
        .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
}

/// TCP connect and, with `tls`, a handshake; nothing is sent after it.
async fn reach(
    host: String,
    port: u16,
    tls: Option<Option<Arc<rustls::ClientConfig>>>,
) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let Some(tls) = tls else { return Ok(()) };
    let tls = tls.ok_or("TLS: cannot build a client configuration")?;
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("TLS: {host} is not a valid server name: {e}"))?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, stream)
        .await
        .map(drop)
        .map_err(|e| format!("TLS handshake with {host}:{port} failed: {e}"))
}

// === audit log ===

fn check_audit(config: &Config, out: &mut Vec<Finding>) {
    let path = &config.audit_log;
    let subject = path.display().to_string();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            if !meta.is_file() {
                out.push(
                    finding("audit", subject, Status::Fail, "exists but is not a regular file")
                        .fix("set audit_log to a file path"),
                );
                return;
            }
            if let Err(e) = std::fs::OpenOptions::new().append(true).open(path) {
                out.push(
                    finding("audit", subject, Status::Fail, format!("cannot be appended to: {e}"))
                        .fix(format!("chmod 600 {} (and own it: it must be yours)", path.display())),
                );
                return;
            }
            let mode = meta.mode() & 0o777;
            if mode & 0o022 != 0 {
                out.push(
                    finding(
                        "audit",
                        subject,
                        Status::Fail,
                        format!("mode {mode:o}: others can rewrite the audit log"),
                    )
                    .fix(format!("chmod 600 {}", path.display())),
                );
            } else if meta.uid() != nix::unistd::getuid().as_raw() {
                out.push(
                    finding("audit", subject, Status::Warn, format!("owned by uid {}, not you", meta.uid()))
                        .fix(format!("chown {} {}", whoami(), path.display())),
                );
            } else {
                out.push(finding("audit", subject, Status::Ok, format!("writable (mode {mode:o})")));
            }
        }
        Err(_) if !dir.is_dir() => out.push(
            finding("audit", subject, Status::Fail, format!("directory {} does not exist", dir.display()))
                .fix(format!("mkdir -p -m 700 {}", dir.display())),
        ),
        Err(_) => match nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK) {
            Ok(()) => out.push(finding(
                "audit",
                subject,
                Status::Ok,
                "will be created at start (its directory is writable)",
            )),
            Err(e) => out.push(
                finding("audit", subject, Status::Fail, format!("cannot create it in {}: {e}", dir.display()))
                    .fix("set audit_log to a path in a directory you own, e.g. ~/.local/state/keygate/audit.jsonl"),
            ),
        },
    }
}

// === state directory ===

fn check_state_dir(config: &Config, out: &mut Vec<Finding>) {
    if let StateBackend::Redis(r) = &config.state {
        out.push(finding(
            "state",
            "shared store",
            Status::Skip,
            format!(
                "state lives in {} (not checked here); state_dir still holds the audit key",
                redact_url(&r.url)
            ),
        ));
    }
    let Some(dir) = crate::state::dir(config) else {
        out.push(
            finding("state", "state_dir", Status::Warn, "no state_dir and no HOME: tokens, freezes and budgets last only while keygate runs")
                .fix("set state_dir = \"~/.local/state/keygate\""),
        );
        return;
    };
    let subject = dir.display().to_string();
    let meta = match std::fs::symlink_metadata(&dir) {
        Ok(m) => m,
        Err(_) => {
            let parent = nearest_existing(&dir);
            let status = match nix::unistd::access(&parent, nix::unistd::AccessFlags::W_OK) {
                Ok(()) => finding(
                    "state",
                    subject,
                    Status::Ok,
                    "will be created (mode 0700) at start",
                ),
                Err(e) => finding(
                    "state",
                    subject,
                    Status::Fail,
                    format!("cannot be created in {}: {e}", parent.display()),
                )
                .fix(format!("mkdir -p -m 700 {}", dir.display())),
            };
            out.push(status);
            return;
        }
    };
    if !meta.is_dir() {
        out.push(
            finding(
                "state",
                subject,
                Status::Fail,
                "is not a directory (a symlink or file is there)",
            )
            .fix("point state_dir at a directory of your own (mode 0700)"),
        );
        return;
    }
    let me = nix::unistd::getuid().as_raw();
    let mode = meta.mode() & 0o7777;
    let mut bad = false;
    if meta.uid() != me {
        bad = true;
        out.push(
            finding(
                "state",
                subject.clone(),
                Status::Fail,
                format!("owned by uid {}, not you (uid {me})", meta.uid()),
            )
            .fix(format!("chown -R {} {}", whoami(), dir.display())),
        );
    }
    if mode & 0o077 != 0 {
        bad = true;
        out.push(
            finding(
                "state",
                subject.clone(),
                Status::Fail,
                format!("mode {mode:o}: other users can read or change tokens, budgets and the audit signing key"),
            )
            .fix(format!("chmod 700 {}", dir.display())),
        );
    }
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) => {
            out.push(
                finding(
                    "state",
                    subject,
                    Status::Fail,
                    format!("cannot be read: {e}"),
                )
                .fix(format!("chmod 700 {}", dir.display())),
            );
            return;
        }
    };
    for entry in entries.flatten().take(MAX_STATE_ENTRIES) {
        let Ok(m) = entry.path().symlink_metadata() else {
            continue;
        };
        if !(m.is_file() || m.file_type().is_socket()) {
            continue;
        }
        let p = entry.path();
        let file_mode = m.mode() & 0o777;
        if m.uid() != me {
            bad = true;
            out.push(
                finding(
                    "state",
                    p.display().to_string(),
                    Status::Fail,
                    format!("owned by uid {}, not you", m.uid()),
                )
                .fix(format!("chown {} {}", whoami(), p.display())),
            );
        } else if file_mode & 0o077 != 0 {
            bad = true;
            out.push(
                finding(
                    "state",
                    p.display().to_string(),
                    Status::Fail,
                    format!("mode {file_mode:o}: readable or writable by others"),
                )
                .fix(format!("chmod 600 {}", p.display())),
            );
        }
    }
    if !bad {
        out.push(finding(
            "state",
            subject,
            Status::Ok,
            format!("yours, mode {mode:o}, its files 0600"),
        ));
    }
}

// === admin socket ===

/// Returns whether a keygate answers on this config's admin socket (it is running).
fn check_admin_socket(config: &Config, out: &mut Vec<Finding>) -> bool {
    let Some(path) = crate::admin::socket_path(config) else {
        return false;
    };
    let subject = path.display().to_string();
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        out.push(
            finding(
                "admin",
                subject,
                Status::Fail,
                format!(
                    "{} bytes long: a Unix socket path holds at most {MAX_SOCKET_PATH}",
                    path.as_os_str().len()
                ),
            )
            .fix("set admin_socket to a shorter path, e.g. \"/run/user/UID/keygate-admin.sock\""),
        );
        return false;
    }
    match std::fs::symlink_metadata(&path) {
        Err(_) => {
            out.push(finding(
                "admin",
                subject,
                Status::Ok,
                "free: keygate will listen here (mode 0600)",
            ));
            false
        }
        Ok(m) if !m.file_type().is_socket() => {
            out.push(
                finding(
                    "admin",
                    subject,
                    Status::Fail,
                    "a file that is not a socket is there",
                )
                .fix(format!(
                    "remove {} or set admin_socket elsewhere",
                    path.display()
                )),
            );
            false
        }
        Ok(m) => match unix_answers(&path) {
            Ok(_) => {
                let mode = m.mode() & 0o777;
                if mode & 0o077 != 0 {
                    out.push(
                        finding(
                            "admin",
                            subject,
                            Status::Fail,
                            format!("a keygate answers here, but the socket's mode is {mode:o}"),
                        )
                        .fix(format!("chmod 600 {}", path.display())),
                    );
                } else {
                    out.push(finding(
                        "admin",
                        subject,
                        Status::Ok,
                        "a keygate is running with this config (its admin socket answers)",
                    ));
                }
                true
            }
            Err(_) => {
                out.push(finding(
                    "admin",
                    subject,
                    Status::Ok,
                    "a socket left by a stopped keygate; serve replaces it",
                ));
                false
            }
        },
    }
}

// === listen addresses ===

fn check_listeners(config: &Config, running: bool, out: &mut Vec<Finding>) {
    for l in &config.listen {
        match l {
            Listen::Tcp(addr) => out.push(check_port(*addr, false, running)),
            Listen::Tls(addr) => out.push(check_port(*addr, true, running)),
            Listen::Unix(path) => out.push(check_unix_listener(path, running)),
        }
    }
}

fn check_port(addr: SocketAddr, tls: bool, running: bool) -> Finding {
    let subject = if tls {
        format!("https://{addr}")
    } else {
        addr.to_string()
    };
    if addr.port() == 0 {
        return finding(
            "listen",
            subject,
            Status::Ok,
            "port 0: the system picks a free port at start",
        );
    }
    let e = match std::net::TcpListener::bind(addr) {
        Ok(_) => return finding("listen", subject, Status::Ok, "free"),
        Err(e) => e,
    };
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {}
        std::io::ErrorKind::AddrNotAvailable => {
            return finding(
                "listen",
                subject,
                Status::Fail,
                format!("not an address of this machine: {e}"),
            )
            .fix("listen on 127.0.0.1:PORT (or an address this machine has)");
        }
        std::io::ErrorKind::PermissionDenied => {
            return finding(
                "listen",
                subject,
                Status::Fail,
                format!("not permitted: {e}"),
            )
            .fix("choose a port above 1023, e.g. 127.0.0.1:8791");
        }
        _ => {
            return finding("listen", subject, Status::Fail, format!("cannot bind: {e}"))
                .fix("choose another listen address");
        }
    }
    let port = addr.port();
    let keygate = !tls && answers_as_keygate(addr);
    match (keygate, running) {
        (true, true) => finding(
            "listen",
            subject,
            Status::Ok,
            "in use by this config's running keygate (its /healthz and admin socket answer)",
        ),
        (true, false) => finding("listen", subject, Status::Fail, "a keygate already listens there (its /healthz answers), but not this config's")
            .fix(format!("stop that keygate, or change listen to a free port such as 127.0.0.1:{}", port.saturating_add(1))),
        (false, true) if tls => finding("listen", subject, Status::Ok, "in use, probably by this config's running keygate (its admin socket answers)"),
        (false, _) => finding("listen", subject, Status::Fail, "in use by another program (it is not a keygate)")
            .fix(format!("find it with `ss -ltnp 'sport = :{port}'` and stop it, or change listen to a free port")),
    }
}

/// Whether a `GET /healthz` at `addr` is answered the way keygate answers it (JSON with `ok` and
/// `mode`); bounded by [`PROBE_DEADLINE`] in all.
fn answers_as_keygate(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + PROBE_DEADLINE;
    let Ok(mut s) = TcpStream::connect_timeout(&addr, PROBE_DEADLINE) else {
        return false;
    };
    let _ = s.set_write_timeout(Some(PROBE_DEADLINE));
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || buf.len() > 64 * 1024 {
            break;
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return false;
    }
    serde_json::from_str::<serde_json::Value>(body.trim())
        .map(|v| v["ok"].is_boolean() && v["mode"].is_string())
        .unwrap_or(false)
}

fn check_unix_listener(path: &Path, running: bool) -> Finding {
    let subject = format!("unix:{}", path.display());
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return finding(
            "listen",
            subject,
            Status::Fail,
            format!(
                "{} bytes long: a Unix socket path holds at most {MAX_SOCKET_PATH}",
                path.as_os_str().len()
            ),
        )
        .fix("use a shorter path, e.g. unix:/run/user/UID/keygate.sock");
    }
    match std::fs::symlink_metadata(path) {
        Err(_) => finding("listen", subject, Status::Ok, "free"),
        Ok(m) if !m.file_type().is_socket() => finding(
            "listen",
            subject,
            Status::Fail,
            "a file that is not a socket is there",
        )
        .fix(format!("remove {} or listen elsewhere", path.display())),
        Ok(_) => match unix_answers(path) {
            Ok(_) if running => finding(
                "listen",
                subject,
                Status::Ok,
                "in use by this config's running keygate",
            ),
            Ok(_) => finding(
                "listen",
                subject,
                Status::Fail,
                "something is listening there; serve would take the path over from it",
            )
            .fix(format!(
                "stop what listens on {} or listen elsewhere",
                path.display()
            )),
            Err(_) => finding(
                "listen",
                subject,
                Status::Ok,
                "a socket left by a stopped keygate; serve replaces it",
            ),
        },
    }
}

// === Landlock ===

/// The Landlock ABI this kernel enforces, probed feature by feature (creating a ruleset restricts
/// nothing); 6 means "6 or later", the last level `keygate run` tells apart.
fn landlock_abi() -> u8 {
    use landlock::{
        Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, Scope, ABI,
    };
    let hard = || Ruleset::default().set_compatibility(CompatLevel::HardRequirement);
    let probes: [(u8, bool); 6] = [
        (
            6,
            hard().scope(Scope::Signal).and_then(|r| r.create()).is_ok(),
        ),
        (
            5,
            hard()
                .handle_access(AccessFs::IoctlDev)
                .and_then(|r| r.create())
                .is_ok(),
        ),
        (
            4,
            hard()
                .handle_access(AccessNet::ConnectTcp)
                .and_then(|r| r.create())
                .is_ok(),
        ),
        (
            3,
            hard()
                .handle_access(AccessFs::Truncate)
                .and_then(|r| r.create())
                .is_ok(),
        ),
        (
            2,
            hard()
                .handle_access(AccessFs::Refer)
                .and_then(|r| r.create())
                .is_ok(),
        ),
        (
            1,
            hard()
                .handle_access(AccessFs::from_all(ABI::V1))
                .and_then(|r| r.create())
                .is_ok(),
        ),
    ];
    probes.iter().find(|(_, ok)| *ok).map_or(0, |(v, _)| *v)
}

fn landlock() -> Finding {
    let subject = "keygate run";
    match landlock_abi() {
        0 => finding("landlock", subject, Status::Warn, "this kernel has no Landlock: `keygate run` starts agents without a sandbox (no_new_privs only) and --sandbox refuses")
            .fix("for the sandbox, use a kernel of 6.7 or later with Landlock enabled (lsm=…,landlock on its command line)"),
        v @ 1..=3 => finding("landlock", subject, Status::Warn, format!("Landlock ABI {v}: `keygate run` hides keygate's files from the agent, but cannot limit its TCP connections; --sandbox refuses (it needs ABI 4)"))
            .fix("for the full sandbox, use a kernel of 6.7 or later"),
        v @ 4..=5 => finding("landlock", subject, Status::Ok, format!("Landlock ABI {v}: `keygate run` sandboxes agents (files and TCP connect); without signal scoping (ABI 6) a run's token is watched by heartbeat")),
        _ => finding("landlock", subject, Status::Ok, "Landlock ABI 6 or later: `keygate run` sandboxes agents (files, TCP connect, signals)"),
    }
}

// === helpers ===

/// Whether something accepts connections on the Unix socket at `path`. Non-blocking: a blocking
/// connect waits while the listener's backlog is full, and doctor never waits on a stalled peer.
fn unix_answers(path: &Path) -> Result<(), ()> {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(drop)?;
    let addr = UnixAddr::new(path).map_err(drop)?;
    match connect(fd.as_raw_fd(), &addr) {
        // A full backlog still means a listener is there.
        Ok(()) | Err(Errno::EAGAIN) | Err(Errno::EINPROGRESS) => Ok(()),
        Err(_) => Err(()),
    }
}

fn nearest_existing(p: &Path) -> PathBuf {
    let mut cur = p.to_path_buf();
    while !cur.exists() {
        match cur.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => cur = parent.to_path_buf(),
            _ => return PathBuf::from("."),
        }
    }
    cur
}

fn whoami() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map_or_else(|| "$USER".into(), |u| u.name)
}

/// A store URL without its user info (which may hold a password).
fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => {
            format!("{scheme}://…@{}", url.get(at + 1..).unwrap_or_default())
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_url_loses_its_password() {
        assert_eq!(
            redact_url("redis://u:pw@host:6379/0"),
            "redis://…@host:6379/0"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn a_too_open_secret_file_is_fixed_with_chmod() {
        let src = SecretSource::File {
            path: PathBuf::from("/tmp/k"),
        };
        let fix = secret_fix(
            "openai",
            &src,
            "secret openai: /tmp/k is readable by group or others (mode 644); run chmod 600 on it",
        );
        assert_eq!(fix, "chmod 600 /tmp/k");
    }
}
