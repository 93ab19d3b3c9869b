//! Token budgets: reserve at admission, settle on the usage the upstream reports.
//!
//! A budget that only counted usage after the fact let every concurrent request through while the
//! first ones were still generating. Here the admission decision and the charge are one step under
//! one short mutex: [`TokenBudget::try_reserve`] either books the request's worst case against
//! the period or refuses, and [`Reservation::settle`] later replaces that worst case by what was
//! actually used. A reservation that is dropped unsettled (the client went away before the usage
//! event, the stream broke) is charged in full, so no way of ending a request is cheaper than
//! finishing it.
//!
//! Everything is in memory and O(1) per request. Across restarts the settled counter is saved
//! behind (once a second, by `serve`, through the `StateStore`) and [`TokenBudget::resumed`]
//! takes it up again in the window it belongs to.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One agent's budget: at most `limit` tokens per fixed period of `per`, periods counted from
/// start-up.
#[derive(Debug)]
pub struct TokenBudget {
    limit: u64,
    per: Duration,
    origin: Instant,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// Which period `charged` belongs to (periods since `origin`).
    period: u64,
    /// When `period` ends (`origin + (period + 1) * per`; `None` past the clock's range): before
    /// it, the period is known without dividing the time since `origin` (a `u128` division).
    ends: Option<Instant>,
    /// Tokens settled in this period.
    charged: u64,
    /// Tokens booked by requests still in flight. They outlive a period change: a request
    /// admitted just before the reset still runs, and its tokens land in the period it settles in.
    reserved: u64,
}

/// How long until the budget's period resets; a refusal's `Retry-After`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds, rounded up and at least 1, as `Retry-After` wants them.
    pub fn secs(self) -> u64 {
        let d = self.0;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

impl TokenBudget {
    /// A budget of `limit` tokens per `per`, the first period starting now.
    pub fn new(limit: u64, per: Duration) -> Arc<TokenBudget> {
        Self::starting_at(limit, per, Instant::now())
    }

    fn starting_at(limit: u64, per: Duration, origin: Instant) -> Arc<TokenBudget> {
        Arc::new(TokenBudget {
            limit,
            // Config refuses a zero period; a zero here would divide by zero below.
            per: per.max(Duration::from_millis(1)),
            origin,
            state: Mutex::new(Window {
                period: 0,
                ends: origin.checked_add(per.max(Duration::from_millis(1))),
                charged: 0,
                reserved: 0,
            }),
        })
    }

    /// Tokens allowed per period.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// A budget that continues a window already `age` old with `charged` tokens settled (after a
    /// restart, from the state store).
    pub fn resumed(limit: u64, per: Duration, age: Duration, charged: u64) -> Arc<TokenBudget> {
        let now = Instant::now();
        let b = Self::starting_at(limit, per, now.checked_sub(age).unwrap_or(now));
        b.state.lock().unwrap_or_else(|p| p.into_inner()).charged = charged;
        b
    }

    /// How old the current window is, and the tokens settled in it.
    pub fn snapshot(&self) -> (Duration, u64) {
        let now = Instant::now();
        let charged = self.window(now).charged;
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        let age = elapsed % self.per.as_nanos();
        (
            Duration::from_nanos(u64::try_from(age).unwrap_or(u64::MAX)),
            charged,
        )
    }

    /// Books `n` tokens if they fit in what is left of this period (settled plus in flight),
    /// atomically: of many concurrent callers competing for the last tokens, only as many are
    /// admitted as fit. Nothing is left once the period is spent, so even `n = 0` is refused then.
    pub fn try_reserve(self: &Arc<Self>, n: u64) -> Result<Reservation, RetryAfter> {
        self.try_reserve_at(n, Instant::now())
    }

    fn try_reserve_at(self: &Arc<Self>, n: u64, now: Instant) -> Result<Reservation, RetryAfter> {
        let mut w = self.window(now);
        let committed = w.charged.saturating_add(w.reserved);
        if committed >= self.limit || committed.saturating_add(n) > self.limit {
            drop(w);
            return Err(self.retry_after(now));
        }
        w.reserved += n;
        Ok(Reservation {
            budget: Target::Local(self.clone()),
            amount: n,
            settled: false,
            also: None,
        })
    }

    /// Whether nothing at all is left in this period: the cheap check made before a request's
    /// body is read.
    pub fn spent(&self) -> Result<(), RetryAfter> {
        let now = Instant::now();
        let w = self.window(now);
        if w.charged.saturating_add(w.reserved) >= self.limit {
            drop(w);
            return Err(self.retry_after(now));
        }
        Ok(())
    }

    /// Time until the current period ends.
    pub fn retry_after(&self, now: Instant) -> RetryAfter {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        let per = self.per.as_nanos();
        let left = per - elapsed % per;
        RetryAfter(Duration::from_nanos(
            u64::try_from(left).unwrap_or(u64::MAX),
        ))
    }

    /// The window, rolled over to the current period first.
    fn window(&self, now: Instant) -> MutexGuard<'_, Window> {
        // Nothing under this lock can panic, so a poisoned lock still holds consistent numbers.
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Periods only grow: before `ends` the one computed would be `w.period` or an earlier
        // one (a caller's `now` read before another's), which changes nothing either way.
        if w.ends.is_some_and(|ends| now < ends) {
            return w;
        }
        let period = self.period_at(now);
        if period > w.period {
            w.period = period;
            w.ends = u32::try_from(period.saturating_add(1))
                .ok()
                .and_then(|n| self.per.checked_mul(n))
                .and_then(|d| self.origin.checked_add(d));
            w.charged = 0;
        }
        w
    }

    /// Which period `now` falls in (periods since `origin`).
    fn period_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed / self.per.as_nanos()).unwrap_or(u64::MAX)
    }

    fn finish(&self, reserved: u64, charge: u64) {
        let mut w = self.window(Instant::now());
        w.reserved = w.reserved.saturating_sub(reserved);
        w.charged = w.charged.saturating_add(charge);
    }

    #[cfg(test)]
    fn committed(&self) -> (u64, u64) {
        let w = self.window(Instant::now());
        (w.charged, w.reserved)
    }
}

