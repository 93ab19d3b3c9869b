//! Rates and budgets decided in a shared state store, so several keygates admit no more than
//! one limit between them.
//!
//! Each decision is one round trip to one Lua script (`state/redis.rs`): the rate bucket and
//! the budget window are checked and charged atomically on the server. A budget books a
//! request's worst case at admission, exactly as the in-memory budget does, so N keygates
//! under any load never book past the limit; the only overshoot left is usage beyond what a
//! request booked (a provider that ignores `max_tokens`), settled when the answer ends.

use std::sync::Arc;
use std::time::Duration;

use super::RetryAfter;
use crate::config::{AgentId, Config, FailMode, StateBackend};
use crate::error::{Code, Rejection};
use crate::state::{Booking, StateStore};

/// How often, and how far apart, a settlement is retried while the store is unreachable.
const SETTLE_TRIES: u32 = 30;
const SETTLE_GAP: Duration = Duration::from_secs(1);

/// The shared store and each agent's limits.
pub(super) struct Shared {
    store: Arc<dyn StateStore>,
    rate_fail_open: bool,
    /// Per agent: bucket capacity and refill per second.
    rates: Vec<Option<(u64, f64)>>,
    /// Per agent: limit and period.
    budgets: Vec<Option<(u64, Duration)>>,
    names: Vec<String>,
}

impl Shared {
    pub(super) fn new(store: Arc<dyn StateStore>, config: &Config) -> Shared {
        let rate_fail_open = matches!(
            &config.state,
            StateBackend::Redis(r) if r.rate_limits == FailMode::FailOpen
        );
        Shared {
            store,
            rate_fail_open,
            rates: config
                .agents
                .iter()
                .map(|a| {
                    a.rate.as_ref().map(|r| {
                        (
                            u64::from(r.count),
                            f64::from(r.count) / r.per.as_secs_f64().max(f64::MIN_POSITIVE),
                        )
                    })
                })
                .collect(),
            budgets: config
                .agents
                .iter()
                .map(|a| a.budget.as_ref().map(|b| (b.limit, b.per)))
                .collect(),
            names: config.agents.iter().map(|a| a.name.clone()).collect(),
        }
    }

    pub(super) fn budgeted(&self, agent: AgentId) -> bool {
        matches!(self.budgets.get(agent.0), Some(Some(_)))
    }

    pub(super) async fn rate(
        &self,
        config: &Config,
        agent: AgentId,
    ) -> Result<Option<&'static str>, Rejection> {
        let Some(Some((capacity, per_sec))) = self.rates.get(agent.0) else {
            return Ok(None);
        };
        let name = &config.agents[agent].name;
        match self.store.take_rate(name, *capacity, *per_sec).await {
            Ok(None) => Ok(None),
            Ok(Some(wait)) => Err(Rejection::new(
                Code::RateLimited,
                format!("agent {name} is over its rate limit"),
            )
            .with_retry_after(RetryAfter(wait).secs())),
            Err(e) if self.rate_fail_open => {
                tracing::warn!(agent = %name, error = %e, "state store unreachable; rate limit not applied (rate_limits = \"fail-open\")");
                Ok(Some("rate_fail_open"))
            }
            Err(e) => Err(unavailable(&e)),
        }
    }

    pub(super) async fn reserve(
        &self,
        config: &Config,
        agent: AgentId,
        tokens: u64,
    ) -> Result<Option<super::Reservation>, Rejection> {
        let Some(Some((limit, per))) = self.budgets.get(agent.0) else {
            return Ok(None);
        };
        let name = &config.agents[agent].name;
        // The booking runs in a task of its own: if this request goes away while the store
        // answers, a booking made for it is released rather than held until a restart.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let decision = self.store.reserve_budget(name, *per, *limit, tokens);
        let (store, agent_name, period) = (self.store.clone(), name.clone(), *per);
        tokio::spawn(async move {
            let out = decision.await;
            if let Err(Ok(Booking::Booked)) = tx.send(out) {
                let _ = store.settle_budget(&agent_name, period, tokens, 0).await;
            }
        });
        let decided = rx.await.unwrap_or_else(|_| {
            Err(crate::state::StateError::Store {
                path: "(shared store)".into(),
                message: "the budget decision was lost".into(),
            })
        });
        match decided {
            Ok(Booking::Booked) => Ok(Some(super::Reservation::shared(
                Booked {
                    store: self.store.clone(),
                    agent: name.clone(),
                    per: *per,
                },
                tokens,
            ))),
            Ok(Booking::Refused(wait)) => Err(super::over_budget(
                config,
                agent,
                tokens,
                *limit,
                RetryAfter(wait),
            )),
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// (charged, limit) of each budgeted agent, read from the store; an agent whose spending
    /// cannot be read shows none.
    pub(super) fn usage(&self) -> Vec<Option<(u64, u64)>> {
        let reachable = self.store.health().connected;
        self.budgets
            .iter()
            .zip(&self.names)
            .map(|(b, name)| {
                let (limit, _) = (*b).filter(|_| reachable)?;
                self.store.budget_usage(name).ok().map(|c| (c, limit))
            })
            .collect()
    }
}

fn unavailable(e: &crate::state::StateError) -> Rejection {
    tracing::error!(error = %e, "state store decision failed");
    Rejection::new(
        Code::StateUnavailable,
        "keygate cannot reach its shared state store to decide this request's budget or rate; retry shortly",
    )
}

/// A booking in the shared store, settled when the answer ends.
pub(crate) struct Booked {
    store: Arc<dyn StateStore>,
    agent: String,
    per: Duration,
}

impl Booked {
    /// Replaces the booking by `used` tokens. Retried for a while if the store is unreachable:
    /// a booking never settled would hold the budget until this keygate restarts.
    pub(super) fn settle(&self, booked: u64, used: u64) {
        let (store, agent, per) = (self.store.clone(), self.agent.clone(), self.per);
        let retry = async move {
            for _ in 0..SETTLE_TRIES {
                match store.settle_budget(&agent, per, booked, used).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(agent = %agent, error = %e, "cannot settle a budget booking yet; retrying");
                        tokio::time::sleep(SETTLE_GAP).await;
                    }
                }
            }
            tracing::error!(agent = %agent, booked, used, "gave up settling a budget booking; it is released when this keygate restarts");
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(retry);
            }
            Err(_) => {
                // No runtime (a test or shutdown): one attempt, already under way on the
                // store's own runtime once called.
                drop(
                    self.store
                        .settle_budget(&self.agent, self.per, booked, used),
                );
            }
        }
    }
}
