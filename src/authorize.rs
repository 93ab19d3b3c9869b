//! Stage `authorize`: what this agent may do on this route.
//!
//! Input: an authenticated agent, a routed request. Output: an [`Authorized`] value, or a refusal.
//! Checks, in order: the agent may use the route; a `METHOD /path` rule allows the request; the
//! agent is within its rate; within its token budget; a person approved it where policy says so.
//!
//! Architecture invariant: [`Authorized`] can be constructed only in this module, and `forward`
//! takes one by value, so no request reaches an upstream without passing every check here.
//!
//! The token budget is checked twice: here, cheaply, whether anything is left at all; and once
//! the body is known, by [`Policy::reserve`], which books what the request may cost
//! ([`budget`], [`usage`]).

pub mod approval;
mod budget;
mod person;
pub mod rule;
mod shared;
pub mod usage;

pub use rule::{Rate, Rule};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;

use crate::config::{Agent, AgentId, Config, Format, Route, RouteId};
use crate::error::{Code, Rejection};
use crate::route::Routed;

/// A request that passed every policy check. Only [`Policy::authorize`] makes one: its fields
/// are private, so no other code can forge one.
///
/// ```compile_fail,E0451
/// let forged = keygate::authorize::Authorized {
///     route: 0,
///     agent: 0,
///     raw_path: String::from("/v1/anything"),
///     _private: (),
/// };
/// ```
#[derive(Debug)]
pub struct Authorized {
    route: RouteId,
    agent: AgentId,
    raw_path: String,
    _private: (),
}

impl Authorized {
    /// The matched route, for indexing `config.routes`.
    pub fn route(&self) -> RouteId {
        self.route
    }
    /// The authenticated agent, for indexing `config.agents`.
    pub fn agent(&self) -> AgentId {
        self.agent
    }
    /// A request authorized by fiat, for tests of the stages after `authorize`.
    #[cfg(test)]
    pub(crate) fn for_test(route: usize, agent: usize) -> Authorized {
        Authorized {
            route: RouteId(route),
            agent: AgentId(agent),
            raw_path: "/".into(),
            _private: (),
        }
    }

    /// The raw route-relative path to append to the upstream's base path.
    pub fn raw_path(&self) -> &str {
        &self.raw_path
    }
}

pub use budget::{Reservation, RetryAfter, TokenBudget};

/// Per-agent counters. Agents are fixed at start-up, so each has its own slot and requests from
/// different agents never contend.
pub struct Policy {
    buckets: Vec<Option<Mutex<Bucket>>>,
    budgets: Vec<Option<Arc<TokenBudget>>>,
    /// With a shared store, rates and budgets are decided in it instead ([`shared`]).
    shared: Option<shared::Shared>,
    /// Per-person limits of agents that act for many people (`rate_per_person`, ...); kept in
    /// memory, also with a shared store.
    people: Vec<Option<Arc<person::PerPerson>>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    capacity: f64,
    per_sec: f64,
}

impl Bucket {
    fn full(r: &Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: r.count as f64,
            last: now,
            capacity: r.count as f64,
            per_sec: r.count as f64 / r.per.as_secs_f64(),
        }
    }
}

/// The person per-person limits count against when no front end named one.
const NO_PERSON: &str = "(unnamed)";

impl Policy {
    /// A rate bucket and a token budget for each agent that configures one, each starting full.
    pub fn new(config: &Config) -> Policy {
        let now = Instant::now();
        Policy {
            buckets: config
                .agents
                .iter()
                .map(|a| {
                    a.rate.as_ref().map(|r| {
                        Mutex::new(Bucket {
                            tokens: r.count as f64,
                            last: now,
                            capacity: r.count as f64,
                            per_sec: r.count as f64 / r.per.as_secs_f64(),
                        })
                    })
                })
                .collect(),
            budgets: config
                .agents
                .iter()
                .map(|a| a.budget.as_ref().map(|b| TokenBudget::new(b.limit, b.per)))
                .collect(),
            shared: None,
            people: config.agents.iter().map(person::PerPerson::of).collect(),
        }
    }

