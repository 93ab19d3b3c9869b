//! `keygate serve` and `keygate check`: load the config, build the pipeline's state, start the
//! listeners, and run until a terminating signal (TERM, INT, QUIT, USR1, USR2, ALRM, VTALRM,
//! PROF, XCPU, IO, PWR), then drain and
//! write the `stop` record. SIGHUP reloads the config (`reload.rs`); SIGPIPE is ignored
//! (Rust's runtime already does so).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::Control;
use crate::audit::AuditLog;
use crate::config::{Config, Listen};
use crate::listen;
use crate::reload::{Fixed, Live};

/// `keygate serve`: loads the config, binds the listeners and serves until SIGTERM or SIGINT;
/// exits non-zero, with the reason on stderr, when it cannot start.
pub fn serve_main(config_path: &Path, audit_log: Option<&Path>) -> ExitCode {
    init_tracing();
    harden_process();
    let config = match Config::load(config_path).and_then(|c| c.require_routes().map(|()| c)) {
        Ok(c) => c,
        Err(e) => return config_fail(&e),
    };
    // With one CPU (pinned, a container quota of 1, a small VM) a work-stealing runtime only adds
    // cross-thread wake-ups; the current-thread runtime served ~45 % more in bench/ab-floor.
    // `per-core` keeps that on every CPU: connections go to one current-thread runtime per CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_core = cpus > 1 && config.connections.runtime == crate::config::Runtime::PerCore;
    if per_core {
        if let Err(e) = crate::runtime::start(cpus) {
            return fail(1, &e);
        }
    }
    let mut builder = if cpus == 1 || per_core {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    // A record's writer wake-up waits until the thread has answered and goes idle (`audit::wake`).
    builder.on_thread_park(crate::audit::on_park);
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(1, &format!("cannot start the runtime: {e}")),
    };
    // Registered before anything is served, so no terminating signal can kill keygate between
    // the first request and the drain that writes its record.
    let signals = match rt.block_on(async { Signals::new() }) {
        Ok(s) => s,
        Err(e) => return fail(1, &format!("cannot handle signals: {e}")),
    };
    let (code, audit) = rt.block_on(serve(config, audit_log, signals));
    // Dropping the runtime drops every connection still open after the grace period; each
    // request's `audit::Pending` then writes its record (`aborted`) into the still-open log.
    crate::runtime::stop();
    rt.shutdown_timeout(Duration::from_secs(2));
    if let Some((audit, mut stop)) = audit {
        stop.time = crate::audit::now_rfc3339();
        let _ = audit.lifecycle(stop);
        audit.close();
    }
    code
}

