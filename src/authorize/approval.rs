//! Approvals: a route with `approval = "each"` (every request) or `"once-per-token"` (the first
//! request of each token) waits for a person before anything is forwarded.
//!
//! A waiting request holds only a oneshot receiver and a timer, so it blocks no other request.
//! The person sees it in `keygate approvals list`, decides with `keygate approve|deny ID` over
//! the admin socket, or lets it time out (403 `approval_timeout`). Each new pending approval can
//! run `approval_notify` (no shell, the approval as JSON on stdin) to reach a person where they
//! are. Pending and decided approvals, and the tokens approved once, are kept in the state store.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;

use crate::audit::Record;
use crate::config::{Approval, Config, Route};
use crate::error::{Code, Rejection};
use crate::lock;
use crate::state::{ApprovalRow, ApprovalState, StateStore};

/// How long an `approval_notify` command may run.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// A request waiting for a person, as `approvals list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PendingApproval {
    /// The approval id a person passes to `keygate approve|deny`.
    pub id: String,
    /// The name of the agent whose token made the request.
    pub agent: String,
    /// The person the agent acts for (its `person` in the config), when set.
    pub person: Option<String>,
    /// The name of the route the request matched.
    pub route: String,
    /// The HTTP method of the request.
    pub method: String,
    /// The request path as the agent sent it, without the query.
    pub path: String,
    /// The `model` of a JSON body, when the body was read before the decision.
    pub model: Option<String>,
    /// Declared or read body size in bytes, when known.
    pub body_bytes: Option<u64>,
    /// The id of the agent token used (never the token), when the agent used an issued token.
    pub token_id: Option<String>,
    /// The request id that also names the request's audit record.
    pub request_id: String,
    /// When the request began waiting, RFC 3339 UTC.
    pub created: String,
    /// The keygate holding the request, where several share one state store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// What a person decided.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// Let the request through.
    Approved {
        /// The person who approved it.
        by: String,
    },
    /// Refuse the request with 403 `approval_denied`.
    Denied {
        /// The person who denied it.
        by: String,
        /// Why, as given to `deny --reason`; shown to the agent in the refusal.
        reason: Option<String>,
    },
}

struct Waiting {
    info: PendingApproval,
    since: Instant,
    created_unix: u64,
    tx: oneshot::Sender<Verdict>,
}

/// Every pending approval, and the (route, token) pairs approved once.
pub struct Approvals {
    waiting: Mutex<HashMap<String, Waiting>>,
    approved_once: Mutex<HashSet<(String, String)>>,
    store: Option<Arc<dyn StateStore>>,
    /// Whether a person can be reached at all (the admin socket is up).
    channel: std::sync::atomic::AtomicBool,
    /// This keygate's name in a shared store, written into each pending approval.
    instance: Option<String>,
}

