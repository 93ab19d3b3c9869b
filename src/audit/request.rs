//! A request's record from its first byte to its last: how it starts, and the observer that
//! finishes it when the response body ends (or is abandoned).

use std::time::Instant;

use http::request::Parts;

use super::{Decision, PeerRecord, Pending, Reason, Record};
use crate::authorize::usage::Meter;
use crate::config::{Agent, Route};
use crate::guard::Peer;
use crate::redact::body::{End, Observer};

/// The longest path kept in a record.
const MAX_PATH: usize = 2048;

impl Record {
    /// The record of a request as it arrives, before any stage has looked at it.
    pub fn request(
        head: &Parts,
        request_id: &str,
        peer: &Peer,
        listener: &str,
        policy_version: &str,
    ) -> Record {
        Record {
            time: super::now_rfc3339(),
            request_id: request_id.to_string(),
            method: head.method.to_string(),
            path: head.uri.path().chars().take(MAX_PATH).collect(),
            policy_version: policy_version.to_string(),
            listener: listener.to_string(),
            peer: match peer {
                Peer::Unix { uid, pid } => Some(PeerRecord {
                    uid: *uid,
                    pid: *pid,
                }),
                Peer::Tcp(_) => None,
            },
            ..Record::default()
        }
    }
}

impl Record {
    /// Names the authenticated agent and the person behind it.
    pub fn agent(&mut self, agent: &Agent) {
        self.agent = Some(agent.name.clone());
        if agent.person.is_some() {
            self.person = agent.person.clone();
        }
    }

    /// Names the route, its upstream host and classification, and its secret.
    pub fn route(&mut self, route: &Route) {
        self.route = Some(route.name.clone());
        self.destination = Some(route.upstream.host.clone());
        self.classification = Some(route.classification.clone());
        self.key_id = route.secret.clone();
    }
}

/// Finishes an allowed request's record when its response body ends: bytes, latency, reported
/// usage (charged to the budget), and why it ended if not in full.
pub struct Finishing {
    pending: Pending,
    start: Instant,
    meter: Option<Meter>,
}

impl Finishing {
    /// Finishes `pending` when the body ends; `meter` counts usage for a budget.
    pub fn new(pending: Pending, start: Instant, meter: Option<Meter>) -> Finishing {
        Finishing {
            pending,
            start,
            meter,
        }
    }
}

impl Observer for Finishing {
    fn data(&mut self, data: &[u8]) {
        if let Some(m) = &mut self.meter {
            m.feed(data);
        }
    }

    fn end(&mut self, end: End, _bytes_in: u64, bytes_out: u64) {
        let tokens = self.meter.take().and_then(Meter::settle);
        let r = self.pending.record();
        r.bytes_out = bytes_out;
        r.latency_ms = ms(self.start);
        if tokens.is_some() {
            r.tokens = tokens;
        }
        let ended = match end {
            End::Complete => None,
            End::Idle => Some(Reason::UpstreamIdleTimeout),
            End::Broken | End::TooLarge => Some(Reason::UpstreamBodyError),
            End::Dropped => Some(Reason::ClientDisconnected),
        };
        if let Some(reason) = ended {
            r.reason = reason;
            r.decision = Decision::Allow;
        }
        self.pending.send();
    }
}

/// Milliseconds since `start`, to the microsecond.
pub fn ms(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e6).round() / 1e3
}
