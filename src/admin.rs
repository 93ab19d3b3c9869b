//! The control plane: what a person uses to stay in control while agents run.
//!
//! A running keygate listens on an admin socket ([`server`]: Unix, mode 0600, separate from the
//! agent listeners, refusing any peer uid but keygate's own). The admin commands ([`client`]:
//! `status`, `reload`, `freeze`, `unfreeze`, `approvals list`, `approve`, `deny`) talk to it,
//! and say so clearly when keygate is not running. `/metrics` serves Prometheus text
//! ([`metrics`]). `drill revoke` ([`drill`]) answers "what breaks if I revoke X?" from the config,
//! the token store and the audit log, changing nothing.
//!
//! [`Control`] is the part of keygate's state that outlives a reload: freezes, pending approvals,
//! metrics, and the durable store behind them.

pub mod client;
pub mod drill;
pub mod metrics;
mod peer;
pub mod server;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::authorize::approval::Approvals;
use crate::config::Config;
use crate::error::{Code, Rejection};
use crate::state::{Freeze, StateStore};

/// What is frozen right now.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Frozen {
    /// Everything is frozen (by whom, since when).
    pub all: Option<Freeze>,
    /// Agents frozen one by one.
    pub agents: BTreeMap<String, Freeze>,
}

impl Frozen {
    fn from_list(list: Vec<Freeze>) -> Frozen {
        let mut frozen = Frozen::default();
        for f in list {
            match &f.agent {
                None => frozen.all = Some(f),
                Some(a) => {
                    frozen.agents.insert(a.clone(), f);
                }
            }
        }
        frozen
    }
}

/// The control plane of a running keygate: freezes, approvals and metrics, shared by every
/// request state so they outlive a reload.
pub struct Control {
    /// The durable state store; `None` when no state dir is configured (state lives in memory).
    pub store: Option<Arc<dyn StateStore>>,
    frozen: ArcSwap<Frozen>,
    /// Requests waiting for a person, and the tokens approved once.
    pub approvals: Arc<Approvals>,
    /// The counters and gauges `/metrics` exposes.
    pub metrics: metrics::Metrics,
    /// Where the admin socket listens, once it does.
    pub admin_socket: std::sync::OnceLock<PathBuf>,
    /// This keygate's name in audit records and approvals (`instance`).
    pub instance: Option<String>,
    /// `keygate run` leases in force: token id -> run id and person.
    pub runs: crate::launcher::lease::Runs,
    /// The forward proxy's addresses and CA, once it listens: `keygate run` points tools at it.
    pub proxy: std::sync::OnceLock<crate::launcher::files::ProxyInfo>,
}

impl Control {
    /// Loads freezes and approved tokens from the store; without a store, state lives in memory.
    pub fn new(store: Option<Arc<dyn StateStore>>) -> Control {
        let mut frozen = Frozen::default();
        if let Some(s) = &store {
            match s.freezes() {
                Ok(list) => frozen = Frozen::from_list(list),
                Err(e) => {
                    // Fail closed: a freeze that cannot be read might be in force.
                    tracing::error!(error = %e, "cannot read freezes from the state store; starting frozen");
                    frozen.all = Some(Freeze {
                        agent: None,
                        by: "keygate (state store unreadable)".into(),
                        at: crate::state::now(),
                    });
                }
            }
        }
        Control {
            approvals: Arc::new(Approvals::new(store.clone())),
            store,
            frozen: ArcSwap::from_pointee(frozen),
            metrics: metrics::Metrics::new(),
            admin_socket: std::sync::OnceLock::new(),
            instance: None,
            runs: Default::default(),
            proxy: std::sync::OnceLock::new(),
        }
    }

    /// Names this keygate in its audit records and pending approvals.
    pub fn with_instance(mut self, instance: Option<String>) -> Control {
        self.instance = instance;
        self
    }

    /// Re-reads freezes from a shared store (another keygate froze or unfroze). A store that
    /// cannot be read keeps the view; the staleness check refuses requests if that lasts.
    pub fn sync_freezes(&self) -> Result<(), crate::state::StateError> {
        if let Some(s) = &self.store {
            let f = Frozen::from_list(s.freezes()?);
            self.frozen.store(Arc::new(f));
        }
        Ok(())
    }

    /// Refuses with 503 `state_unavailable` while a shared store has not been reached for longer
    /// than `max_stale`: a revocation or freeze made meanwhile might be unseen.
    pub fn check_state(&self) -> Result<(), Rejection> {
        let Some(s) = self.store.as_ref().filter(|s| s.shared()) else {
            return Ok(());
        };
        if s.fresh() {
            return Ok(());
        }
        Err(Rejection::new(
            Code::StateUnavailable,
            "keygate cannot reach its shared state store, so revocations and freezes cannot be confirmed; retry shortly",
        ))
    }

    /// A snapshot of what is frozen now, for `status`.
    pub fn frozen(&self) -> Arc<Frozen> {
        self.frozen.load_full()
    }

    /// Refuses with 503 `frozen` while everything, or this agent, is frozen.
    pub fn check_frozen(&self, agent: Option<&str>) -> Result<(), Rejection> {
        let f = self.frozen.load();
        if let Some(all) = &f.all {
            return Err(Rejection::new(
                Code::Frozen,
                format!(
                    "keygate is frozen (by {}); nothing is forwarded until it is unfrozen",
                    all.by
                ),
            ));
        }
        if let Some(a) = agent {
            if let Some(fz) = f.agents.get(a) {
                return Err(Rejection::new(
                    Code::Frozen,
                    format!("agent {a} is frozen (by {}); its requests are refused until it is unfrozen", fz.by),
                ));
            }
        }
        Ok(())
    }

    /// Freezes or unfreezes, in memory at once and in the store so it survives a restart.
    /// Unfreezing without an agent lifts every freeze.
    pub fn set_frozen(&self, agent: Option<&str>, on: bool, by: &str) -> Result<(), String> {
        let mut f = (*self.frozen.load_full()).clone();
        let entry = Freeze {
            agent: agent.map(str::to_string),
            by: by.to_string(),
            at: crate::state::now(),
        };
        match (on, agent) {
            (true, None) => f.all = Some(entry),
            (true, Some(a)) => {
                f.agents.insert(a.to_string(), entry);
            }
            (false, None) => f = Frozen::default(),
            (false, Some(a)) => {
                f.agents.remove(a);
            }
        }
        self.frozen.store(Arc::new(f));
        match &self.store {
            Some(s) => s.set_freeze(agent, on, by).map_err(|e| e.to_string()),
            None => Err("no state store: the change holds until keygate stops".into()),
        }
    }
}

/// The admin socket's path: `admin_socket`, else `admin.sock` in the state directory.
pub fn socket_path(config: &Config) -> Option<PathBuf> {
    config
        .admin_socket
        .clone()
        .or_else(|| crate::state::dir(config).map(|d| d.join("admin.sock")))
}

/// The admin socket named by a config file that may not load (a reload must reach keygate to be
/// refused there, with the error in the audit): `admin_socket` or `state_dir` read leniently.
pub fn socket_path_lenient(path: &std::path::Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).unwrap_or_default();
    let key = |k: &str| {
        table
            .get(k)
            .and_then(|v| v.as_str())
            .map(crate::config::expand_home)
    };
    key("admin_socket")
        .or_else(|| key("state_dir").map(|d| d.join("admin.sock")))
        .or_else(|| crate::state::default_dir().map(|d| d.join("admin.sock")))
}

/// The person behind a uid: the user name, else `uid:N`.
pub fn person(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => format!("uid:{uid}"),
    }
}
