//! Durable control-plane state: issued tokens and their revocations, freezes, budgets spent,
//! approvals (pending and decided) and the tokens approved once, behind one [`StateStore`] trait.
//!
//! The embedded store is SQLite in `state_dir` ([`sqlite`]). The request path never waits on it:
//! freezes and approvals live in memory and are written through on the (rare) admin action,
//! budgets are kept in memory by `authorize` and written behind once a second. The trait is
//! shaped so a shared store (Redis/Valkey) can follow: [`StateStore::charge`] checks and charges
//! in one atomic step, never a read then a write.

pub mod redis;
pub mod sqlite;
pub mod sync;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::authenticate::store::Issued;
use crate::config::Config;

/// What a store operation could not do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store could not be opened, read or written.
    #[error("state store {}: {message}", path.display())]
    Store {
        /// The state file or directory the operation was on.
        path: PathBuf,
        /// The underlying I/O or SQLite error, as text.
        message: String,
    },
    /// Anyone who can write the state (or replace it in its directory) can mint tokens and lift
    /// freezes.
    #[error("{}: {why}; keygate does not trust it (fix: chown to yourself and chmod {fix})", path.display())]
    Untrusted {
        /// The directory or file that failed the check.
        path: PathBuf,
        /// Who could have written it: the foreign owner uid or the loose mode.
        why: String,
        /// The octal mode to `chmod` it to (`700` for the dir, `600` for a file).
        fix: &'static str,
    },
}

/// Refuses a state dir or file that another user could have written: owned by another uid, or
/// writable by group or others.
fn check_trusted(path: &Path, fix: &'static str) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(StateError::Store {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
        }
    };
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
    Err(StateError::Untrusted {
        path: path.to_path_buf(),
        why,
        fix,
    })
}

/// Checks the state dir and the files in it, where they exist, before anything is opened (or
/// the dir's mode set, which would quietly bless a dir someone else could have written into).
pub fn check_trust(dir: &Path) -> Result<(), StateError> {
    check_trusted(dir, "700")?;
    for f in ["state.db", "state.db-wal", "state.db-shm", "tokens.json"] {
        check_trusted(&dir.join(f), "600")?;
    }
    Ok(())
}

/// What is frozen: everything, or one agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freeze {
    /// `None`: every agent.
    pub agent: Option<String>,
    /// The person who froze it.
    pub by: String,
    /// Unix seconds.
    pub at: u64,
}

/// Tokens an agent spent in one budget window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spent {
    /// The agent's name from the config.
    pub agent: String,
    /// Unix seconds at which the window started.
    pub window_start: u64,
    /// Model tokens (as the provider counted them) charged in this window so far.
    pub tokens: u64,
}

/// The outcome of an atomic check-and-charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    /// Charged; the window's total is now this.
    Charged(u64),
    /// Refused: charging would pass the limit; the window's total stays this.
    Over(u64),
}

/// An approval as stored: the pending request's description plus, once decided, the decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRow {
    /// The approval id people pass to `approve` and `deny`.
    pub id: String,
    /// Where the approval is in its life: pending until decided, timed out or abandoned.
    pub state: ApprovalState,
    /// The pending request, as `approvals list` shows it.
    pub request: serde_json::Value,
    /// The person who approved or denied it; `None` while pending or when nobody decided.
    pub decided_by: Option<String>,
    /// The reason given with a denial (`deny --reason`), if any.
    pub reason: Option<String>,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds at which it left `pending`; `None` while pending.
    pub decided: Option<u64>,
}

/// Where an approval stands; stored and shown as its snake_case name ([`ApprovalState::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for a person; the request is held open meanwhile.
    Pending,
    /// A person let it through.
    Approved,
    /// A person refused it (403 `approval_denied`).
    Denied,
    /// Nobody decided within the route's approval timeout.
    TimedOut,
    /// The request went away (client gone, keygate restarted) before anyone decided.
    Abandoned,
}

impl ApprovalState {
    /// The name stored in the state file and printed by `approvals list`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Denied => "denied",
            ApprovalState::TimedOut => "timed_out",
            ApprovalState::Abandoned => "abandoned",
        }
    }

    fn parse(s: &str) -> ApprovalState {
        match s {
            "pending" => ApprovalState::Pending,
            "approved" => ApprovalState::Approved,
            "denied" => ApprovalState::Denied,
            "timed_out" => ApprovalState::TimedOut,
            _ => ApprovalState::Abandoned,
        }
    }
}

/// A decision a shared store makes per request, awaited on the request's runtime.
pub type Decision<T> = Pin<Box<dyn Future<Output = Result<T, StateError>> + Send + 'static>>;

/// The answer to a budget booking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Booking {
    /// Booked against the window.
    Booked,
    /// Refused: it does not fit; the window ends in this long.
    Refused(Duration),
}