impl Approvals {
    /// Starts with nothing pending, loading the tokens approved once from `store` and marking
    /// approvals left pending by a previous run as abandoned.
    pub fn new(store: Option<Arc<dyn StateStore>>) -> Approvals {
        let mut once = HashSet::new();
        if let Some(s) = &store {
            match s.approved_tokens() {
                Ok(list) => once.extend(list),
                Err(e) => tracing::error!(error = %e, "cannot read approved tokens"),
            }
            // Requests that were waiting when keygate stopped are gone with their connections;
            // in a shared store, only this keygate's own.
            let mine =
                |r: &ApprovalRow| !s.shared() || r.request["instance"].as_str() == s.instance();
            if let Ok(rows) = s.approvals(1000) {
                for mut row in rows
                    .into_iter()
                    .filter(|r| r.state == ApprovalState::Pending && mine(r))
                {
                    row.state = ApprovalState::Abandoned;
                    row.decided = Some(crate::state::now());
                    let _ = s.put_approval(&row);
                }
            }
        }
        Approvals {
            waiting: Mutex::new(HashMap::new()),
            approved_once: Mutex::new(once),
            instance: store
                .as_ref()
                .and_then(|s| s.instance())
                .map(str::to_string),
            store,
            channel: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The shared store, if approvals are shared between keygates.
    fn shared(&self) -> Option<&Arc<dyn StateStore>> {
        self.store.as_ref().filter(|s| s.shared())
    }

    /// Decides an approval whose request another keygate holds, through the shared store: the
    /// decided request as `approvals list` showed it, or `None` when none is pending there.
    /// The keygate holding it hears of the decision at once (an event) or within a second (its
    /// re-sync).
    pub fn decide_elsewhere(
        &self,
        id: &str,
        verdict: &Verdict,
    ) -> Result<Option<serde_json::Value>, String> {
        let Some(s) = self.shared() else {
            return Ok(None);
        };
        let (state, by, reason) = match verdict {
            Verdict::Approved { by } => (ApprovalState::Approved, by, None),
            Verdict::Denied { by, reason } => (ApprovalState::Denied, by, reason.as_deref()),
        };
        s.decide_approval(id, state, by, reason)
            .map(|row| row.map(|r| r.request))
            .map_err(|e| e.to_string())
    }

    /// Hands a decision made through the shared store to the request waiting here, if one is.
    pub fn sync_one(&self, id: &str) {
        if !lock(&self.waiting).contains_key(id) {
            return;
        }
        let Some(s) = self.shared() else { return };
        match s.approval(id) {
            Ok(Some(row)) => {
                let verdict = match row.state {
                    ApprovalState::Approved => Verdict::Approved {
                        by: row.decided_by.unwrap_or_default(),
                    },
                    ApprovalState::Denied => Verdict::Denied {
                        by: row.decided_by.unwrap_or_default(),
                        reason: row.reason,
                    },
                    _ => return,
                };
                if let Some(w) = lock(&self.waiting).remove(id) {
                    tracing::info!(approval = %id, "decided through the shared store");
                    let _ = w.tx.send(verdict);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(approval = %id, error = %e, "cannot read an approval"),
        }
    }

    /// Checks every request waiting here against the shared store (the backstop for a lost
    /// event).
    pub fn sync_waiting(&self) {
        if let Some(s) = self.shared() {
            // Tokens approved once through another keygate count here too.
            match s.approved_tokens() {
                Ok(list) => lock(&self.approved_once).extend(list),
                Err(e) => tracing::warn!(error = %e, "cannot re-read approved tokens"),
            }
        }
        let ids: Vec<String> = lock(&self.waiting).keys().cloned().collect();
        for id in ids {
            self.sync_one(&id);
        }
    }

    /// Approvals pending on other keygates sharing the store, as their `approvals list` shows
    /// them.
    pub fn list_elsewhere(&self) -> Vec<serde_json::Value> {
        let Some(s) = self.shared() else {
            return Vec::new();
        };
        let now = crate::state::now();
        let here = lock(&self.waiting).keys().cloned().collect::<HashSet<_>>();
        match s.approvals(200) {
            Ok(rows) => rows
                .into_iter()
                .filter(|r| r.state == ApprovalState::Pending && !here.contains(&r.id))
                .map(|r| {
                    let mut v = r.request;
                    v["age_seconds"] = now.saturating_sub(r.created).into();
                    v
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list approvals pending elsewhere");
                Vec::new()
            }
        }
    }

    /// Says whether `approve`/`deny` can reach keygate (the admin socket is listening).
    pub fn set_channel(&self, up: bool) {
        self.channel.store(up, std::sync::atomic::Ordering::Relaxed);
    }

    /// The pending approvals, oldest first, with their age.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let w = lock(&self.waiting);
        let mut rows: Vec<&Waiting> = w.values().collect();
        rows.sort_by_key(|x| x.since);
        rows.iter()
            .map(|x| {
                let mut v = serde_json::to_value(&x.info).unwrap_or_default();
                v["age_seconds"] = x.since.elapsed().as_secs().into();
                v
            })
            .collect()
    }

    /// How many requests are waiting for a person now.
    pub fn pending_count(&self) -> usize {
        lock(&self.waiting).len()
    }

    /// Hands a person's decision to the waiting request; `None` when no request waits on `id`.
    pub fn decide(&self, id: &str, verdict: Verdict) -> Option<PendingApproval> {
        if let Some(s) = self
            .shared()
            .filter(|_| lock(&self.waiting).contains_key(id))
        {
            // Held here, but a person at another keygate may decide it at the same moment: the
            // store's compare-and-set says whose decision counts.
            let (state, by, reason) = match &verdict {
                Verdict::Approved { by } => (ApprovalState::Approved, by.as_str(), None),
                Verdict::Denied { by, reason } => {
                    (ApprovalState::Denied, by.as_str(), reason.as_deref())
                }
            };
            match s.decide_approval(id, state, by, reason) {
                Ok(Some(_)) => {}
                // Decided elsewhere first: that decision goes to the request. A row not (yet)
                // in the store is decided here.
                Ok(None) => {
                    if let Ok(Some(_)) = s.approval(id) {
                        self.sync_one(id);
                        return None;
                    }
                }
                // The store is unreachable, so nobody else can decide it either.
                Err(e) => {
                    tracing::warn!(approval = %id, error = %e, "deciding without the shared store")
                }
            }
        }
        let w = lock(&self.waiting).remove(id)?;
        let info = w.info.clone();
        let (state, by, reason) = match &verdict {
            Verdict::Approved { by } => (ApprovalState::Approved, by.clone(), None),
            Verdict::Denied { by, reason } => (ApprovalState::Denied, by.clone(), reason.clone()),
        };
        self.persist(ApprovalRow {
            id: info.id.clone(),
            state,
            request: serde_json::to_value(&info).unwrap_or_default(),
            decided_by: Some(by),
            reason,
            created: w.created_unix,
            decided: Some(crate::state::now()),
        });
        // The request may have gone meanwhile; then there is nobody to tell.
        let _ = w.tx.send(verdict);
        Some(info)
    }

    /// The pipeline's approval step: nothing for a route without approval, else [`Self::gate`]
    /// with the request described for the person.
    pub async fn check(
        self: &Arc<Self>,
        ask: Ask<'_>,
        record: &mut Record,
    ) -> Result<(), Rejection> {
        if ask.route.approval == Approval::Never {
            return Ok(());
        }
        let info = PendingApproval {
            id: new_id(),
            agent: ask.config.agents[ask.agent].name.clone(),
            person: record.person.as_deref().map(str::to_string),
            route: ask.route.name.clone(),
            method: ask.method.to_string(),
            path: record.path.clone(),
            model: ask.seen.model,
            body_bytes: ask.seen.body_bytes,
            token_id: ask.token_id.map(str::to_string),
            request_id: record.request_id.clone(),
            created: crate::audit::now_rfc3339(),
            instance: self.instance.clone(),
        };
        self.gate(
            &ask.route.approval,
            &ask.config.approval_notify,
            info,
            record,
        )
        .await
    }

    /// Waits for a person where the route asks for one. Sets `approval_id` and `approved_by` on
    /// the audit record; refuses with `approval_denied` or `approval_timeout`.
    pub async fn gate(
        self: &Arc<Self>,
        approval: &Approval,
        notify: &[String],
        info: PendingApproval,
        record: &mut Record,
    ) -> Result<(), Rejection> {
        let Some(timeout) = approval.timeout() else {
            return Ok(());
        };
        let once_key = match (approval, &info.token_id) {
            (Approval::OncePerToken { .. }, Some(t)) => Some((info.route.clone(), t.clone())),
            (Approval::OncePerToken { .. }, None) => Some((info.route.clone(), info.agent.clone())),
            _ => None,
        };
        if let Some(k) = &once_key {
            if lock(&self.approved_once).contains(k) {
                return Ok(());
            }
        }
        if !self.channel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Rejection::new(
                Code::ApprovalUnavailable,
                format!(
                    "route {} needs a person's approval, and keygate has no admin socket to ask through",
                    info.route
                ),
            ));
        }
        let id = info.id.clone();
        record.approval_id = Some(id.clone());
        let (tx, rx) = oneshot::channel();
        let created_unix = crate::state::now();
        self.persist(ApprovalRow {
            id: id.clone(),
            state: ApprovalState::Pending,
            request: serde_json::to_value(&info).unwrap_or_default(),
            decided_by: None,
            reason: None,
            created: created_unix,
            decided: None,
        });
        if !notify.is_empty() {
            spawn_notify(notify.to_vec(), &info);
        }
        lock(&self.waiting).insert(
            id.clone(),
            Waiting {
                info: info.clone(),
                since: Instant::now(),
                created_unix,
                tx,
            },
        );
        tracing::info!(approval = %id, agent = %info.agent, route = %info.route, "waiting for approval");
        // Removes the entry however the wait ends, also when the client goes away mid-wait.
        let _cleanup = Cleanup {
            approvals: self.clone(),
            id: id.clone(),
            created_unix,
        };
        let mut rx = rx;
        let verdict = match tokio::time::timeout(timeout, &mut rx).await {
            Ok(v) => v.ok(),
            // A decision that landed as the timer fired still counts: the person was told it
            // was taken.
            Err(_) => rx.try_recv().ok(),
        };
        match verdict {
            Some(Verdict::Approved { by }) => {
                record.approved_by = Some(by);
                if let Some((route, token)) = once_key {
                    if let Some(s) = &self.store {
                        let s = s.clone();
                        let (r, t) = (route.clone(), token.clone());
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = s.approve_token(&r, &t) {
                                tracing::error!(error = %e, "cannot save an approved token");
                            }
                        });
                    }
                    lock(&self.approved_once).insert((route, token));
                }
                Ok(())
            }
            Some(Verdict::Denied { by, reason }) => {
                record.approved_by = Some(by.clone());
                let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
                Err(Rejection::new(
                    Code::ApprovalDenied,
                    format!("{by} denied this request (approval {id}){why}"),
                ))
            }
            None => {
                let taken = lock(&self.waiting).remove(&id);
                if let Some(w) = taken {
                    self.persist(ApprovalRow {
                        id: id.clone(),
                        state: ApprovalState::TimedOut,
                        request: serde_json::to_value(&w.info).unwrap_or_default(),
                        decided_by: None,
                        reason: None,
                        created: created_unix,
                        decided: Some(crate::state::now()),
                    });
                }
                Err(Rejection::new(
                    Code::ApprovalTimeout,
                    format!(
                        "nobody approved this request within {} (approval {id})",
                        humantime::format_duration(timeout)
                    ),
                ))
            }
        }
    }