/// Tokens booked for one request. [`settle`](Reservation::settle) it with what the upstream
/// reported; dropping it unsettled charges all of it.
pub struct Reservation {
    budget: Target,
    amount: u64,
    settled: bool,
    /// A second budget the same request is booked against (the person's, beside the agent's);
    /// settled with this one.
    also: Option<Box<Reservation>>,
}

/// Where a reservation was booked.
enum Target {
    /// This keygate's in-memory budget.
    Local(Arc<TokenBudget>),
    /// A shared store's budget (several keygates).
    Shared(super::shared::Booked),
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("amount", &self.amount)
            .field("shared", &matches!(self.budget, Target::Shared(_)))
            .finish()
    }
}

impl Reservation {
    /// A booking of `amount` tokens made in a shared store.
    pub(super) fn shared(booked: super::shared::Booked, amount: u64) -> Reservation {
        Reservation {
            budget: Target::Shared(booked),
            amount,
            settled: false,
            also: None,
        }
    }

    fn finish(&self, charge: u64) {
        match &self.budget {
            Target::Local(b) => b.finish(self.amount, charge),
            Target::Shared(b) => b.settle(self.amount, charge),
        }
    }

    /// Tokens booked, before settling.
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// Replaces the booking by the tokens actually used: the difference is refunded, or, when the
    /// upstream used more than was booked, charged on top.
    pub fn settle(mut self, actual: u64) {
        self.settled = true;
        self.finish(actual);
        if let Some(also) = self.also.take() {
            also.settle(actual);
        }
    }

