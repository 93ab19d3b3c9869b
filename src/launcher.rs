//! `keygate run -- CMD`: the trusted launcher.
//!
//! The launcher asks the running keygate for a lease over the admin socket ([`lease`]): a token
//! minted for this run only, revoked when the lease connection drops. It then starts CMD with
//! provider keys removed from its environment and the SDK variables (`OPENAI_BASE_URL`,
//! `ANTHROPIC_API_KEY`, `[routes.R.env]`, …) pointing at keygate with that token, inside the
//! Landlock sandbox ([`sandbox`]) unless `--no-sandbox`. CMD stays in the launcher's process
//! group, so it keeps the terminal (job control, SIGINT, SIGWINCH come from the terminal as
//! without keygate); signals sent to the launcher itself are passed on; CMD's exit status is the
//! launcher's (death by signal N is 128+N).
//!
//! The launcher holds no secret: keygate tells it which variable names to drop (names holding a
//! held value are matched by SHA-256) and never sends it a value.

pub mod files;
pub mod lease;
pub mod sandbox;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::Route;

/// Provider keys removed from every agent's environment, besides those keygate names.
pub const DROPPED: &[&str] = &[
    "OPENAI_API_KEY",
    "OPENAI_ADMIN_KEY",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "AZURE_OPENAI_API_KEY",
    "AZURE_API_KEY",
    "GOOGLE_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "GH_ENTERPRISE_TOKEN",
    "GITLAB_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MISTRAL_API_KEY",
    "GROQ_API_KEY",
    "COHERE_API_KEY",
    "DEEPSEEK_API_KEY",
    "OPENROUTER_API_KEY",
    "XAI_API_KEY",
    "TOGETHER_API_KEY",
    "FIREWORKS_API_KEY",
    "PERPLEXITY_API_KEY",
    "REPLICATE_API_TOKEN",
    "VOYAGE_API_KEY",
    "VAULT_TOKEN",
    "BAO_TOKEN",
    "OP_SERVICE_ACCOUNT_TOKEN",
    "NPM_TOKEN",
    "KEYGATE_TOKEN",
];

/// Prefixes of variable families removed whole (`AWS_SECRET_ACCESS_KEY`, `OP_SESSION_…`).
pub const DROPPED_PREFIXES: &[&str] = &["AWS_", "OP_SESSION_"];

/// `keygate run` as the command line gives it.
#[derive(Debug)]
pub struct RunArgs {
    /// The config of the running keygate (for its admin socket).
    pub config: PathBuf,
    /// The agent the run's token is for; the config's only agent when `None`.
    pub agent: Option<String>,
    /// The token's lifetime as a backstop (`12h` by default); the lease ends it sooner.
    pub ttl: Option<String>,
    /// `Some(true)`: `--sandbox` (fail if it cannot be applied); `Some(false)`: `--no-sandbox`;
    /// `None`: on where the kernel supports it.
    pub sandbox: Option<bool>,
    /// CMD and its arguments.
    pub command: Vec<String>,
}

/// Variables an SDK reads for this route: OpenAI- and Anthropic-shaped routes by name or
/// upstream host.
pub(crate) fn sdk_env(route: &Route, base: &str, token: &str) -> Vec<(String, String)> {
    let host = route.upstream.host.as_str();
    let is = |word: &str| route.name.contains(word) || host.contains(word);
    let mut v = Vec::new();
    if is("anthropic") {
        v.push(("ANTHROPIC_BASE_URL".into(), base.to_string()));
        v.push(("ANTHROPIC_API_KEY".into(), token.to_string()));
    } else if is("openai") {
        // The OpenAI SDKs' base URL ends in /v1; an upstream that already names it keeps it.
        let v1 = if route.upstream.base_path.ends_with("/v1") {
            base.to_string()
        } else {
            format!("{base}/v1")
        };
        v.push(("OPENAI_BASE_URL".into(), v1));
        v.push(("OPENAI_API_KEY".into(), token.to_string()));
    }
    v
}

/// Checks one `[routes.R.env]` entry: a variable name, and a template using only `{token}` and
/// `{base_url}`.
pub(crate) fn check_env_entry(name: &str, template: &str) -> Result<(), String> {
    let ok_name = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok_name {
        return Err(format!("{name:?} is not an environment variable name"));
    }
    let rest = template.replace("{token}", "").replace("{base_url}", "");
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "{name}: only {{token}} and {{base_url}} may be filled in (got {template:?})"
        ));
    }
    Ok(())
}

/// Whether the launcher removes this variable whatever keygate says.
pub fn always_dropped(name: &str) -> bool {
    DROPPED.contains(&name) || DROPPED_PREFIXES.iter().any(|p| name.starts_with(p))
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("keygate run: {msg}");
    ExitCode::from(2)
}