    /// Decides rates and budgets in `store` when several keygates share it; the in-memory
    /// counters are then not used.
    pub fn shared(
        mut self,
        store: Option<&Arc<dyn crate::state::StateStore>>,
        config: &Config,
    ) -> Policy {
        if let Some(s) = store.filter(|s| s.shared()) {
            self.buckets.iter_mut().for_each(|b| *b = None);
            self.budgets.iter_mut().for_each(|b| *b = None);
            self.shared = Some(shared::Shared::new(s.clone(), config));
        }
        self
    }

    /// The rate check made in a shared store (nothing without one): refuses with 429
    /// `rate_limited`, or 503 `state_unavailable` when the store cannot be reached, unless
    /// rate limits fail open; then says so for the audit record (`rate_fail_open`).
    pub async fn shared_rate(
        &self,
        config: &Config,
        agent: AgentId,
    ) -> Result<Option<&'static str>, Rejection> {
        match &self.shared {
            Some(s) => s.rate(config, agent).await,
            None => Ok(None),
        }
    }

    /// Checks the agent may use the route, the method and path, its rate and token budget; the
    /// proof it returns is what the credential stage requires.
    pub fn authorize(
        &self,
        config: &Config,
        agent: AgentId,
        method: &Method,
        routed: Routed,
    ) -> Result<Authorized, Rejection> {
        self.authorize_for(config, agent, None, method, routed)
    }

    /// [`Policy::authorize`] for a request a front end made for `person`, who is also held to
    /// the agent's per-person limits.
    pub fn authorize_for(
        &self,
        config: &Config,
        agent: AgentId,
        person: Option<&str>,
        method: &Method,
        routed: Routed,
    ) -> Result<Authorized, Rejection> {
        let a: &Agent = &config.agents[agent];
        let r: &Route = &config.routes[routed.route];
        if let Some(allowed) = &a.routes {
            if !allowed.contains(&routed.route) {
                return Err(Rejection::new(
                    Code::RouteNotAllowed,
                    format!("agent {} may not use route {}", a.name, r.name),
                ));
            }
        }
        // The lab broker answered only POST (and GET /healthz); its configs keep that 403.
        let lab_post_only = config.format == Format::Seed && method != Method::POST;
        if lab_post_only
            || !r
                .allow
                .iter()
                .any(|rule| rule.matches(method, &routed.path, routed.query.as_deref()))
        {
            return Err(Rejection::new(
                Code::PathNotAllowed,
                format!(
                    "{method} {} is not allowed on route {}",
                    routed.path, r.name
                ),
            ));
        }
        if let Some(Some(bucket)) = self.buckets.get(agent.0) {
            if let Err(wait) = take(bucket) {
                return Err(Rejection::new(
                    Code::RateLimited,
                    format!("agent {} is over its rate limit", a.name),
                )
                .with_retry_after(RetryAfter(wait).secs()));
            }
        }
        if let Some(Some(b)) = self.budgets.get(agent.0) {
            if let Err(wait) = b.spent() {
                return Err(Rejection::new(
                    Code::BudgetExhausted,
                    format!(
                        "agent {} has used its token budget of {} for this period",
                        a.name,
                        b.limit()
                    ),
                )
                .with_retry_after(wait.secs()));
            }
        }
        if let Some(Some(people)) = self.people.get(agent.0) {
            people.admit(&a.name, person.unwrap_or(NO_PERSON))?;
        }
        // Approval (`r.approval`) is the last check, made by `approval::Approvals::gate` once the
        // request is known well enough to show a person; it waits, so it cannot be made here.
        Ok(Authorized {
            route: routed.route,
            agent,
            raw_path: routed.raw_path,
            _private: (),
        })
    }

    /// Whether the agent (or its people) has a token budget, so its requests are reserved for
    /// and metered.
    pub fn budgeted(&self, agent: AgentId) -> bool {
        matches!(self.budgets.get(agent.0), Some(Some(_)))
            || self.shared.as_ref().is_some_and(|s| s.budgeted(agent))
            || matches!(self.people.get(agent.0), Some(Some(p)) if p.has_budget())
    }

    /// Output tokens to book for a request whose body names no maximum: the route's
    /// `budget_reserve` (it knows its API), else the agent's, else [`usage::DEFAULT_RESERVE`].
    pub fn default_reserve(config: &Config, agent: AgentId, route: RouteId) -> u64 {
        config.routes[route]
            .budget_reserve
            .or(config.agents[agent].budget_reserve)
            .unwrap_or(usage::DEFAULT_RESERVE)
    }

    /// Books `tokens` against the agent's budget (check and charge in one step), or refuses
    /// with 429 `budget_exhausted` and the time until the period resets. `None` for an agent
    /// without a budget.
    pub async fn reserve(
        &self,
        config: &Config,
        agent: AgentId,
        tokens: u64,
    ) -> Result<Option<Reservation>, Rejection> {
        self.reserve_for(config, agent, None, tokens).await
    }

    /// [`Policy::reserve`], booking against `person`'s budget too where the agent has
    /// per-person budgets. The person's share is booked first: if the agent's budget then
    /// refuses, the person's booking is released uncharged.
    pub async fn reserve_for(
        &self,
        config: &Config,
        agent: AgentId,
        person: Option<&str>,
        tokens: u64,
    ) -> Result<Option<Reservation>, Rejection> {
        let personal = self.reserve_person(config, agent, person, tokens)?;
        let agents = self.reserve_agent(config, agent, tokens).await;
        match (agents, personal) {
            (Ok(Some(r)), Some(p)) => Ok(Some(r.and(p))),
            (Ok(None), p) => Ok(p),
            (Ok(r), None) => Ok(r),
            (Err(e), p) => {
                if let Some(p) = p {
                    p.settle(0);
                }
                Err(e)
            }
        }
    }

    fn reserve_person(
        &self,
        config: &Config,
        agent: AgentId,
        person: Option<&str>,
        tokens: u64,
    ) -> Result<Option<Reservation>, Rejection> {
        let Some(Some(people)) = self.people.get(agent.0) else {
            return Ok(None);
        };
        let name = &config.agents[agent].name;
        let who = person.unwrap_or(NO_PERSON);
        let Some(b) = people.budget_of(name, who)? else {
            return Ok(None);
        };
        b.try_reserve(tokens).map(Some).map_err(|wait| {
            Rejection::new(
                Code::BudgetExhausted,
                format!(
                    "this request may use up to {tokens} tokens, more than is left of {who}'s budget of {} for this period (agent {name})",
                    b.limit()
                ),
            )
            .with_retry_after(wait.secs())
        })
    }

    async fn reserve_agent(
        &self,
        config: &Config,
        agent: AgentId,
        tokens: u64,
    ) -> Result<Option<Reservation>, Rejection> {
        if let Some(s) = &self.shared {
            return s.reserve(config, agent, tokens).await;
        }
        let Some(Some(b)) = self.budgets.get(agent.0) else {
            return Ok(None);
        };
        match b.try_reserve(tokens) {
            Ok(r) => Ok(Some(r)),
            Err(wait) => Err(over_budget(config, agent, tokens, b.limit(), wait)),
        }
    }
}

