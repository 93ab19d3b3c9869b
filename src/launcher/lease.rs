//! keygate's side of `keygate run`: the lease.
//!
//! `POST /lease` on the admin socket (with `Upgrade: keygate-lease`) mints a token for one run
//! and answers `101`; on the upgraded connection keygate writes one JSON line (the token, what
//! to set and drop in the agent's environment, what the sandbox denies and allows) and then
//! holds the connection. When it drops (the launcher closed it, exited or was SIGKILLed; the
//! kernel closes its socket either way) or the run's TTL passes, the token is revoked in the
//! store and the in-memory token set is re-read at once, so the next request with it gets 401.
//!
//! The run's person and id are kept in [`Runs`] so every audit record of the run names them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::authenticate::store::{hash_hex, mint, Issued};
use crate::config::{Config, Listen};
use crate::pipeline::State;
use crate::reload::Live;
use crate::secret::openbao::{Auth, BaoToken};
use crate::secret::SecretSource;

/// A run's lifetime when the launcher names none: a backstop, the lease ends it sooner.
pub const DEFAULT_TTL: Duration = Duration::from_secs(12 * 3600);

/// How often the launcher writes to the lease when it names no interval: keygate ends a lease
/// that stays silent for [`MISSED_BEATS`] intervals, so a launcher that was stopped (SIGSTOP)
/// or hangs does not keep its token alive until the TTL.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Intervals without a heartbeat after which a lease ends.
pub const MISSED_BEATS: u32 = 3;

/// The interval a launcher asked for, kept within 1 s to 60 s.
fn heartbeat_of(args: &Value) -> Duration {
    args["heartbeat_secs"]
        .as_u64()
        .map_or(DEFAULT_HEARTBEAT, |s| Duration::from_secs(s.clamp(1, 60)))
}

/// The run a token was leased for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunInfo {
    /// `run_` + 16 hex digits.
    pub run_id: String,
    /// The user name of the uid that started the run.
    pub person: String,
}

/// Runs holding a lease, by token id.
#[derive(Default)]
pub struct Runs {
    by_token: Mutex<HashMap<String, RunInfo>>,
    /// Tokens of ended runs, refused by the authenticator whatever the store recorded.
    revoked: Arc<crate::authenticate::RevokedIds>,
    /// The live runs' placeholders, minted with the lease and forgotten when it ends.
    pub placeholders: crate::placeholder::Registry,
}

