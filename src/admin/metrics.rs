//! Prometheus metrics on the admin socket (`GET /metrics`), in the `prometheus-client` crate's
//! OpenMetrics text. Request metrics are fed from the audit records as they are sent, so every
//! request is counted exactly once, the same way the audit counts it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::audit::{Decision, Reason, Record};

/// Label sets a thread keeps handles for (see [`Handles`]): a worker sees few routes and
/// agents at a time; a miss costs only the family lookups it replaces.
const CACHED: usize = 8;

/// Makes each [`Metrics`] and each of its reloads an epoch of its own.
static EPOCHS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static HANDLES: RefCell<Handles> = const {
        RefCell::new(Handles {
            epoch: 0,
            entries: Vec::new(),
            next: 0,
        })
    };
}

/// The request counter and latency histogram of the label sets this thread counted last,
/// keyed by the identity of the record's route and agent names (config `Arc`s, shared by every
/// record of a config generation): a request then costs no label hashing and no family lock
/// (`Family::get_or_create` hashes every label with SipHash). A handle shares its value with the
/// family's entry, which is never removed, so a handle is never stale; an entry holds its names,
/// so their addresses are not reused while it is kept. A reload starts a new epoch: each thread
/// drops its entries, and with them the replaced config's names, the next time it counts a
/// request (a thread that counts none keeps at most its eight entries' names).
struct Handles {
    epoch: u64,
    entries: Vec<Cached>,
    /// The entry the next miss replaces once all are used.
    next: usize,
}

struct Cached {
    route: Option<Arc<str>>,
    agent: Option<Arc<str>>,
    decision: Decision,
    status: u16,
    requests: Counter,
    latency: Histogram,
}