/// The 429 `budget_exhausted` refusal: the request alone is larger than the budget, or it does
/// not fit in what is left of the period.
fn over_budget(
    config: &Config,
    agent: AgentId,
    tokens: u64,
    limit: u64,
    wait: RetryAfter,
) -> Rejection {
    let name = &config.agents[agent].name;
    let message = if tokens > limit {
        format!("this request may use up to {tokens} tokens, more than agent {name}'s whole budget of {limit} per period; lower max_tokens")
    } else {
        format!("this request may use up to {tokens} tokens, more than is left of agent {name}'s budget of {limit} for this period (requests in flight count until they finish)")
    };
    Rejection::new(Code::BudgetExhausted, message).with_retry_after(wait.secs())
}

impl Policy {
    /// Each budgeted agent's settled spending in its current window, to persist (write-behind).
    pub fn budget_spent(&self, config: &Config) -> Vec<crate::state::Spent> {
        let now = crate::state::now();
        self.budgets
            .iter()
            .zip(&config.agents)
            .filter_map(|(b, a)| {
                let (age, charged) = b.as_ref()?.snapshot();
                Some(crate::state::Spent {
                    agent: a.name.clone(),
                    window_start: now.saturating_sub(age.as_secs()),
                    tokens: charged,
                })
            })
            .collect()
    }

