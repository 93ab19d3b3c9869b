//! Prometheus metrics on the admin socket (`GET /metrics`), in the `prometheus-client` crate's
//! OpenMetrics text. Request metrics are fed from the audit records as they are sent, so every
//! request is counted exactly once, the same way the audit counts it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use std::sync::Arc;

use crate::audit::{Decision, Reason, Record};

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
        }
    }

    /// Counts one finished request.
    pub fn observe(&self, r: &Record) {
        let route = r.route.clone().unwrap_or_default();
        self.requests
            .get_or_create(&RequestLabels {
                route,
                agent: r.agent.clone().unwrap_or_default(),
                decision: r.decision.as_str(),
                status: r.status,
            })
            .inc();
        let route = r.route.clone().unwrap_or_default();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(r.latency_ms / 1000.0);
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
}