/// Runs `keygate run`; the exit code is CMD's (2 when the run could not start).
pub fn main(args: RunArgs) -> ExitCode {
    if args.command.is_empty() {
        return fail("say what to run: keygate run -- CMD [ARGS…]");
    }
    let ttl = match args
        .ttl
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
    {
        Ok(t) => t.unwrap_or(lease::DEFAULT_TTL),
        Err(e) => return fail(&format!("--ttl: {e}")),
    };
    let Some(sock) = crate::admin::socket_path_lenient(&args.config) else {
        return fail(&format!(
            "{}: cannot tell where keygate's admin socket is (no admin_socket or state_dir)",
            args.config.display()
        ));
    };
    let (mut lease, mut grant) = match open_lease(&sock, &args, ttl) {
        Ok(x) => x,
        Err(e) => return fail(&e),
    };
    // The forward proxy's CA bundle, AWS and git files, in a private directory for this run.
    let files = grant["files"].take();
    let mut set = grant["set"].take();
    let run_files = match set.as_object_mut().map(|s| files::prepare(&files, s)) {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            close_lease(&mut lease);
            return fail(&format!("cannot write the run's proxy files: {e}"));
        }
        None => None,
    };
    grant["set"] = set;
    let beat = match Heartbeat::start(lease.get_ref(), &grant) {
        Ok(b) => b,
        Err(e) => return fail(&format!("cannot keep the lease alive: {e}")),
    };
    let code = run_child(&args, &grant);
    beat.stop();
    close_lease(&mut lease);
    if let Some(f) = run_files {
        f.remove();
    }
    code
}

/// The launcher's heartbeat on the lease: a byte every interval keygate named, from a thread,
/// so keygate ends the lease when the launcher is stopped (SIGSTOP) or hangs.
struct Heartbeat {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Heartbeat {
    fn start(lease: &UnixStream, grant: &Value) -> std::io::Result<Heartbeat> {
        let every = Duration::from_secs(
            grant["heartbeat_secs"]
                .as_u64()
                .unwrap_or(lease::DEFAULT_HEARTBEAT.as_secs())
                .max(1),
        );
        let mut stream = lease.try_clone()?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every)
            {
                if stream.write_all(b"\n").is_err() {
                    break;
                }
            }
        });
        Ok(Heartbeat { stop, thread })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// The interval the launcher asks for: `KEYGATE_RUN_HEARTBEAT_SECS` (hidden, for tests), else
/// keygate's default.
fn heartbeat_wish() -> u64 {
    std::env::var("KEYGATE_RUN_HEARTBEAT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(lease::DEFAULT_HEARTBEAT.as_secs())
}

/// Connects, asks for a lease, and reads the grant line.
fn open_lease(
    sock: &std::path::Path,
    args: &RunArgs,
    ttl: Duration,
) -> Result<(BufReader<UnixStream>, Value), String> {
    let stream = UnixStream::connect(sock).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
            "no keygate is running for {} (no admin socket at {}); start one with `keygate serve --config {}`",
            args.config.display(),
            sock.display(),
            args.config.display()
        ),
        _ => format!("admin socket {}: {e}", sock.display()),
    })?;
    let io = |e: std::io::Error| format!("admin socket {}: {e}", sock.display());
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let env_sha256: serde_json::Map<String, Value> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            let v = v.as_encoded_bytes().trim_ascii();
            // Short values ("1", "true") are settings, never keys.
            (v.len() >= 8).then(|| (k, hex::encode(Sha256::digest(v)).into()))
        })
        .collect();
    let body = json!({
        "agent": args.agent,
        "ttl_secs": ttl.as_secs(),
        "command": args.command.first(),
        "env_sha256": env_sha256,
        "heartbeat_secs": heartbeat_wish(),
        // Only an agent that can signal the launcher can SIGSTOP it to keep its token: without
        // the sandbox, or on a kernel without Landlock signal scoping (ABI < 6).
        "heartbeat_watch": args.sandbox == Some(false) || !sandbox::scopes_signals(),
    })
    .to_string();
    let head = format!(
        "POST /lease HTTP/1.1\r\nHost: keygate-admin\r\nConnection: upgrade\r\nUpgrade: keygate-lease\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    (&stream)
        .write_all(format!("{head}{body}").as_bytes())
        .map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).map_err(io)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("keygate answered {status_line:?} on {}", sock.display()))?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(io)? == 0 {
            return Err("keygate closed the admin connection".into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    if status != 101 {
        let mut body = vec![0u8; length.min(64 * 1024)];
        reader.read_exact(&mut body).map_err(io)?;
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        return Err(v["error"].as_str().map_or_else(
            || format!("keygate refused the run ({status})"),
            str::to_string,
        ));
    }
    let mut line = zeroize::Zeroizing::new(String::new());
    reader.read_line(&mut line).map_err(io)?;
    let grant: Value = serde_json::from_str(&line)
        .map_err(|e| format!("keygate's lease answer is not JSON: {e}"))?;
    // Held open for the run: no read timeout while CMD runs.
    reader.get_ref().set_read_timeout(None).map_err(io)?;
    Ok((reader, grant))
}

/// Ends the lease and waits (briefly) for keygate to say the token is revoked, so the run's
/// token is dead by the time the launcher exits.
fn close_lease(lease: &mut BufReader<UnixStream>) {
    let s = lease.get_ref();
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut line = String::new();
    let _ = lease.read_line(&mut line);
}

/// The environment CMD starts with: ours, minus provider keys, plus what keygate sets.
fn child_env(grant: &Value) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let drop: Vec<&str> = grant["drop"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let set = grant["set"].as_object();
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !always_dropped(&k)
                && !drop.contains(&k.as_ref())
                && !set.is_some_and(|s| s.contains_key(k.as_ref()))
        })
        .collect();
    if let Some(set) = set {
        for (k, v) in set {
            if let Some(v) = v.as_str() {
                env.push((k.into(), v.into()));
            }
        }
    }
    if let Some(id) = grant["run_id"].as_str() {
        env.push(("KEYGATE_RUN_ID".into(), id.into()));
    }
    env
}