impl Runs {
    /// The run this token id was leased for, if it is still running.
    pub fn get(&self, token_id: &str) -> Option<RunInfo> {
        self.lock().get(token_id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunInfo>> {
        self.by_token.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ended runs' token ids, shared with every state's authenticator.
    pub fn revoked(&self) -> Arc<crate::authenticate::RevokedIds> {
        self.revoked.clone()
    }

    /// Token ids of every run still holding a lease (revoked when keygate stops).
    pub fn token_ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

/// Revokes leased tokens left by a keygate that stopped without ending its leases (SIGKILL, a
/// power cut): no launcher can still hold a lease on a connection to a process that is gone, so
/// each is revoked rather than left to its TTL. Returns how many.
///
/// A shared store (Redis) also holds the live leases of other instances, which cannot be told
/// apart yet: there the TTL remains the backstop.
pub fn revoke_orphans(store: &dyn crate::state::StateStore) -> Result<usize, String> {
    if store.shared() {
        return Ok(0);
    }
    let tokens = store.tokens().map_err(|e| e.to_string())?;
    let mut n = 0;
    for t in tokens.iter().filter(|t| !t.revoked && t.lease) {
        n += store
            .revoke_tokens(Some(&t.id), None)
            .map_err(|e| e.to_string())?;
    }
    Ok(n)
}

/// Revokes every leased token: keygate is stopping and its leases end with it.
pub fn revoke_all(control: &crate::admin::Control, store: &dyn crate::state::StateStore) {
    for id in control.runs.token_ids() {
        if let Err(e) = store.revoke_tokens(Some(&id), None) {
            tracing::error!(token_id = id, error = %e, "cannot revoke a run's token at exit");
        }
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        json!({"ok": false, "error": message.into()}).to_string() + "\n",
    )));
    *r.status_mut() = status;
    r
}

/// Answers `POST /lease`: mints the run's token and hands the connection to the lease task.
pub(crate) async fn open(
    live: Arc<Live>,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    uid: u32,
    pid: Option<i32>,
    args: &Value,
) -> Response<Full<Bytes>> {
    let Some(on_upgrade) = on_upgrade else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a lease needs `Connection: upgrade` and `Upgrade: keygate-lease`",
        );
    };
    let state = live.state.load_full();
    let config = &state.config;
    let store = state
        .control
        .store
        .clone()
        .filter(|_| state.tokens.has_store());
    let Some(store) = store else {
        return refuse(
            StatusCode::CONFLICT,
            "keygate run needs a token store: add state_dir = \"~/.local/state/keygate\" to the config",
        );
    };
    let agent = match pick_agent(config, args["agent"].as_str()) {
        Ok(a) => a,
        Err(e) => return refuse(StatusCode::NOT_FOUND, e),
    };
    let ttl = args["ttl_secs"]
        .as_u64()
        .map_or(DEFAULT_TTL, Duration::from_secs);
    if ttl < Duration::from_secs(1) {
        return refuse(StatusCode::BAD_REQUEST, "a run's ttl must be at least 1s");
    }
    let token = zeroize::Zeroizing::new(mint());
    let sha = hash_hex(token.as_bytes());
    let created = crate::state::now();
    let issued = Issued {
        id: format!("tok_{}", &sha[..12]),
        agent: agent.clone(),
        sha256: sha,
        created,
        expires: created.saturating_add(ttl.as_secs()),
        revoked: false,
        lease: true,
    };
    let token_id = issued.id.clone();
    let added = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.add_token(&issued))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
    };
    if let Err(e) = added {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot store the run's token: {e}"),
        );
    }
    let run = RunInfo {
        run_id: format!("run_{:016x}", rand::random::<u64>()),
        person: crate::admin::person(uid),
    };
    state
        .control
        .runs
        .lock()
        .insert(token_id.clone(), run.clone());
    refresh(&live).await;

    let heartbeat = heartbeat_of(args);
    // A launcher whose agent cannot signal it (Landlock signal scoping) asks keygate not to
    // watch its heartbeat, so a person's Ctrl-Z of the whole job does not end the run.
    let watched = args["heartbeat_watch"].as_bool().unwrap_or(true);
    let reply = grant(&state, &agent, &token, &token_id, &run, args, heartbeat);
    let record = json!({
        "time": crate::audit::now_rfc3339(),
        "event": "run_start",
        "by": run.person,
        "peer_uid": uid,
        "peer_pid": pid,
        "run_id": run.run_id,
        "agent": agent,
        "token_id": token_id,
        "ttl_secs": ttl.as_secs(),
        "heartbeat_watched": watched,
        "command": args["command"].as_str().unwrap_or(""),
        "policy_version": state.policy_version,
    });
    write_event(&state, record).await;
    tokio::spawn(hold(
        live.clone(),
        on_upgrade,
        reply,
        token_id,
        run,
        ttl,
        watched.then(|| heartbeat * MISSED_BEATS),
    ));

    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    r.headers_mut().insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("keygate-lease"),
    );
    r
}