    /// Writes a row off the runtime's threads.
    fn persist(&self, row: ApprovalRow) {
        if let Some(s) = &self.store {
            let s = s.clone();
            let write = move || {
                if let Err(e) = s.put_approval(&row) {
                    tracing::error!(error = %e, "cannot save an approval");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(write);
                }
                Err(_) => write(),
            }
        }
    }
}

struct Cleanup {
    approvals: Arc<Approvals>,
    id: String,
    created_unix: u64,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(w) = lock(&self.approvals.waiting).remove(&self.id) {
            self.approvals.persist(ApprovalRow {
                id: self.id.clone(),
                state: ApprovalState::Abandoned,
                request: serde_json::to_value(&w.info).unwrap_or_default(),
                decided_by: None,
                reason: None,
                created: self.created_unix,
                decided: Some(crate::state::now()),
            });
        }
    }
}

/// What a person is asked about: the request as far as keygate has seen it.
pub struct Ask<'a> {
    config: &'a Config,
    route: &'a Route,
    agent: usize,
    token_id: Option<&'a str>,
    method: &'a http::Method,
    seen: Seen,
}

impl<'a> Ask<'a> {
    /// Describes a request from `agent` (its index in `config.agents`) on `route`.
    pub fn new(
        config: &'a Config,
        route: &'a Route,
        agent: usize,
        token_id: Option<&'a str>,
        method: &'a http::Method,
        seen: Seen,
    ) -> Ask<'a> {
        Ask {
            config,
            route,
            agent,
            token_id,
            method,
            seen,
        }
    }
}

