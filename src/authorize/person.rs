//! Per-person limits (`rate_per_person`, `budget_tokens_per_person`): one agent may be a shared
//! backend's front end acting for many people, and one of them must not spend everyone's rate or
//! budget. Each person gets their own bucket and budget, made at their first request.
//!
//! The table is bounded ([`MAX_PEOPLE`] per agent): people idle for longer than every period are
//! forgotten (their limits would be full again anyway), and when it is full of active people a
//! new one is refused rather than let through unlimited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::budget::{RetryAfter, TokenBudget};
use super::{take_now, Bucket};
use crate::authorize::Rate;
use crate::config::{Agent, Budget};
use crate::error::{Code, Rejection};

/// People tracked per agent at most.
const MAX_PEOPLE: usize = 10_000;

/// One agent's per-person limits and the people seen.
pub(super) struct PerPerson {
    rate: Option<Rate>,
    budget: Option<Budget>,
    people: Mutex<HashMap<String, Person>>,
}

struct Person {
    bucket: Option<Bucket>,
    budget: Option<Arc<TokenBudget>>,
    last: Instant,
}

impl PerPerson {
    /// The agent's per-person limits, if it has any.
    pub(super) fn of(agent: &Agent) -> Option<Arc<PerPerson>> {
        if agent.rate_per_person.is_none() && agent.budget_per_person.is_none() {
            return None;
        }
        Some(Arc::new(PerPerson {
            rate: agent.rate_per_person.clone(),
            budget: agent.budget_per_person.clone(),
            people: Mutex::new(HashMap::new()),
        }))
    }

    /// Whether the limits are the ones `agent` configures (a reload keeps the same table).
    pub(super) fn same_limits(&self, agent: &Agent) -> bool {
        self.rate == agent.rate_per_person && self.budget == agent.budget_per_person
    }

    pub(super) fn has_budget(&self) -> bool {
        self.budget.is_some()
    }

    /// Takes one request from the person's rate and checks their budget is not spent; the
    /// person's budget, for [`super::Policy::reserve`].
    pub(super) fn admit(&self, agent: &str, person: &str) -> Result<(), Rejection> {
        let mut people = self.people.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let p = self.entry(&mut people, agent, person, now)?;
        p.last = now;
        if let Some(b) = &mut p.bucket {
            if let Err(wait) = take_now(b, now) {
                return Err(Rejection::new(
                    Code::RateLimited,
                    format!("{person} is over the per-person rate limit of agent {agent}"),
                )
                .with_retry_after(RetryAfter(wait).secs()));
            }
        }
        if let Some(b) = &p.budget {
            if let Err(wait) = b.spent() {
                return Err(Rejection::new(
                    Code::BudgetExhausted,
                    format!(
                        "{person} has used their token budget of {} for this period (agent {agent})",
                        b.limit()
                    ),
                )
                .with_retry_after(wait.secs()));
            }
        }
        Ok(())
    }

    /// The person's token budget, made at their first request.
    pub(super) fn budget_of(
        &self,
        agent: &str,
        person: &str,
    ) -> Result<Option<Arc<TokenBudget>>, Rejection> {
        let mut people = self.people.lock().unwrap_or_else(|p| p.into_inner());
        let p = self.entry(&mut people, agent, person, Instant::now())?;
        Ok(p.budget.clone())
    }

    fn entry<'a>(
        &self,
        people: &'a mut HashMap<String, Person>,
        agent: &str,
        person: &str,
        now: Instant,
    ) -> Result<&'a mut Person, Rejection> {
        if !people.contains_key(person) && people.len() >= MAX_PEOPLE {
            let longest = self.longest_period();
            people.retain(|_, p| {
                now.saturating_duration_since(p.last) <= longest
                    || p.budget.as_ref().is_some_and(|b| Arc::strong_count(b) > 1)
            });
            if people.len() >= MAX_PEOPLE {
                return Err(Rejection::new(
                    Code::RateLimited,
                    format!("agent {agent} has {MAX_PEOPLE} people within their limits' periods; retry later"),
                )
                .with_retry_after(60));
            }
        }
        Ok(people.entry(person.to_string()).or_insert_with(|| Person {
            bucket: self.rate.as_ref().map(|r| Bucket::full(r, now)),
            budget: self
                .budget
                .as_ref()
                .map(|b| TokenBudget::new(b.limit, b.per)),
            last: now,
        }))
    }

    fn longest_period(&self) -> Duration {
        let rate = self.rate.as_ref().map_or(Duration::ZERO, |r| r.per);
        let budget = self.budget.as_ref().map_or(Duration::ZERO, |b| b.per);
        rate.max(budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn agent(extra: &str) -> Agent {
        let text = format!("[agents.front]\nperson_header = \"X-User-Id\"\n{extra}");
        let mut c = crate::config::Config::from_text(Path::new("p.toml"), &text).unwrap();
        c.agents.remove(0)
    }

    #[test]
    fn one_person_over_their_rate_leaves_another_untouched() {
        let p = PerPerson::of(&agent("rate_per_person = \"2/hour\"\n")).unwrap();
        assert!(p.admit("front", "alice").is_ok() && p.admit("front", "alice").is_ok());
        let e = p.admit("front", "alice").unwrap_err();
        assert_eq!(e.code, Code::RateLimited);
        assert!(p.admit("front", "bob").is_ok());
    }

    #[test]
    fn one_person_spending_their_budget_leaves_another_theirs() {
        let p = PerPerson::of(&agent(
            "budget_tokens_per_person = { per = \"hour\", limit = 100 }\n",
        ))
        .unwrap();
        let b = p.budget_of("front", "alice").unwrap().unwrap();
        b.try_reserve(100).unwrap().settle(100);
        assert_eq!(
            p.admit("front", "alice").unwrap_err().code,
            Code::BudgetExhausted
        );
        assert!(p.admit("front", "bob").is_ok());
    }
}