/// Runs until a signal; returns the exit code and, once the audit log is open, the log with the
/// `stop` record to write after every connection is gone.
async fn serve(
    mut config: Config,
    audit_override: Option<&Path>,
    mut signals: Signals,
) -> (ExitCode, Option<(Arc<AuditLog>, crate::audit::Lifecycle)>) {
    if let Some(p) = audit_override {
        config.audit_log = p.to_path_buf();
    }
    let store = match open_store(&config) {
        Ok(s) => s,
        Err(e) => return (fail(2, &e), None),
    };
    let audit = match open_audit(&config) {
        Ok(a) => a,
        Err(e) => return (fail(2, &e), None),
    };
    let instance = match (&config.instance, &store) {
        (Some(i), _) => Some(i.clone()),
        (None, Some(s)) => s.instance().map(str::to_string),
        (None, None) => None,
    };
    let control = Arc::new(Control::new(store.clone()).with_instance(instance.clone()));
    {
        let c = control.clone();
        audit.observe(Box::new(move |r| c.metrics.observe(r)));
    }
    let bound = match listen::bind(&config.listen).await {
        Ok(b) => b,
        Err(e) => return (fail(2, &e), None),
    };
    let urls: Vec<String> = bound.iter().map(|b| b.url()).collect();
    // The forward proxy: its listeners and its CA, both before the ready line.
    let proxy = match start_proxy(&config, &bound).await {
        Ok(p) => p,
        Err(e) => return (fail(2, &e), None),
    };
    let proxy_urls: Vec<String> = proxy
        .as_ref()
        .map(|(l, ..)| {
            l.iter()
                .filter_map(|l| l.local_addr().ok())
                .map(|a| format!("http://{a}"))
                .collect()
        })
        .unwrap_or_default();
    let port = bound
        .iter()
        .find_map(|b| match b {
            listen::Bound::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            _ => None,
        })
        .unwrap_or(0);
    let config_path = config.file.clone();
    let fixed = Fixed {
        audit: audit.clone(),
        control: control.clone(),
        default_person: current_user().map(Into::into),
        listen_urls: urls.clone(),
        listen_port: port,
    };
    let admin_path = crate::admin::socket_path(&config);
    let audit_log_path = config.audit_log.clone();
    let mut state = match crate::reload::build(config, &fixed) {
        Ok(s) => s,
        Err(e) => return (fail(2, &e), None),
    };
    if let Err(e) = crate::reload::prefetch(&state).await {
        return (fail(2, &e), None);
    }
    if let Some(s) = &store {
        // Before the listener opens, so no request can use a lease a crashed keygate left.
        match crate::launcher::lease::revoke_orphans(&**s) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                tokens = n,
                "revoked run tokens left by a keygate that stopped without ending its leases"
            ),
            Err(e) => {
                return (
                    fail(2, &format!("cannot revoke leftover run tokens: {e}")),
                    None,
                )
            }
        }
        match s.spent() {
            Ok(spent) => {
                let config = state.config.clone();
                state.policy.restore_budgets(&config, &spent)
            }
            Err(e) => tracing::error!(error = %e, "cannot read saved budgets"),
        }
    }
    let policy_version = state.policy_version.clone();
    let lifecycle = |event| crate::audit::Lifecycle {
        time: crate::audit::now_rfc3339(),
        event,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION"),
        config: config_path.display().to_string(),
        policy_version: policy_version.to_string(),
        instance: instance.clone(),
    };
    // Written and confirmed before the first request, so a log that cannot be written is known
    // (and every request refused with 503) before anything could be forwarded unaudited.
    if let Err(e) = audit.lifecycle(lifecycle("start")) {
        tracing::error!(audit_log = %audit_log_path.display(), error = %e, "audit log cannot be written; refusing requests until it can");
    }
    let stop_record = lifecycle("stop");
    let live = Arc::new(Live::new(state, &config_path, audit_override));
    let config = live.state.load().config.clone();

    let (tx, rx) = tokio::sync::watch::channel(false);
    let admin = match &admin_path {
        Some(path) => match crate::admin::server::bind(path) {
            Ok(l) => {
                let _ = control.admin_socket.set(path.clone());
                control.approvals.set_channel(true);
                Some(tokio::spawn(crate::admin::server::run(
                    l,
                    path.clone(),
                    live.clone(),
                    rx.clone(),
                )))
            }
            Err(e) => {
                tracing::warn!(error = %e, "no admin socket: admin commands cannot reach this keygate, and routes that need approval refuse");
                None
            }
        },
        None => None,
    };

    ready_line(
        &urls,
        &proxy_urls,
        &config,
        &policy_version,
        control.admin_socket.get(),
    );
    // Not kept for the whole run: a reload must be able to drop the first config, whose
    // OpenBao sources then revoke what they hold.
    drop(config);
    tracing::info!(listeners = ?urls, "keygate serving");

    spawn_token_refresh(live.clone());
    if let Some(s) = store.as_ref().filter(|s| s.shared()) {
        crate::state::sync::spawn(live.clone(), s.clone());
    } else if let Some(s) = &store {
        spawn_budget_saver(live.clone(), s.clone());
    }
    if let Some((listeners, ca, _)) = &proxy {
        let _ = control.proxy.set(crate::launcher::files::ProxyInfo {
            addrs: listeners
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .collect(),
            ca_pem: ca.pem().to_string(),
        });
    }
    let proxy_server = proxy.map(|(listeners, ca, own)| {
        tokio::spawn(crate::proxy::run(
            listeners,
            live.clone(),
            ca,
            own,
            rx.clone(),
            Duration::from_secs(10),
        ))
    });
    let server = tokio::spawn(listen::run(
        bound,
        live.clone(),
        rx,
        Duration::from_secs(10),
    ));
    // SIGHUP reloads (a failed reload is logged and audited; keygate keeps serving); the other
    // signals stop it.
    let name = loop {
        match signals.wait().await {
            Signal::Stop(name) => break name,
            Signal::Hangup => {
                let _ = live.reload("SIGHUP").await;
            }
        }
    };
    tracing::info!(signal = name, "shutting down");
    let _ = tx.send(true);
    let _ = server.await;
    if let Some(p) = proxy_server {
        let _ = p.await;
    }
    // Dynamic credentials end with keygate: revoked now, not left to their TTL.
    live.state
        .load_full()
        .credentials
        .shutdown(Duration::from_secs(5))
        .await;
    if let Some(a) = admin {
        let _ = a.await;
    }
    if let Some(s) = &store {
        let state = live.state.load_full();
        // A run's token lives no longer than its lease, and a stopped keygate holds none.
        crate::launcher::lease::revoke_all(&state.control, &**s);
        if let Err(e) = s.save_spent(&state.policy.budget_spent(&state.config)) {
            tracing::error!(error = %e, "cannot save budgets at exit");
        }
    }
    // Every record queued by a finished request is on disk before exit.
    (ExitCode::SUCCESS, Some((audit, stop_record)))
}

