//! Stage `authorize`: what this agent may do on this route.
//!
//! Input: an authenticated agent, a routed request. Output: an [`Authorized`] value, or a refusal.
//! Checks, in order: the agent may use the route; a `METHOD /path` rule allows the request; the
//! agent is within its rate; within its token budget; a person approved it where policy says so.
//!
//! Architecture invariant: [`Authorized`] can be constructed only in this module, and `forward`
//! takes one by value, so no request reaches an upstream without passing every check here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{Agent, AgentId, Approval, Config, Format, Route, RouteId};
use crate::error::{Code, Rejection};
use crate::route::Routed;
use http::Method;

pub mod rule;
pub mod usage;

pub use rule::{Rate, Rule};

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
    pub fn route(&self) -> RouteId {
        self.route
    }
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

/// Per-agent counters. Agents are fixed at start-up, so each has its own slot and requests from
/// different agents never contend.
pub struct Policy {
    buckets: Vec<Option<Mutex<Bucket>>>,
    budgets: Vec<Option<BudgetWindow>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    capacity: f64,
    per_sec: f64,
}

struct BudgetWindow {
    limit: u64,
    per: Duration,
    used: AtomicU64,
    window_start: Mutex<Instant>,
}

impl Policy {
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
                .map(|a| {
                    a.budget.as_ref().map(|b| BudgetWindow {
                        limit: b.limit,
                        per: b.per,
                        used: AtomicU64::new(0),
                        window_start: Mutex::new(now),
                    })
                })
                .collect(),
        }
    }

    pub fn authorize(
        &self,
        config: &Config,
        agent: AgentId,
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
                .any(|rule| rule.matches(method, &routed.path))
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
            if !take(bucket) {
                return Err(Rejection::new(
                    Code::RateLimited,
                    format!("agent {} is over its rate limit", a.name),
                ));
            }
        }
        if let Some(Some(b)) = self.budgets.get(agent.0) {
            b.roll();
            if b.used.load(Ordering::Relaxed) >= b.limit {
                return Err(Rejection::new(
                    Code::BudgetExhausted,
                    format!(
                        "agent {} has used its token budget of {} for this period",
                        a.name, b.limit
                    ),
                ));
            }
        }
        if let Approval::Each { .. } = r.approval {
            // Approvals are answered over the admin socket; until this build has one, a route that
            // needs a person's approval is refused rather than silently allowed.
            return Err(Rejection::new(
                Code::ApprovalUnavailable,
                format!(
                    "route {} needs a person's approval, and this keygate has no approval channel",
                    r.name
                ),
            ));
        }
        Ok(Authorized {
            route: routed.route,
            agent,
            raw_path: routed.raw_path,
            _private: (),
        })
    }

    /// Counts tokens an upstream reported as used, against the agent's budget.
    pub fn record_tokens(&self, agent: AgentId, tokens: u64) {
        if let Some(Some(b)) = self.budgets.get(agent.0) {
            b.roll();
            b.used.fetch_add(tokens, Ordering::Relaxed);
        }
    }
}

fn take(bucket: &Mutex<Bucket>) -> bool {
    let mut b = match bucket.lock() {
        Ok(b) => b,
        Err(poisoned) => poisoned.into_inner(),
    };
    let now = Instant::now();
    let elapsed = now.duration_since(b.last).as_secs_f64();
    b.last = now;
    b.tokens = (b.tokens + elapsed * b.per_sec).min(b.capacity);
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        true
    } else {
        false
    }
}

impl BudgetWindow {
    fn roll(&self) {
        let mut start = match self.window_start.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if start.elapsed() >= self.per {
            *start = Instant::now();
            self.used.store(0, Ordering::Relaxed);
        }
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
        assert!(take(&b) && take(&b));
        assert!(!take(&b));
    }
}