/// Holds the lease until the launcher's connection drops, its heartbeat stops or the TTL
/// passes, then revokes.
async fn hold(
    live: Arc<Live>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    reply: zeroize::Zeroizing<String>,
    token_id: String,
    run: RunInfo,
    ttl: Duration,
    silence: Option<Duration>,
) {
    let why = match on_upgrade.await {
        Ok(io) => {
            let mut io = TokioIo::new(io);
            if let Err(e) = io.write_all(reply.as_bytes()).await {
                format!("could not hand the token over: {e}")
            } else {
                drop(reply);
                let mut buf = [0u8; 256];
                let read_to_end = async {
                    loop {
                        let read = io.read(&mut buf);
                        let beat = match silence {
                            Some(s) => tokio::time::timeout(s, read).await,
                            None => Ok(read.await),
                        };
                        match beat {
                            Ok(Ok(0)) => break "the launcher closed the lease".to_string(),
                            Ok(Ok(_)) => continue,
                            Ok(Err(e)) => break format!("the lease connection failed: {e}"),
                            Err(_) => {
                                break format!(
                                    "no heartbeat from the launcher for {}s (stopped or hung)",
                                    silence.unwrap_or_default().as_secs()
                                )
                            }
                        }
                    }
                };
                let why = tokio::select! {
                    w = read_to_end => w,
                    _ = tokio::time::sleep(ttl) => "the run's ttl passed".to_string(),
                };
                end(&live, &token_id, &run, &why).await;
                // Tells a launcher that is waiting for it that the token is dead now.
                let _ = io.write_all(b"{\"revoked\":true}\n").await;
                let _ = io.shutdown().await;
                return;
            }
        }
        Err(e) => format!("the lease connection was not upgraded: {e}"),
    };
    end(&live, &token_id, &run, &why).await;
}

/// Revokes the run's token, forgets the run, and re-reads tokens so the revocation holds for the
/// very next request.
async fn end(live: &Arc<Live>, token_id: &str, run: &RunInfo, why: &str) {
    let state = live.state.load_full();
    // Refused from now on, before and whatever the store says.
    state.control.runs.revoked.insert(token_id);
    state.control.runs.placeholders.forget_run(token_id);
    // `jit = "run"` credentials die with the run.
    state.credentials.end_run(&run.run_id);
    if let Some(store) = state.control.store.clone() {
        let id = token_id.to_string();
        let revoked = tokio::task::spawn_blocking(move || store.revoke_tokens(Some(&id), None))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = revoked {
            tracing::error!(token_id, error = %e, "cannot revoke a run's token in the store; this keygate refuses it from memory, the store keeps it until its ttl");
        }
    }
    state.control.runs.lock().remove(token_id);
    refresh(live).await;
    let record = json!({
        "time": crate::audit::now_rfc3339(),
        "event": "run_end",
        "by": run.person,
        "run_id": run.run_id,
        "token_id": token_id,
        "reason": why,
        "policy_version": state.policy_version,
    });
    write_event(&state, record).await;
}

async fn refresh(live: &Arc<Live>) {
    let state = live.state.load_full();
    let _ = tokio::task::spawn_blocking(move || state.tokens.refresh()).await;
}

async fn write_event(state: &State, record: Value) {
    let audit = state.audit.clone();
    let written = tokio::task::spawn_blocking(move || audit.event(&record))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    if let Err(e) = written {
        tracing::error!(error = %e, "cannot audit a run's start or end");
    }
}

/// The agent named, else the only agent the config has.
fn pick_agent(config: &Config, asked: Option<&str>) -> Result<String, String> {
    let names: Vec<&str> = config.agents.iter().map(|a| a.name.as_str()).collect();
    match asked {
        Some(a) if names.contains(&a) => Ok(a.to_string()),
        Some(a) => Err(format!(
            "no agent {a} in the config (agents: {})",
            names.join(", ")
        )),
        None if names.len() == 1 => Ok(names[0].to_string()),
        None => Err(format!(
            "say which agent the run is for: keygate run --agent A (agents: {})",
            names.join(", ")
        )),
    }
}