/// The state store in `state_dir` (or the default location). A configured state_dir that
/// cannot be used (or trusted: someone else could have written tokens or lifted a freeze there)
/// is an error; the default location failing leaves keygate running with state in memory only.
fn open_store(config: &Config) -> Result<Option<Arc<dyn crate::state::StateStore>>, String> {
    if let crate::config::StateBackend::Redis(_) = config.state {
        let store = crate::state::open_configured(config).map_err(|e| e.to_string())?;
        if let Some(s) = &store {
            // Bookings this keygate left in the store when it last stopped are gone with their
            // requests.
            let budgeted: Vec<String> = config
                .agents
                .iter()
                .filter(|a| a.budget.is_some())
                .map(|a| a.name.clone())
                .collect();
            s.forget_in_flight(&budgeted).map_err(|e| e.to_string())?;
        }
        return Ok(store);
    }
    let Some(dir) = crate::state::dir(config) else {
        return Ok(None);
    };
    match crate::state::open(&dir) {
        Ok(s) => Ok(Some(s)),
        Err(e) if config.state_dir.is_some() => Err(e.to_string()),
        Err(e) => {
            tracing::warn!(error = %e, "no durable state; freezes and budgets last until keygate stops");
            Ok(None)
        }
    }
}

/// The audit log, signing checkpoints with the key in `state_dir` when there is one.
fn open_audit(config: &Config) -> Result<Arc<AuditLog>, String> {
    let mut options = crate::audit::Options::new(config.audit_chain);
    if let Some(dir) = config.state_dir.as_deref().filter(|_| config.audit_chain) {
        let key = crate::audit::AuditKey::load_or_create(dir)
            .map_err(|e| format!("audit signing key: {e}"))?;
        options.key = Some(Arc::new(key));
        options.head = Some(dir.join(crate::audit::HEAD_FILE));
    }
    AuditLog::open_with(&config.audit_log, options).map_err(|e| e.to_string())
}

/// The one line scripts wait for: where keygate listens, in the lab broker's shape.
/// The forward proxy's listeners, its CA (created on first use) and keygate's own addresses,
/// when `proxy_listen` is set.
type ProxyParts = (
    Vec<tokio::net::TcpListener>,
    Arc<crate::proxy::ca::Ca>,
    Vec<std::net::SocketAddr>,
);

async fn start_proxy(
    config: &Config,
    bound: &[listen::Bound],
) -> Result<Option<ProxyParts>, String> {
    if config.proxy.listen.is_empty() {
        return Ok(None);
    }
    let dir = crate::state::dir(config)
        .ok_or("the forward proxy needs a state_dir for its CA (or HOME set)")?;
    let ca = crate::proxy::ca::Ca::load_or_create(&dir).map_err(|e| format!("proxy CA: {e}"))?;
    let listeners = crate::proxy::bind(&config.proxy.listen).await?;
    let mut own: Vec<std::net::SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    own.extend(bound.iter().filter_map(|b| match b {
        listen::Bound::Tcp(l) | listen::Bound::Tls(l) => l.local_addr().ok(),
        listen::Bound::Unix(..) => None,
    }));
    Ok(Some((listeners, Arc::new(ca), own)))
}

fn ready_line(
    urls: &[String],
    proxy_urls: &[String],
    config: &Config,
    policy_version: &str,
    admin_socket: Option<&std::path::PathBuf>,
) {
    let first = urls
        .iter()
        .find(|u| u.starts_with("http"))
        .or(urls.first())
        .cloned()
        .unwrap_or_default();
    let line = serde_json::json!({
        "ok": true,
        "listen": first,
        "listeners": urls,
        "proxy_listeners": proxy_urls,
        "mode": config.mode,
        "routes": config.routes.iter().map(|r| &r.name).collect::<Vec<_>>(),
        "allowed_paths": config.seed.as_ref().map(|s| &s.allowed_paths),
        "audit_log": config.audit_log,
        "policy_version": policy_version,
        "admin_socket": admin_socket,
    });
    println!("{line}");
}