fn same(a: &Option<Arc<str>>, b: &Option<Arc<str>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    // Shared with the audit record: a label costs a reference count, not a copy.
    route: Arc<str>,
    agent: Arc<str>,
    // Static and numeric labels cost no allocation per request.
    decision: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

type Latency = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// keygate's Prometheus metrics (prefix `keygate_`), updated by the request path and read by
/// `/metrics`.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Latency,
    upstream_errors: Family<RouteLabels, Counter>,
    budget_spent: Family<AgentLabels, Gauge>,
    budget_limit: Family<AgentLabels, Gauge>,
    pending_approvals: Gauge,
    frozen: Gauge,
    reloads: Counter,
    /// Which thread-local [`Handles`] belong to this registry as it is now.
    epoch: AtomicU64,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~16 s: keygate's own refusals at the low end, model answers at the high end.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keygate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests, by route, agent, decision and status",
            requests.clone(),
        );
        let latency: Latency = Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its answer",
            latency.clone(),
        );
        let upstream_errors = Family::<RouteLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Requests that failed at the upstream (unreachable, timeout, broken body)",
            upstream_errors.clone(),
        );
        let budget_spent = Family::<AgentLabels, Gauge>::default();
        registry.register(
            "budget_spent_tokens",
            "Tokens spent in the agent's current budget window",
            budget_spent.clone(),
        );
        let budget_limit = Family::<AgentLabels, Gauge>::default();
        registry.register(
            "budget_limit_tokens",
            "The agent's token budget per window",
            budget_limit.clone(),
        );
        let pending_approvals = Gauge::default();
        registry.register(
            "pending_approvals",
            "Requests waiting for a person's approval",
            pending_approvals.clone(),
        );
        let frozen = Gauge::default();
        registry.register("frozen", "1 while everything is frozen", frozen.clone());
        let reloads = Counter::default();
        registry.register("reloads", "Successful config reloads", reloads.clone());
        Metrics {
            registry,
            requests,
            latency,
            upstream_errors,
            budget_spent,
            budget_limit,
            pending_approvals,
            frozen,
            reloads,
            epoch: AtomicU64::new(EPOCHS.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// Counts `r` in the request counter and latency histogram of its labels, their handles
    /// from this thread's cache.
    fn count(&self, r: &Record) {
        let count = |requests: &Counter, latency: &Histogram| {
            requests.inc();
            latency.observe(r.latency_ms / 1000.0);
        };
        let epoch = self.epoch.load(Ordering::Relaxed);
        let found = HANDLES.try_with(|h| {
            let mut h = h.borrow_mut();
            if h.epoch != epoch {
                h.epoch = epoch;
                h.entries.clear();
                h.next = 0;
            }
            if let Some(c) = h.entries.iter().find(|c| {
                c.status == r.status
                    && c.decision == r.decision
                    && same(&c.route, &r.route)
                    && same(&c.agent, &r.agent)
            }) {
                return count(&c.requests, &c.latency);
            }
            let (requests, latency) = self.lookup(r);
            count(&requests, &latency);
            let c = Cached {
                route: r.route.clone(),
                agent: r.agent.clone(),
                decision: r.decision,
                status: r.status,
                requests,
                latency,
            };
            if h.entries.len() < CACHED {
                h.entries.push(c);
            } else {
                let i = h.next;
                if let Some(slot) = h.entries.get_mut(i) {
                    *slot = c;
                }
                h.next = (i + 1) % CACHED;
            }
        });
        if found.is_err() {
            // A thread being torn down has no cache left: the families directly.
            let (requests, latency) = self.lookup(r);
            count(&requests, &latency);
        }
    }

    fn lookup(&self, r: &Record) -> (Counter, Histogram) {
        let requests = self
            .requests
            .get_or_create(&RequestLabels {
                route: r.route.clone().unwrap_or_default(),
                agent: r.agent.clone().unwrap_or_default(),
                decision: r.decision.as_str(),
                status: r.status,
            })
            .clone();
        let latency = self
            .latency
            .get_or_create(&RouteLabels {
                route: r.route.clone().unwrap_or_default(),
            })
            .clone();
        (requests, latency)
    }

    /// Counts one finished request.
    pub fn observe(&self, r: &Record) {
        self.count(r);
        let upstream_failed = r.blame == Some(crate::error::Blame::Upstream)
            || (r.decision == Decision::Allow
                && matches!(
                    r.reason,
                    Reason::UpstreamIdleTimeout | Reason::UpstreamBodyError
                ));
        if upstream_failed {
            self.upstream_errors
                .get_or_create(&RouteLabels {
                    route: r.route.clone().unwrap_or_default(),
                })
                .inc();
        }
    }

    /// Counts one successful config reload.
    pub fn reloaded(&self) {
        self.reloads.inc();
        self.epoch
            .store(EPOCHS.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The text exposition, with the gauges set to the values of this moment.
    pub fn render(
        &self,
        budgets: &[(String, Option<(u64, u64)>)],
        pending: usize,
        frozen: bool,
    ) -> String {
        for (agent, b) in budgets {
            if let Some((spent, limit)) = b {
                let l = AgentLabels {
                    agent: agent.clone(),
                };
                self.budget_spent
                    .get_or_create(&l)
                    .set(i64::try_from(*spent).unwrap_or(i64::MAX));
                self.budget_limit
                    .get_or_create(&l)
                    .set(i64::try_from(*limit).unwrap_or(i64::MAX));
            }
        }
        self.pending_approvals
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.frozen.set(i64::from(frozen));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_record_is_counted_with_its_labels() {
        let m = Metrics::new();
        let r = Record {
            route: Some("openai".into()),
            agent: Some("coder".into()),
            decision: Decision::Deny,
            status: 403,
            latency_ms: 2.0,
            ..Record::default()
        };
        m.observe(&r);
        m.observe(&r);
        let text = m.render(&[("coder".into(), Some((5, 100)))], 1, false);
        assert!(
            text.contains(
                r#"keygate_requests_total{route="openai",agent="coder",decision="deny",status="403"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains("keygate_pending_approvals 1"), "{text}");
        assert!(
            text.contains(r#"keygate_budget_spent_tokens{agent="coder"} 5"#),
            "{text}"
        );
    }

    fn record(route: &str, agent: &str, status: u16) -> Record {
        Record {
            route: Some(route.into()),
            agent: Some(agent.into()),
            decision: Decision::Allow,
            status,
            latency_ms: 1.0,
            ..Record::default()
        }
    }

    fn requests(text: &str, route: &str, agent: &str, status: u16) -> Option<u64> {
        let series = format!(
            r#"keygate_requests_total{{route="{route}",agent="{agent}",decision="allow",status="{status}"}} "#
        );
        let line = text.lines().find(|l| l.starts_with(&series))?;
        line[series.len()..].parse().ok()
    }

    #[test]
    fn requests_are_counted_in_one_series_across_reloads_and_new_name_allocations() {
        let m = Metrics::new();
        let first = record("openai", "coder", 200);
        m.observe(&first);
        m.observe(&first);
        m.reloaded();
        // A reload's config holds new `Arc`s with the same names.
        let second = record("openai", "coder", 200);
        m.observe(&second);
        m.observe(&first);
        let text = m.render(&[], 0, false);
        assert_eq!(requests(&text, "openai", "coder", 200), Some(4), "{text}");
        assert!(
            text.contains("keygate_request_duration_seconds_count{route=\"openai\"} 4"),
            "{text}"
        );
    }

    #[test]
    fn more_label_sets_than_a_thread_caches_are_all_counted() {
        let m = Metrics::new();
        let records: Vec<Record> = (0..3 * CACHED as u16)
            .map(|i| record("r", &format!("a{i}"), 200 + i % 3))
            .collect();
        for _ in 0..3 {
            for r in &records {
                m.observe(r);
            }
        }
        let text = m.render(&[], 0, false);
        for (i, _) in records.iter().enumerate() {
            let i = i as u16;
            assert_eq!(
                requests(&text, "r", &format!("a{i}"), 200 + i % 3),
                Some(3),
                "{text}"
            );
        }
    }

    #[test]
    fn two_registries_on_one_thread_count_apart() {
        let a = Metrics::new();
        let b = Metrics::new();
        let r = record("openai", "coder", 200);
        a.observe(&r);
        b.observe(&r);
        a.observe(&r);
        assert_eq!(
            requests(&a.render(&[], 0, false), "openai", "coder", 200),
            Some(2)
        );
        assert_eq!(
            requests(&b.render(&[], 0, false), "openai", "coder", 200),
            Some(1)
        );
    }
}