    /// Takes over spending saved before a restart, where its window still runs.
    pub fn restore_budgets(&mut self, config: &Config, spent: &[crate::state::Spent]) {
        let now = crate::state::now();
        for (slot, a) in self.budgets.iter_mut().zip(&config.agents) {
            let (Some(_), Some(b)) = (slot.as_ref(), &a.budget) else {
                continue;
            };
            let Some(s) = spent.iter().find(|s| s.agent == a.name) else {
                continue;
            };
            let age = Duration::from_secs(now.saturating_sub(s.window_start));
            if age < b.per {
                *slot = Some(TokenBudget::resumed(b.limit, b.per, age, s.tokens));
            }
        }
    }

    /// Carries budgets over a reload: an agent whose budget is unchanged keeps the very same
    /// counter (requests still in flight on the old policy settle into it); one whose limit or
    /// period changed starts from what it had spent in the current window.
    pub fn carry_budgets(&mut self, config: &Config, old: &Policy, old_config: &Config) {
        for (slot, a) in self.people.iter_mut().zip(&config.agents) {
            let Some(i) = old_config.agents.iter().position(|o| o.name == a.name) else {
                continue;
            };
            if let Some(Some(prev)) = old.people.get(i) {
                if prev.same_limits(a) {
                    *slot = Some(prev.clone());
                }
            }
        }
        for (slot, a) in self.budgets.iter_mut().zip(&config.agents) {
            let Some(b) = &a.budget else { continue };
            let Some(i) = old_config.agents.iter().position(|o| o.name == a.name) else {
                continue;
            };
            let (Some(Some(prev)), Some(prev_cfg)) =
                (old.budgets.get(i), old_config.agents[i].budget.as_ref())
            else {
                continue;
            };
            *slot = Some(if prev_cfg == b {
                prev.clone()
            } else {
                let (age, charged) = prev.snapshot();
                TokenBudget::resumed(b.limit, b.per, age.min(b.per), charged)
            });
        }
    }

    /// (spent, limit) of each budgeted agent, for status and metrics.
    pub fn budget_usage(&self) -> Vec<Option<(u64, u64)>> {
        if let Some(s) = &self.shared {
            return s.usage();
        }
        self.budgets
            .iter()
            .map(|b| b.as_ref().map(|b| (b.snapshot().1, b.limit())))
            .collect()
    }
}

/// Takes one request from the bucket, or says how long until one is there.
fn take(bucket: &Mutex<Bucket>) -> Result<(), Duration> {
    let mut b = match bucket.lock() {
        Ok(b) => b,
        Err(poisoned) => poisoned.into_inner(),
    };
    take_now(&mut b, Instant::now())
}

fn take_now(b: &mut Bucket, now: Instant) -> Result<(), Duration> {
    let elapsed = now.duration_since(b.last).as_secs_f64();
    b.last = now;
    b.tokens = (b.tokens + elapsed * b.per_sec).min(b.capacity);
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        Ok(())
    } else {
        Err(Duration::from_secs_f64(
            ((1.0 - b.tokens) / b.per_sec).clamp(0.0, 86_400.0),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refuses_when_empty() {
        let b = Mutex::new(Bucket {
            tokens: 2.0,
            last: Instant::now(),
            capacity: 2.0,
            per_sec: 0.0001,
        });
        assert!(take(&b).is_ok() && take(&b).is_ok());
        assert!(take(&b).is_err());
    }

    #[test]
    fn an_empty_bucket_says_when_the_next_request_is_allowed() {
        let b = Mutex::new(Bucket {
            tokens: 0.0,
            last: Instant::now(),
            capacity: 1.0,
            per_sec: 1.0 / 60.0,
        });
        let wait = take(&b).unwrap_err();
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60));
        assert_eq!(RetryAfter(Duration::from_secs(60)).secs(), 60);
    }
}