/// Issued and revoked tokens take effect without a restart: the store is checked twice a
/// second (one cheap look when nothing changed).
fn spawn_token_refresh(live: Arc<Live>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let state = live.state.load_full();
            if state.tokens.has_store() {
                state.tokens.refresh();
            }
        }
    });
}

/// Budgets are counted in memory and written behind, once a second when they changed, so the
/// request path never waits on the disk.
fn spawn_budget_saver(live: Arc<Live>, store: Arc<dyn crate::state::StateStore>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last = Vec::new();
        loop {
            tick.tick().await;
            let state = live.state.load_full();
            let spent = state.policy.budget_spent(&state.config);
            if spent != last {
                let (s, save) = (store.clone(), spent.clone());
                match tokio::task::spawn_blocking(move || s.save_spent(&save)).await {
                    Ok(Ok(())) => last = spent,
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot save budgets"),
                    Err(_) => {}
                }
            }
        }
    });
}

/// Every catchable signal whose default action would end keygate without draining.
struct Signals {
    stop: Vec<(&'static str, tokio::signal::unix::Signal)>,
    hangup: tokio::signal::unix::Signal,
    _file_size: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut stop = Vec::new();
        for (name, kind) in [
            ("SIGTERM", SignalKind::terminate()),
            ("SIGINT", SignalKind::interrupt()),
            ("SIGQUIT", SignalKind::quit()),
            ("SIGUSR1", SignalKind::user_defined1()),
            ("SIGUSR2", SignalKind::user_defined2()),
            ("SIGALRM", SignalKind::alarm()),
            ("SIGVTALRM", SignalKind::from_raw(nix::libc::SIGVTALRM)),
            ("SIGPROF", SignalKind::from_raw(nix::libc::SIGPROF)),
            ("SIGXCPU", SignalKind::from_raw(nix::libc::SIGXCPU)),
            ("SIGIO", SignalKind::io()),
            ("SIGPWR", SignalKind::from_raw(nix::libc::SIGPWR)),
        ] {
            stop.push((name, signal(kind)?));
        }
        Ok(Signals {
            stop,
            hangup: signal(SignalKind::hangup())?,
            // Over the file-size limit a write fails (EFBIG, reported by the audit log) instead
            // of the process dying with records unwritten.
            _file_size: signal(SignalKind::from_raw(nix::libc::SIGXFSZ))?,
        })
    }

    /// Waits for the next signal: a terminating one (named), or SIGHUP.
    async fn wait(&mut self) -> Signal {
        let stop = first_of(&mut self.stop);
        tokio::select! {
            name = stop => Signal::Stop(name),
            _ = self.hangup.recv() => Signal::Hangup,
        }
    }
}