/// What the launcher needs: the token, the agent's environment, the sandbox's lists.
fn grant(
    state: &State,
    agent: &str,
    token: &str,
    token_id: &str,
    run: &RunInfo,
    args: &Value,
    heartbeat: Duration,
) -> zeroize::Zeroizing<String> {
    let config = &state.config;
    let base = state
        .listen_urls
        .iter()
        .find(|u| u.starts_with("http://"))
        .cloned()
        .unwrap_or_default();
    let agent_cfg = config.agents.iter().find(|a| a.name == agent);
    let routes: Vec<&crate::config::Route> = match agent_cfg.and_then(|a| a.routes.as_ref()) {
        Some(ids) => ids.iter().map(|id| &config.routes[*id]).collect(),
        None => config.routes.iter().collect(),
    };
    let mut set = serde_json::Map::new();
    if !base.is_empty() {
        for r in &routes {
            let route_base = format!("{base}{}", r.prefix.trim_end_matches('/'));
            for (k, v) in super::sdk_env(r, &route_base, token) {
                set.insert(k, v.into());
            }
            for (k, v) in &r.env {
                let v = v
                    .replace("{token}", token)
                    .replace("{base_url}", &route_base);
                set.insert(k.clone(), v.into());
            }
        }
    }
    let placeholders = state
        .control
        .runs
        .placeholders
        .mint_for_run(token_id, agent, &routes);
    for r in &routes {
        let value = placeholders.iter().find(|(name, _)| *name == r.name);
        if let (Some(var), Some((_, value))) = (&r.placeholder_env, value) {
            set.insert(var.clone(), value.clone().into());
        }
    }
    let files = state
        .control
        .proxy
        .get()
        .map(|proxy| super::files::grant(proxy, token, &routes, &placeholders, &mut set));
    // Names that hold a value keygate holds, matched by hash: no value crosses the socket.
    let held = state.credentials.held_hashes();
    let mut reach = Reach::default();
    for s in &config.secrets {
        reach.source(&s.source);
    }
    if let Some(program) = config.approval_notify.first() {
        reach.program(program);
    }
    // keygate's own binary: rewritten, it would run as keygate at the next start.
    if let Ok(exe) = std::env::current_exe() {
        reach.read_only.push(exe);
    }
    let mut drop: Vec<String> = config.run.drop_env.clone();
    for a in &config.agents {
        drop.extend(a.token_env.iter().cloned());
    }
    drop.append(&mut reach.env);
    if let Some(vars) = args["env_sha256"].as_object() {
        for (name, h) in vars {
            if h.as_str().is_some_and(|h| held.iter().any(|x| x == h)) {
                drop.push(name.clone());
            }
        }
    }
    drop.sort();
    drop.dedup();
    let mut deny: Vec<String> = vec![config.file.display().to_string()];
    if let Some(d) = crate::state::dir(config) {
        deny.push(d.display().to_string());
    }
    if let Some(s) = state.control.admin_socket.get() {
        deny.push(s.display().to_string());
    }
    deny.push(state.audit.path().display().to_string());
    deny.extend(reach.files.iter().map(|p| p.display().to_string()));
    // Relative paths are keygate's (its working directory), not the launcher's; a path that
    // does not exist yet keeps its place (the sandbox denies it once created).
    let absolute = |p: String| {
        crate::launcher::sandbox::resolve(Path::new(&p))
            .display()
            .to_string()
    };
    let deny: Vec<String> = deny.into_iter().map(absolute).collect();
    let read_only: Vec<String> = reach
        .read_only
        .iter()
        .map(|p| absolute(p.display().to_string()))
        .collect();
    let mut ports: Vec<u16> = config
        .listen
        .iter()
        .filter_map(|l| match l {
            Listen::Tcp(a) | Listen::Tls(a) => Some(a.port()),
            Listen::Unix(_) => None,
        })
        .filter(|p| *p != 0)
        .collect();
    ports.push(state.listen_port);
    ports.extend(&config.run.allow_ports);
    if let Some(proxy) = state.control.proxy.get() {
        ports.extend(proxy.addrs.iter().map(|a| a.port()));
    }
    ports.sort_unstable();
    ports.dedup();
    zeroize::Zeroizing::new(
        json!({
            "token": token,
            "token_id": token_id,
            "run_id": run.run_id,
            "agent": agent,
            "person": run.person,
            "base_url": base,
            "set": set,
            "drop": drop,
            "deny": deny,
            "read_only": read_only,
            "ports": ports,
            "heartbeat_secs": heartbeat.as_secs(),
            "files": files,
        })
        .to_string()
            + "\n",
    )
}

