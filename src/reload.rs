//! Reload: `keygate reload` and SIGHUP re-read the config and fetch every secret afresh,
//! building a whole new `pipeline::State` and swapping it in at once.
//!
//! Requests already running keep the `Arc<State>` they started with, so an in-flight request or
//! stream finishes on the policy it started under; the next request sees the new one. A config
//! that does not load is refused with its `file:line: key: what is wrong` and the old state keeps
//! serving. Each reload, good or bad, is an audit record. Budgets spent carry over; listeners and
//! the audit log path stay as they were at start-up (changing them needs a restart).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::admin::Control;
use crate::audit::AuditLog;
use crate::authenticate::Tokens;
use crate::authorize::Policy;
use crate::config::{Config, Format, Mode};
use crate::credential::Credentials;
use crate::forward::Forwarder;
use crate::guard::Guard;
use crate::pipeline::State;

/// The state requests are served with, swapped whole on reload.
pub struct Live {
    /// The current request state; each request loads it once and keeps that snapshot.
    pub state: ArcSwap<State>,
    config_path: PathBuf,
    audit_override: Option<PathBuf>,
    /// One reload at a time.
    lock: tokio::sync::Mutex<()>,
}

/// What a built state shares with the one before it.
pub struct Fixed {
    /// The audit log, opened once at start: a reload never breaks its hash chain.
    pub audit: Arc<AuditLog>,
    /// Freezes, approvals and metrics, which outlive a reload.
    pub control: Arc<Control>,
    /// The person behind agents that name none: the user keygate runs as.
    pub default_person: Option<Arc<str>>,
    /// Listener URLs, for `/healthz`; listeners are bound once and not changed by a reload.
    pub listen_urls: Vec<String>,
    /// The first TCP listener's port, for the lab's `/healthz`.
    pub listen_port: u16,
}

/// Builds a request state from a loaded config.
pub fn build(config: Config, fixed: &Fixed) -> Result<State, String> {
    let tokens = Tokens::from_config(&config)
        .map_err(|e| format!("{}: {e}", config.file.display()))?
        .with_revoked(fixed.control.runs.revoked());
    if let Some(s) = fixed.control.store.as_ref().filter(|s| s.shared()) {
        tokens.use_store(s.clone());
    }
    let forwarder = Forwarder::new(config.connect_timeout)
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_routes(&config)?;
    let tls = match &config.tls {
        Some(files) => Some(crate::listen::tls::server_config(files)?),
        None => None,
    };
    let config = Arc::new(config);
    Ok(State {
        tls,
        guard: Guard {
            allowed_origins: config.allowed_origins.clone(),
            max_request_bytes: config.max_request_bytes,
        },
        policy: Policy::new(&config).shared(fixed.control.store.as_ref(), &config),
        credentials: Credentials::new(&config).keep_state_in(fixed.control.store.as_ref()),
        tokens,
        forwarder,
        audit: fixed.audit.clone(),
        default_person: fixed.default_person.clone(),
        listen_urls: fixed.listen_urls.clone(),
        listen_port: fixed.listen_port,
        policy_version: config.policy_version().into(),
        control: fixed.control.clone(),
        config,
    })
}

/// Fetches every secret of a freshly built state before it serves, so the request scan knows
/// every held value from its first request. A native config whose secret cannot be fetched is
/// refused (at start-up: keygate does not start; on reload: the old state keeps serving); the
/// lab broker's configs fetch again at first use, as the lab broker did.
pub async fn prefetch(state: &State) -> Result<(), String> {
    let config = &state.config;
    if config.mode == Mode::DryRun {
        return Ok(());
    }
    for (name, msg) in state.credentials.prefetch().await {
        if config.format == Format::Seed {
            tracing::warn!(secret = %name, error = %msg, "secret not fetched at start-up; fetching it at first use");
        } else {
            return Err(format!(
                "{msg} (every secret is fetched at start-up, so that the request scan knows it)"
            ));
        }
    }
    Ok(())
}

impl Live {
    /// Wraps the first state; `config_path` and `audit_override` are what each reload re-reads.
    pub fn new(state: State, config_path: &Path, audit_override: Option<&Path>) -> Live {
        Live {
            state: ArcSwap::from_pointee(state),
            config_path: config_path.to_path_buf(),
            audit_override: audit_override.map(Path::to_path_buf),
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Re-reads the config and swaps in a new state; returns the new policy version. `by` is the
    /// person (or `SIGHUP`) asking, for the audit record.
    pub async fn reload(&self, by: &str) -> Result<String, String> {
        let _one = self.lock.lock().await;
        let old = self.state.load_full();
        let path = self.config_path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            Config::load(&path).and_then(|c| c.require_routes().map(|()| c))
        })
        .await
        .map_err(|e| format!("reload task failed: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        let built = loaded.and_then(|mut config| {
            // The audit log stays the one opened at start-up.
            let open_log = self
                .audit_override
                .clone()
                .unwrap_or_else(|| old.config.audit_log.clone());
            if config.audit_log != open_log && self.audit_override.is_none() {
                tracing::warn!(
                    "audit_log changed in the config; keygate keeps writing {} until restarted",
                    open_log.display()
                );
            }
            config.audit_log = open_log;
            if config.listen != old.config.listen {
                tracing::warn!(
                    "listen changed in the config; the listeners change at the next restart"
                );
            }
            let fixed = Fixed {
                audit: old.audit.clone(),
                control: old.control.clone(),
                default_person: old.default_person.clone(),
                listen_urls: old.listen_urls.clone(),
                listen_port: old.listen_port,
            };
            build(config, &fixed)
        });
        // Secrets are re-read with the config: a reload that cannot fetch one is refused.
        let built = match built {
            Ok(state) => prefetch(&state).await.map(|()| state),
            Err(e) => Err(e),
        };
        let event = |outcome: &str, version: Option<&str>, error: Option<&str>| {
            serde_json::json!({
                "time": crate::audit::now_rfc3339(),
                "event": outcome,
                "by": by,
                "config": self.config_path.display().to_string(),
                "previous_policy_version": old.policy_version,
                "policy_version": version.unwrap_or(&old.policy_version),
                "error": error,
            })
        };
        match built {
            Ok(mut state) => {
                let config = state.config.clone();
                state
                    .policy
                    .carry_budgets(&config, &old.policy, &old.config);
                let version = state.policy_version.clone();
                let audit = old.audit.clone();
                let control = old.control.clone();
                // Recorded before the swap, so every request on the new policy comes after it.
                let rec = event("reload", Some(&version), None);
                let _ = tokio::task::spawn_blocking(move || audit.event(&rec)).await;
                self.state.store(Arc::new(state));
                control.metrics.reloaded();
                tracing::info!(policy_version = %version, by = %by, "config reloaded");
                Ok(version.to_string())
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the previous config keeps serving");
                let audit = old.audit.clone();
                let rec = event("reload_failed", None, Some(&e));
                let _ = tokio::task::spawn_blocking(move || audit.event(&rec)).await;
                Err(e)
            }
        }
    }
}