/// What a signal asks of keygate.
enum Signal {
    /// Drain and stop.
    Stop(&'static str),
    /// Re-read the config (reload).
    Hangup,
}

/// The first of several signal streams to fire.
async fn first_of(signals: &mut [(&'static str, tokio::signal::unix::Signal)]) -> &'static str {
    std::future::poll_fn(|cx| {
        for (name, s) in signals.iter_mut() {
            if s.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(*name);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("keygate: {msg}");
    ExitCode::from(code)
}

/// A config that does not load: the error, and where every key is described (unless the file
/// itself could not be read).
fn config_fail(e: &crate::config::ConfigError) -> ExitCode {
    if e.line == 0 && e.key == "(file)" {
        return fail(2, &e.to_string());
    }
    fail(
        2,
        &format!(
            "{e}\n  every config key, with its default and an example: {}",
            crate::config::schema::REFERENCE
        ),
    )
}

/// `keygate check`: validates the config and prints the effective policy (no secret values);
/// exits 2 when the config does not load.
pub fn check_main(config_path: &Path, json: bool, fetch: bool) -> ExitCode {
    let config = match Config::load(config_path).and_then(|c| c.require_routes().map(|()| c)) {
        Ok(c) => c,
        Err(e) => return config_fail(&e),
    };
    // The certificate files are read as serve reads them, so check finds a bad one first.
    if let Some(files) = &config.tls {
        if let Err(e) = crate::listen::tls::server_config(files) {
            let e = crate::config::ConfigError {
                file: config.file.clone(),
                line: 0,
                key: "tls".into(),
                message: e,
            };
            return fail(2, &e.to_string());
        }
    }
    let mut policy = config.effective_policy();
    policy["policy_version"] = config.policy_version().into();
    let mut fetch_failed = false;
    if fetch {
        let report = match crate::credential::fetch_report(&config) {
            Ok(r) => r,
            Err(e) => return fail(1, &e),
        };
        fetch_failed = report.iter().any(|s| !s["error"].is_null());
        policy["fetch"] = report.into();
    }
    if json {
        println!("{policy}");
    } else {
        println!(
            "{}: ok (policy {})",
            config.file.display(),
            config.policy_version()
        );
        println!(
            "{}",
            serde_json::to_string_pretty(&policy).unwrap_or_default()
        );
    }
    for l in &config.listen {
        if let Listen::Tcp(a) = l {
            if !a.ip().is_loopback() {
                eprintln!("keygate: warning: {a} is reachable from other machines in plaintext (allow_plaintext_non_loopback): tokens and answers cross the network unencrypted; prefer https:// with tls");
            }
        }
    }
    if fetch_failed {
        eprintln!("keygate: a secret could not be fetched (see \"fetch\")");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// The person behind agents that name none: the user keygate runs as.
fn current_user() -> Option<String> {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => Some(u.name),
        _ => std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| Some(format!("uid:{uid}"))),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Keeps secrets out of core dumps and away from same-user ptrace (invariant 1), and raises the
/// open-files limit to its hard limit, so the usual soft 1,024 does not cap connections.
fn harden_process() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-files limit");
            }
        }
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "could not mark the process non-dumpable");
    }
}

/// What `keygate token` does; the command line builds one, so this module needs no `cli`.
pub enum TokenAction {
    /// Mint a token and print it alone on stdout.
    Issue {
        /// The configured agent the token authenticates as.
        agent: String,
        /// Lifetime as given on the command line (`30m`, `8h`, `7d`); parsed when issuing.
        ttl: String,
    },
    /// Print the issued tokens (ids, never values).
    List {
        /// Print JSON instead of a table.
        json: bool,
    },
    /// Revoke one token by id, or every token of one agent.
    Revoke {
        /// The token id (`tok_...`) to revoke.
        id: Option<String>,
        /// Revoke every token of this agent.
        agent: Option<String>,
    },
}

/// `keygate token issue|list|revoke`.
pub fn token_main(config_path: &Path, cmd: TokenAction) -> ExitCode {
    use crate::authenticate::store;
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => return fail(2, &e.to_string()),
    };
    let st = match store::open_for(&config) {
        Ok(s) => s,
        Err(e @ store::StoreError::NoStateDir) => return fail(2, &e.to_string()),
        Err(e) => return fail(1, &e.to_string()),
    };
    match cmd {
        TokenAction::Issue { agent, ttl } => {
            if !config.agents.iter().any(|a| a.name == agent) {
                return fail(
                    2,
                    &format!("no [agents.{agent}] in {}", config.file.display()),
                );
            }
            let ttl = match crate::config::parse_duration(&ttl) {
                Ok(t) if t < Duration::from_secs(1) => {
                    return fail(2, &format!("--ttl: {}", store::StoreError::TtlTooShort(t)))
                }
                Ok(t) => t,
                Err(e) => return fail(2, &format!("--ttl: {e}")),
            };
            match store::issue_in(&*st, &agent, ttl) {
                Ok((token, rec)) => {
                    println!("{token}");
                    eprintln!(
                        "issued {} for agent {} until {}",
                        rec.id,
                        rec.agent,
                        unix_to_rfc3339(rec.expires)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e.to_string()),
            }
        }
        TokenAction::List { json } => match st.tokens() {
            Ok(list) => {
                let now = store::now();
                let rows: Vec<serde_json::Value> = list
                    .iter()
                    .map(|t| {
                        let state = if t.revoked { "revoked" } else if t.expires <= now { "expired" } else { "live" };
                        serde_json::json!({"id": t.id, "agent": t.agent, "created": unix_to_rfc3339(t.created), "expires": unix_to_rfc3339(t.expires), "state": state})
                    })
                    .collect();
                if json {
                    println!("{}", serde_json::Value::Array(rows));
                } else {
                    for r in rows {
                        println!(
                            "{}  {:<12} {:<8} expires {}",
                            r["id"].as_str().unwrap_or(""),
                            r["agent"].as_str().unwrap_or(""),
                            r["state"].as_str().unwrap_or(""),
                            r["expires"].as_str().unwrap_or("")
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, &e.to_string()),
        },
        TokenAction::Revoke { id, agent } => {
            if id.is_none() && agent.is_none() {
                return fail(
                    2,
                    "say which: a token id, or --agent NAME for all of an agent's tokens",
                );
            }
            match st.revoke_tokens(id.as_deref(), agent.as_deref()) {
                Ok(n) => {
                    eprintln!("revoked {n} token(s)");
                    if n == 0 {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => fail(1, &e.to_string()),
            }
        }
    }
}

fn unix_to_rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}