fn run_child(args: &RunArgs, grant: &Value) -> ExitCode {
    let env = child_env(grant);
    let mut cmd = if args.sandbox == Some(false) {
        let mut c = std::process::Command::new(&args.command[0]);
        c.args(&args.command[1..]);
        c
    } else {
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => return fail(&format!("cannot find keygate's own binary: {e}")),
        };
        let mut c = std::process::Command::new(&exe);
        c.arg(sandbox::SUBCOMMAND);
        // The binary the launcher runs (and keygate may run next) stays unchangeable too.
        c.arg("--read-only").arg(&exe);
        for p in grant["read_only"].as_array().into_iter().flatten() {
            if let Some(p) = p.as_str() {
                c.arg("--read-only").arg(p);
            }
        }
        if args.sandbox == Some(true) {
            c.arg("--require");
        }
        for p in grant["deny"].as_array().into_iter().flatten() {
            if let Some(p) = p.as_str() {
                c.arg("--deny").arg(p);
            }
        }
        for p in grant["ports"].as_array().into_iter().flatten() {
            if let Some(p) = p.as_u64() {
                c.arg("--port").arg(p.to_string());
            }
        }
        c.arg("--").args(&args.command);
        c
    };
    cmd.env_clear().envs(env);
    // Signals the launcher itself is sent are passed on; those the terminal sends reach CMD
    // directly (same process group), so they are not sent twice.
    let signals = match signal_hook::iterator::SignalsInfo::<
        signal_hook::iterator::exfiltrator::WithOrigin,
    >::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGQUIT,
        signal_hook::consts::SIGWINCH,
    ]) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot handle signals: {e}")),
    };
    let handle = signals.handle();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            handle.close();
            return fail(&format!("cannot run {}: {e}", args.command[0]));
        }
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let forwarder = std::thread::spawn(move || {
        let mut signals = signals;
        for info in signals.forever() {
            use signal_hook::low_level::siginfo::Cause;
            if matches!(info.cause, Cause::Kernel) {
                continue;
            }
            if let Ok(sig) = nix::sys::signal::Signal::try_from(info.signal) {
                let _ = nix::sys::signal::kill(pid, sig);
            }
        }
    });
    let status = child.wait();
    handle.close();
    let _ = forwarder.join();
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => ExitCode::from(u8::try_from(c & 0xff).unwrap_or(1)),
            (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(255)),
            (None, None) => ExitCode::from(1),
        },
        Err(e) => fail(&format!("waiting for {}: {e}", args.command[0])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_env_templates_fill_in_only_token_and_base_url() {
        assert!(check_env_entry("CODEX_TOKEN", "{token}").is_ok());
        assert!(check_env_entry("X_URL", "{base_url}/v1").is_ok());
        assert!(check_env_entry("PLAIN", "a value").is_ok());
        assert!(check_env_entry("X", "{secret}").is_err());
        assert!(check_env_entry("1BAD", "{token}").is_err());
        assert!(check_env_entry("BAD-NAME", "{token}").is_err());
    }

    #[test]
    fn provider_key_families_are_always_dropped_and_ordinary_settings_kept() {
        for k in [
            "OPENAI_API_KEY",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_PROFILE",
            "GH_TOKEN",
        ] {
            assert!(always_dropped(k), "{k}");
        }
        for k in ["PATH", "HOME", "OPENAI_LOG", "TERM"] {
            assert!(!always_dropped(k), "{k}");
        }
    }
}