    /// This booking and `other`, settled (or dropped) together.
    pub fn and(mut self, other: Reservation) -> Reservation {
        self.also = Some(Box::new(other));
        self
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.finish(self.amount);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_budget_continues_its_window() {
        let b = TokenBudget::resumed(100, Duration::from_secs(3600), Duration::from_secs(600), 90);
        let (age, charged) = b.snapshot();
        assert_eq!(charged, 90);
        assert!(age >= Duration::from_secs(600) && age < Duration::from_secs(700));
        assert!(b.try_reserve(20).is_err());
        assert!(b.try_reserve(10).is_ok());
    }

    #[test]
    fn only_as_many_reservations_as_fit_are_admitted() {
        let b = TokenBudget::new(250, Duration::from_secs(3600));
        let held: Vec<_> = (0..8).filter_map(|_| b.try_reserve(100).ok()).collect();
        assert_eq!(held.len(), 2);
        assert_eq!(b.committed(), (0, 200));
    }

    #[test]
    fn concurrent_reservations_never_overbook() {
        let b = TokenBudget::new(100, Duration::from_secs(3600));
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| b.try_reserve(100).map(std::mem::forget).is_ok()))
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap()))
                .sum()
        });
        assert_eq!(admitted, 1);
    }

    #[test]
    fn settling_refunds_the_difference() {
        let b = TokenBudget::new(150, Duration::from_secs(3600));
        let r = b.try_reserve(100).unwrap();
        assert!(b.try_reserve(100).is_err());
        r.settle(14);
        assert_eq!(b.committed(), (14, 0));
        assert!(b.try_reserve(100).is_ok());
    }

    #[test]
    fn settling_above_the_booking_charges_the_excess() {
        let b = TokenBudget::new(1000, Duration::from_secs(3600));
        b.try_reserve(100).unwrap().settle(300);
        assert_eq!(b.committed(), (300, 0));
    }

    #[test]
    fn a_dropped_reservation_is_charged_in_full() {
        let b = TokenBudget::new(150, Duration::from_secs(3600));
        drop(b.try_reserve(100).unwrap());
        assert_eq!(b.committed(), (100, 0));
        assert!(b.try_reserve(100).is_err());
        assert!(b.try_reserve(50).is_ok());
    }

    #[test]
    fn a_spent_budget_refuses_even_a_request_that_books_nothing() {
        let b = TokenBudget::new(100, Duration::from_secs(3600));
        b.try_reserve(100).unwrap().settle(100);
        assert!(b.try_reserve(0).is_err());
        assert!(b.spent().is_err());
    }

    #[test]
    fn a_request_larger_than_the_whole_budget_never_fits() {
        let b = TokenBudget::new(100, Duration::from_secs(3600));
        assert!(b.try_reserve(101).is_err());
        assert!(b.try_reserve(100).is_ok());
    }

    #[test]
    fn the_period_resets_settled_tokens_but_keeps_those_in_flight() {
        let origin = Instant::now();
        let b = TokenBudget::starting_at(100, Duration::from_secs(60), origin);
        b.try_reserve_at(60, origin).unwrap().settle(60);
        let in_flight = b.try_reserve_at(40, origin).unwrap();
        assert!(b.try_reserve_at(1, origin).is_err());
        // Next period: the 60 settled are gone, the 40 still running are not.
        let later = origin + Duration::from_secs(61);
        assert!(b.try_reserve_at(61, later).is_err());
        let r = b.try_reserve_at(60, later).unwrap();
        drop(in_flight);
        r.settle(0);
    }

    #[test]
    fn retry_after_counts_to_the_end_of_the_period() {
        let origin = Instant::now();
        let b = TokenBudget::starting_at(10, Duration::from_secs(60), origin);
        let at = origin + Duration::from_millis(125_500);
        assert_eq!(b.retry_after(at).secs(), 55);
        let refused = b.try_reserve_at(11, at).unwrap_err();
        assert_eq!(refused.secs(), 55);
        assert_eq!(RetryAfter(Duration::from_millis(1)).secs(), 1);
    }

    proptest::proptest! {
        /// The window kept with its end rolls over exactly where dividing the time since the
        /// origin by the period (the old way, every call) says, also for calls whose clock
        /// readings arrive out of order.
        #[test]
        fn the_window_rolls_over_where_the_division_says(
            per_ms in 1u64..5_000,
            steps in proptest::collection::vec((0u64..4_000, proptest::bool::ANY), 1..60),
        ) {
            let origin = Instant::now();
            let per = Duration::from_millis(per_ms);
            let b = TokenBudget::starting_at(u64::MAX, per, origin);
            let mut period = 0u64;
            let mut charged = 0u64;
            let mut at = 0u64;
            for (step, back) in steps {
                // Some readings are older than the last (another caller's earlier `now`).
                let t = if back { at.saturating_sub(step) } else { at + step };
                at = at.max(t);
                let now = origin + Duration::from_millis(t);
                let old = (u128::from(t) * 1_000_000 / per.as_nanos()) as u64;
                if old > period {
                    period = old;
                    charged = 0;
                }
                let mut w = b.window(now);
                proptest::prop_assert_eq!(w.period, period);
                proptest::prop_assert_eq!(w.charged, charged);
                w.charged += 1;
                charged += 1;
            }
        }
    }
}