/// What a secret source reaches that the agent must not: variables to drop, files to deny,
/// programs to keep read-only.
#[derive(Debug, Default)]
struct Reach {
    env: Vec<String>,
    files: Vec<PathBuf>,
    read_only: Vec<PathBuf>,
}

impl Reach {
    fn source(&mut self, source: &SecretSource) {
        match source {
            SecretSource::Env { var } => self.env.push(var.clone()),
            SecretSource::File { path } => self.files.push(path.clone()),
            SecretSource::Command { argv, .. } => {
                if let Some(program) = argv.first() {
                    self.program(program);
                }
            }
            SecretSource::OpenBao(bao) => {
                let settings = bao.settings();
                // The CA decides whom keygate trusts with its OpenBao token.
                self.read_only.extend(settings.ca_file.iter().cloned());
                match &settings.auth {
                    Auth::Token(BaoToken::Env(var)) => self.env.push(var.clone()),
                    Auth::Token(BaoToken::File(path)) => self.files.push(path.clone()),
                    // The secret id and the JWT come from other secrets, which are covered as
                    // secrets of their own; their specs are walked too in case one is inline.
                    Auth::AppRole { secret_id, .. } => self.source(&secret_id.source),
                    Auth::Jwt { jwt, .. } => self.source(&jwt.source),
                }
            }
            SecretSource::OAuth2(o) => {
                let settings = &o.settings;
                self.read_only.extend(settings.ca_file.iter().cloned());
                if let Some(secret) = &settings.client_secret {
                    self.source(&secret.source);
                }
                if let crate::secret::oauth2::Grant::RefreshToken { initial } = &settings.grant {
                    self.source(&initial.source);
                }
            }
            SecretSource::GitHubApp(app) => {
                self.read_only.extend(app.settings.ca_file.iter().cloned());
                self.source(&app.settings.private_key.source);
            }
            // keygate's own AWS credentials: the variables are always dropped (`AWS_*`); the
            // shared files are denied where they exist (a missing one would freeze `~`).
            SecretSource::AwsSecretsManager { .. } | SecretSource::AwsCredentials { .. } => {
                let home = std::env::var_os("HOME").map(PathBuf::from);
                for (var, name) in [
                    ("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
                    ("AWS_CONFIG_FILE", "config"),
                ] {
                    let path = std::env::var_os(var)
                        .map(PathBuf::from)
                        .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)));
                    self.files.extend(path.filter(|p| p.exists()));
                }
            }
            SecretSource::None => {}
        }
    }

    /// A program keygate runs: a path as written (relative to keygate's directory), a bare
    /// name where keygate's `PATH` finds it.
    fn program(&mut self, program: &str) {
        if program.contains('/') {
            self.read_only.push(PathBuf::from(program));
            return;
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        if let Some(found) = std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
        {
            self.read_only.push(found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launchers_heartbeat_wish_is_kept_between_one_second_and_a_minute() {
        assert_eq!(heartbeat_of(&json!({})), DEFAULT_HEARTBEAT);
        assert_eq!(
            heartbeat_of(&json!({"heartbeat_secs": 0})),
            Duration::from_secs(1)
        );
        assert_eq!(
            heartbeat_of(&json!({"heartbeat_secs": 2})),
            Duration::from_secs(2)
        );
        assert_eq!(
            heartbeat_of(&json!({"heartbeat_secs": 86400})),
            Duration::from_secs(60)
        );
    }
}
