//! A request's record from its first byte to its last: how it starts, and the observer that
//! finishes it when the response body ends (or is abandoned).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use sha2::{Digest, Sha256};

use super::{Decision, PeerRecord, Pending, Reason, Record};
use crate::authorize::usage::Meter;
use crate::config::{Agent, Route};
use crate::guard::timeout::Verdict;
use crate::guard::Peer;
use crate::redact::body::{End, Observer};
use crate::redact::Redactor;

/// Characters of a request path kept in its record.
pub const MAX_PATH: usize = 2048;
/// Query parameter names kept in a record, and characters kept of each.
const MAX_QUERY_PARAMS: usize = 64;
const MAX_QUERY_NAME: usize = 128;

impl Record {
    /// The record of a request as it arrives, before any stage has looked at it. `scanner` is
    /// the request scan's engine (see [`Record::set_target`]); `path_clean` says that it finds
    /// nothing in the path (`scan::Target::path_clean`), which is then not scanned again.
    pub fn request(
        head: &Parts,
        request_id: &str,
        peer: &Peer,
        listener: &Arc<str>,
        policy_version: &Arc<str>,
        scanner: &Redactor,
        path_clean: bool,
    ) -> Record {
        let mut r = Record {
            time: super::Stamp::now(),
            request_id: request_id.to_string(),
            method: head.method.clone(),
            policy_version: Arc::clone(policy_version),
            listener: Arc::clone(listener),
            peer: match peer {
                Peer::Unix { uid, pid } => Some(PeerRecord {
                    uid: *uid,
                    pid: *pid,
                }),
                Peer::Tcp(_) => None,
            },
            ..Record::default()
        };
        r.fill_target(&head.uri, scanner, path_clean);
        r
    }

    /// Fills `path`, `path_truncated`, `target_sha256` and `query_params` from the request
    /// target, through `scanner` (held secrets and credential shapes): a request refused for
    /// carrying a key in its URL is still recorded, and its record must not carry the key.
    /// `scanner` is the request scan's own engine and the path is short, so this costs about
    /// what the scan of the URL does.
    pub fn set_target(&mut self, uri: &http::Uri, scanner: &Redactor) {
        self.fill_target(uri, scanner, false);
    }

    /// [`Record::set_target`], where `path_clean` says that `scanner` finds nothing in the path.
    pub(crate) fn fill_target(&mut self, uri: &http::Uri, scanner: &Redactor, path_clean: bool) {
        let raw = uri.path();
        let path = if path_clean {
            Cow::Borrowed(raw)
        } else {
            redacted_str(scanner, raw)
        };
        // Cut after redaction, so a long secret is found whole before any of it is kept. A
        // path of no more bytes than that has no more characters either.
        let cut = if path.len() <= MAX_PATH {
            None
        } else {
            path.char_indices().nth(MAX_PATH)
        };
        match cut {
            None => path.as_ref().clone_into(&mut self.path),
            Some((cut, _)) => {
                self.path = path[..cut].to_string();
                self.path_truncated = true;
                let target = uri.path_and_query().map_or(raw, |pq| pq.as_str());
                self.target_sha256 = Some(hex::encode(Sha256::digest(target.as_bytes())));
            }
        }
        let Some(query) = uri.query().filter(|q| !q.is_empty()) else {
            return;
        };
        let names = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').map_or(p, |(name, _)| name));
        for name in names.take(MAX_QUERY_PARAMS) {
            // A bare `?sk-…` has a secret for a name.
            let name = redacted_str(scanner, name);
            self.query_params
                .push(name.chars().take(MAX_QUERY_NAME).collect());
        }
    }
}

/// `s` through `scanner`: itself when nothing was replaced (no copy, no UTF-8 check).
fn redacted_str<'a>(scanner: &Redactor, s: &'a str) -> Cow<'a, str> {
    match scanner.redact(s.as_bytes()) {
        Cow::Borrowed(_) => Cow::Borrowed(s),
        Cow::Owned(v) => Cow::Owned(String::from_utf8_lossy(&v).into_owned()),
    }
}

impl Record {
    /// Names the authenticated agent and the person behind it.
    pub fn agent(&mut self, agent: &Agent) {
        self.agent = Some(Arc::clone(&agent.recorded.agent));
        if agent.recorded.person.is_some() {
            self.person.clone_from(&agent.recorded.person);
        }
    }

    /// Names the route, its upstream host and classification, and its secret.
    pub fn route(&mut self, route: &Route) {
        let names = &route.recorded;
        self.route = Some(Arc::clone(&names.route));
        // A forward-proxy route is recorded by the host the agent asked for.
        self.destination = Some(Arc::clone(&names.destination));
        self.classification = Some(Arc::clone(&names.classification));
        self.key_id.clone_from(&names.secret);
    }
}

/// Finishes an allowed request's record when its response body ends: bytes, latency, reported
/// usage (charged to the budget), and why it ended if not in full.
pub struct Finishing {
    pending: Pending,
    start: Instant,
    meter: Option<Meter>,
    verdict: Option<Verdict>,
}

impl Finishing {
    /// Finishes `pending` when the body ends; `meter` counts usage for the audit and the budget.
    pub fn new(pending: Pending, start: Instant, meter: Option<Meter>) -> Finishing {
        Finishing {
            pending,
            start,
            meter,
            verdict: None,
        }
    }

    /// A body ended by the response watch (client stalled, deadline) is recorded as such.
    pub fn watched(mut self, verdict: Verdict) -> Finishing {
        self.verdict = Some(verdict);
        self
    }
}

impl Observer for Finishing {
    fn data(&mut self, data: &[u8]) {
        if let Some(m) = &mut self.meter {
            m.feed(data);
        }
    }

    fn end(&mut self, end: End, _bytes_in: u64, bytes_out: u64) {
        // Only a body that ended whole settles to its reported usage; any other end charges
        // the request's whole reservation.
        let tokens = self
            .meter
            .take()
            .and_then(|m| m.settle(end == End::Complete));
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
            End::Dropped => Some(
                self.verdict
                    .as_ref()
                    .and_then(Verdict::get)
                    .unwrap_or(Reason::ClientDisconnected),
            ),
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