/// What another keygate changed in a shared store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Issued tokens changed (issue, revoke).
    Tokens,
    /// Freezes changed.
    Freezes,
    /// An approval was decided.
    Approval(String),
    /// Messages may have been missed (the subscription was re-established): re-read everything.
    Resync,
}

impl Event {
    /// Reads a message from the events channel; anything unknown asks for a full re-sync.
    pub fn parse(s: &str) -> Event {
        match s {
            "tokens" => Event::Tokens,
            "freezes" => Event::Freezes,
            _ => match s.strip_prefix("approval:") {
                Some(id) => Event::Approval(id.to_string()),
                None => Event::Resync,
            },
        }
    }
}

/// The store's connection, as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Health {
    /// The last round trip succeeded.
    pub connected: bool,
    /// The last success is recent enough to trust the replicated view (`max_stale`).
    pub fresh: bool,
    /// Milliseconds since the last successful round trip.
    pub last_ok_ms_ago: Option<u64>,
    /// How often the connection was lost (and re-established by itself) since start-up.
    pub reconnects: u64,
    /// The last error seen, if any.
    pub last_error: Option<String>,
}

fn not_shared<T>() -> Result<T, StateError> {
    Err(StateError::Store {
        path: PathBuf::from("(embedded)"),
        message: "the embedded store decides budgets and rates in memory".into(),
    })
}

/// Durable control-plane state. Every method is a short synchronous operation; callers on the
/// async runtime run them off the request path (admin actions, write-behind).
pub trait StateStore: Send + Sync {
    /// Where the state lives, for `status`.
    fn location(&self) -> String;

    /// Every freeze in force, global and per agent.
    fn freezes(&self) -> Result<Vec<Freeze>, StateError>;
    /// Freezes (`on`) or unfreezes one scope; unfreezing everything (`agent: None`, `on: false`)
    /// lifts every freeze.
    fn set_freeze(&self, agent: Option<&str>, on: bool, by: &str) -> Result<(), StateError>;

    /// What each agent spent in its current window, as last saved.
    fn spent(&self) -> Result<Vec<Spent>, StateError>;
    /// Saves the in-memory counters (write-behind).
    fn save_spent(&self, spent: &[Spent]) -> Result<(), StateError>;
    /// Adds `tokens` to the agent's window unless that would pass `limit`, in one atomic step; a
    /// new window starts from zero. For stores shared by several keygates.
    fn charge(
        &self,
        agent: &str,
        window_start: u64,
        limit: u64,
        tokens: u64,
    ) -> Result<Charge, StateError>;

    /// Inserts an approval or replaces the stored one with the same id (its decision).
    fn put_approval(&self, row: &ApprovalRow) -> Result<(), StateError>;
    /// The newest `limit` approvals, pending and decided.
    fn approvals(&self, limit: usize) -> Result<Vec<ApprovalRow>, StateError>;
    /// Remembers that `token_id` was approved for `route` (`approval = "once-per-token"`).
    fn approve_token(&self, route: &str, token_id: &str) -> Result<(), StateError>;
    /// Every `(route, token_id)` pair approved once, for a restarted keygate to remember.
    fn approved_tokens(&self) -> Result<Vec<(String, String)>, StateError>;

    /// Issued tokens (hashes and ids, never a token).
    fn tokens(&self) -> Result<Vec<Issued>, StateError>;
    /// Adds an issued token (kept if one with its id exists) and drops expired ones.
    fn add_token(&self, token: &Issued) -> Result<(), StateError>;
    /// Revokes the token with this id, or every token of this agent; returns how many.
    fn revoke_tokens(&self, id: Option<&str>, agent: Option<&str>) -> Result<usize, StateError>;
    /// A number that changes whenever the issued tokens change, from any process: a running
    /// keygate re-reads them only then.
    fn tokens_revision(&self) -> Result<u64, StateError>;