/// What the body showed before the decision: its size, and its `model` when it was read whole.
#[derive(Default)]
pub struct Seen {
    model: Option<String>,
    body_bytes: Option<u64>,
}

impl Seen {
    /// A body read whole. Parsed for its `model` only on a route that asks a person, so other
    /// requests pay nothing.
    pub fn whole(route: &Route, body: &[u8]) -> Seen {
        Seen {
            model: (route.approval != Approval::Never)
                .then(|| model_of(body))
                .flatten(),
            body_bytes: Some(body.len() as u64),
        }
    }

    /// A streamed body: only its declared length is known.
    pub fn declared(len: Option<u64>) -> Seen {
        Seen {
            model: None,
            body_bytes: len,
        }
    }
}

/// The request's declared `Content-Length`, read before the scan re-frames the body.
pub fn declared_length(head: &http::request::Parts) -> Option<u64> {
    head.headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A fresh approval id: `apr_` + 16 hex digits.
pub fn new_id() -> String {
    use rand::Rng;
    format!("apr_{:016x}", rand::rng().random::<u64>())
}

/// The `model` named at the top of a JSON body, if any.
pub fn model_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct M {
        model: Option<String>,
    }
    serde_json::from_slice::<M>(body).ok()?.model
}

/// Runs `approval_notify` without a shell, the approval as JSON on stdin, bounded in time; its
/// output is discarded so a notifier cannot write into keygate's logs.
fn spawn_notify(argv: Vec<String>, info: &PendingApproval) {
    let json = serde_json::to_vec(info).unwrap_or_default();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(program = %argv[0], error = %e, "approval_notify could not start");
                return;
            }
        };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = tokio::time::timeout(NOTIFY_TIMEOUT, stdin.write_all(&json)).await;
        }
        match tokio::time::timeout(NOTIFY_TIMEOUT, child.wait()).await {
            Ok(Ok(s)) if !s.success() => {
                tracing::warn!(program = %argv[0], status = %s, "approval_notify failed")
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(program = %argv[0], "approval_notify ran too long; stopped");
                let _ = child.kill().await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_read_from_a_json_body_only() {
        assert_eq!(
            model_of(br#"{"model":"gpt-x","messages":[]}"#).as_deref(),
            Some("gpt-x")
        );
        assert_eq!(model_of(b"not json"), None);
        assert_eq!(model_of(br#"{"messages":[]}"#), None);
    }
}