    /// What a secret source keeps across restarts (an OAuth2 source's rotated refresh token),
    /// by key. A store that keeps none answers `None`, and the source starts from its config.
    fn source_state(&self, key: &str) -> Result<Option<String>, StateError> {
        let _ = key;
        Ok(None)
    }
    /// Saves a secret source's state under `key`, replacing what was there.
    fn put_source_state(&self, key: &str, value: &str) -> Result<(), StateError> {
        let _ = value;
        Err(StateError::Store {
            path: PathBuf::from(self.location()),
            message: format!("this store does not keep secret-source state ({key})"),
        })
    }
    /// Whether several keygates share this store: budgets and rates are then decided in it, per
    /// request, and changes arrive as [`Event`]s.
    fn shared(&self) -> bool {
        false
    }
    /// This keygate's name in a shared store.
    fn instance(&self) -> Option<&str> {
        None
    }
    /// The connection's health; an embedded store is always reachable.
    fn health(&self) -> Health {
        Health {
            connected: true,
            fresh: true,
            ..Health::default()
        }
    }
    /// Whether the replicated view is recent enough to serve from (`max_stale`); checked on
    /// every request, so cheaper than [`StateStore::health`].
    fn fresh(&self) -> bool {
        true
    }
    /// Changes made by other keygates, for a shared store.
    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<Event>> {
        None
    }
    /// One approval by id.
    fn approval(&self, id: &str) -> Result<Option<ApprovalRow>, StateError> {
        Ok(self.approvals(10_000)?.into_iter().find(|r| r.id == id))
    }
    /// Decides an approval that is pending in the store, whichever keygate holds its request:
    /// the decided row, or `None` when it is not pending (decided already, or unknown).
    fn decide_approval(
        &self,
        _id: &str,
        _state: ApprovalState,
        _by: &str,
        _reason: Option<&str>,
    ) -> Result<Option<ApprovalRow>, StateError> {
        Ok(None)
    }
    /// Books `n` tokens against the agent's budget of `limit` per `per` (windows aligned to the
    /// store's clock), atomically, or refuses. Shared stores only.
    fn reserve_budget(
        &self,
        _agent: &str,
        _per: Duration,
        _limit: u64,
        _n: u64,
    ) -> Decision<Booking> {
        Box::pin(async { not_shared() })
    }
    /// Replaces a booking of `booked` tokens by the `used` ones. Shared stores only.
    fn settle_budget(
        &self,
        _agent: &str,
        _per: Duration,
        _booked: u64,
        _used: u64,
    ) -> Decision<()> {
        Box::pin(async { not_shared() })
    }
    /// Drops this keygate's bookings left by a previous run (its requests are gone).
    fn forget_in_flight(&self, _agents: &[String]) -> Result<(), StateError> {
        Ok(())
    }
    /// Tokens charged in the agent's current window, for `status` and metrics.
    fn budget_usage(&self, _agent: &str) -> Result<u64, StateError> {
        not_shared()
    }
    /// Takes one request from the agent's bucket (`capacity`, refilled at `per_sec`); `Some`
    /// is the wait until one is there. Shared stores only.
    fn take_rate(&self, _agent: &str, _capacity: u64, _per_sec: f64) -> Decision<Option<Duration>> {
        Box::pin(async { not_shared() })
    }
}

/// The state directory: `state_dir` from the config, else `$XDG_STATE_HOME/keygate`, else
/// `~/.local/state/keygate`.
pub fn dir(config: &Config) -> Option<PathBuf> {
    match &config.state_dir {
        Some(d) => Some(d.clone()),
        None => default_dir(),
    }
}

/// `$XDG_STATE_HOME/keygate`, else `~/.local/state/keygate`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("keygate"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".local/state/keygate"))
}

/// Opens the store the config names: the shared one for `state = { backend = "redis" }` (its
/// password fetched from `password_from`), else the embedded one in `dir`.
pub fn open_configured(config: &Config) -> Result<Option<Arc<dyn StateStore>>, StateError> {
    match &config.state {
        crate::config::StateBackend::Redis(r) => {
            let password = match r.password_from {
                Some(id) => Some(
                    crate::credential::store_password(&config.secrets[id]).map_err(|m| {
                        StateError::Store {
                            path: PathBuf::from(&r.url),
                            message: m,
                        }
                    })?,
                ),
                None => None,
            };
            let instance = instance_name(config);
            Ok(Some(Arc::new(redis::RedisStore::open(
                r, &instance, password,
            )?)))
        }
        crate::config::StateBackend::Embedded => match dir(config) {
            Some(d) => open(&d).map(Some),
            None => Ok(None),
        },
    }
}

/// This keygate's name: `instance` from the config, else the host name.
pub fn instance_name(config: &Config) -> String {
    if let Some(i) = &config.instance {
        return i.clone();
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keygate".into())
}

/// Opens the embedded store in `dir`, creating it (mode 0700) if needed.
pub fn open(dir: &Path) -> Result<Arc<dyn StateStore>, StateError> {
    check_trust(dir)?;
    Ok(Arc::new(sqlite::Sqlite::open(dir)?))
}

/// Unix seconds now, the clock every stored timestamp uses (0 if the clock is before 1970).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_from_other_keygates_are_read_and_anything_unknown_asks_for_a_full_resync() {
        assert_eq!(Event::parse("tokens"), Event::Tokens);
        assert_eq!(Event::parse("freezes"), Event::Freezes);
        assert_eq!(
            Event::parse("approval:apr_00ff"),
            Event::Approval("apr_00ff".into())
        );
        assert_eq!(Event::parse("something new"), Event::Resync);
    }

    #[test]
    fn the_embedded_store_is_not_shared_and_refuses_shared_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path()).unwrap();
        assert!(!s.shared() && s.instance().is_none() && s.health().fresh);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt
            .block_on(s.reserve_budget("a", Duration::from_secs(60), 10, 1))
            .is_err());
    }
}
