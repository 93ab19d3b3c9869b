//! The path of a request, top to bottom: `guard` → `authenticate` → `route` → `authorize` →
//! `scan` → `credential` → `forward` → `redact` → `audit`. Each stage is a call in [`process`];
//! this file holds the order and nothing else, so a reader finds any behaviour by following it.
//!
//! Architecture invariants enforced here:
//! - every request gets exactly one audit record: an [`audit::Pending`] is created before the
//!   first check and travels with the request, into the response body when it streams;
//! - nothing is forwarded while the audit log is failing (503 `audit_unavailable`);
//! - response headers and every body chunk pass through the redactor built from held secrets.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};

use crate::audit::{self, AuditLog, Decision, Finishing, Pending, Reason, Record};
use crate::authenticate::{self, Tokens};
use crate::authorize::approval;
use crate::authorize::usage::{self, Meter, StripUsageChunk};
use crate::authorize::{Policy, Reservation};
use crate::config::{Config, Mode, RequestScan, Route, RouteId};
use crate::credential::{self, Credentials};
use crate::error::Rejection;
use crate::forward::{self, Body, Forwarder};
use crate::guard::{self, timeout, Guard, Peer};
use crate::listen::Incoming;
use crate::redact;
use crate::redact::body::{End, Observer, RedactingBody};
use crate::{local, placeholder, route, scan};

/// Everything a request needs, built once at start-up.
pub struct State {
    /// The validated config.
    pub config: Arc<Config>,
    /// A short hash of the effective policy, in every audit record.
    pub policy_version: Arc<str>,
    /// The request-shape checks.
    pub guard: Guard,
    /// Who may call: configured and issued tokens.
    pub tokens: Tokens,
    /// Rules, rates and budgets.
    pub policy: Policy,
    /// The held secrets and the redactors built from them.
    pub credentials: Credentials,
    /// The upstream client.
    pub forwarder: Forwarder,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// The person behind agents that name none: the user keygate runs as.
    pub default_person: Option<Arc<str>>,
    /// Listener URLs, for `/healthz`.
    pub listen_urls: Vec<String>,
    /// The first TCP listener's port, for the lab's `/healthz`.
    pub listen_port: u16,
    /// Freezes, approvals, metrics: what outlives a reload.
    pub control: Arc<crate::admin::Control>,
    /// The `https://` listeners' TLS, rebuilt with the state so a reload reads renewed files.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// What a request's connection hands the pipeline with it: an argument, not the request's
/// extensions, whose map costs a request five allocations (the map, its table, a box per value).
#[derive(Default)]
pub struct Conn {
    /// Closes the connection (a stalled answer's watch); none through the forward proxy.
    pub closer: Option<timeout::Closer>,
    /// The HTTP/1 downstream connection's own upstream connection.
    pub affinity: Option<forward::Affinity>,
}

/// Serves one request. Never fails: every outcome is an HTTP answer with one audit record.
pub async fn handle(
    state: Arc<State>,
    peer: Arc<Peer>,
    listener: Arc<str>,
    conn: Conn,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let request_id = new_request_id();
    let (head, body) = req.into_parts();
    let Conn { closer, affinity } = conn;
    let scanner = state.credentials.scanner();
    let target = scan::Target::of(&scanner, &head.uri);
    let mut record = Record::request(
        &head,
        &request_id,
        &peer,
        &listener,
        &state.policy_version,
        &scanner,
        target.path_clean(&head.uri),
    );
    record.person = state.default_person.clone();
    record.instance = state.control.instance.clone();
    let mut pending = state.audit.begin(record);

    // An HTTP/1 request refused before its body was read leaves that body on the connection;
    // hyper then closes it, and a pooled client must be told so rather than find out on reuse.
    let http1_with_body = head.version < http::Version::HTTP_2 && !body.is_end_stream();
    let mut body_read = false;
    let mut resp = match process(
        &state,
        &peer,
        &scanner,
        &mut pending,
        head,
        body,
        Carried { affinity, target },
        &mut body_read,
    )
    .await
    {
        Ok(Answer::Local(resp, decision, reason)) => {
            let r = pending.record();
            r.decision = decision;
            r.reason = reason;
            r.status = resp.status().as_u16();
            r.bytes_out = resp.body().len() as u64;
            r.latency_ms = audit::ms(start);
            pending.finish();
            resp.map(full)
        }
        Ok(Answer::Upstream(resp)) => returning(&state, resp, pending, start, closer),
        Err(rejection) => {
            let r = pending.record();
            r.decision = Decision::Deny;
            r.reason = Reason::Refused(rejection.code);
            r.status = rejection.status().as_u16();
            r.blame = Some(rejection.blame());
            r.latency_ms = audit::ms(start);
            let mut resp = rejection.to_response(&request_id);
            r.bytes_out = resp.body().len() as u64;
            pending.finish();
            if http1_with_body && !body_read {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp.map(full)
        }
    };
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(request_id)) {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    Ok(resp)
}

static X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

enum Answer {
    /// Answered by keygate itself (health, dry-run).
    Local(Response<Bytes>, Decision, Reason),
    /// The upstream's answer, body still streaming.
    Upstream(Upstream),
}

/// What the way back needs to know about an upstream answer.
struct Upstream {
    resp: Response<forward::Incoming>,
    /// The response redactor, with every value held when the answer came.
    redactor: Arc<redact::Redactor>,
    request_redacted: bool,
    route: RouteId,
    /// The tokens booked against the agent's budget, settled when the answer ends.
    reservation: Option<Reservation>,
    /// keygate asked for the usage chunk the client did not: it is removed on the way back.
    strip_usage_chunk: bool,
    /// A dynamic credential's lease, kept alive until the answer is sent.
    hold: Option<crate::secret::openbao::LeaseHold>,
}

/// What `handle` found or was handed before `process`, for its later stages.
struct Carried {
    affinity: Option<forward::Affinity>,
    /// The URL's scan, made for the audit record and reused by the scan stage.
    target: scan::Target,
}

/// `scanner` is the request scan's engine, loaded once per request: a value held after it was
/// loaded is in the next request's.
#[allow(clippy::too_many_arguments)]
async fn process(
    state: &State,
    peer: &Peer,
    scanner: &Arc<redact::Redactor>,
    pending: &mut Pending,
    mut head: Parts,
    body: Incoming,
    carried: Carried,
    body_read: &mut bool,
) -> Result<Answer, Rejection> {
    let Carried { affinity, target } = carried;
    let config = &*state.config;
    let body = timeout::ReadTimeout::new(body, config.connections.request_body_timeout);
    let body_timeout = body.probe();

    // guard
    state.guard.check(&head, peer)?;
    guard::strip_request(&mut head.headers);
    state.audit.check_writable(config.audit_fail_closed)?;
    if local::is_healthz(&head) {
        let resp = local::healthz(
            config,
            &state.policy_version,
            state.audit.healthy(),
            &state.listen_urls,
            state.listen_port,
        );
        return Ok(Answer::Local(resp, Decision::Allow, Reason::Healthz));
    }

    state.control.check_state()?;
    state.control.check_frozen(None)?;

    // authenticate (a live placeholder is its run's capability: `placeholder`)
    let runs = &state.control.runs;
    // Routed once, here: authentication needs to know whether the route takes placeholders,
    // and the route's own refusal still comes after authentication's (below).
    let via_host = head
        .extensions
        .get::<crate::proxy::Via>()
        .map(|v| v.host.as_str());
    let routed = route::select(&config.routes, via_host, &head.uri);
    let placeholder_route = routed
        .as_ref()
        .is_ok_and(|r| placeholder::enabled(&config.routes[r.route]));
    let lifted = placeholder::lift(&mut head.headers, &runs.placeholders, placeholder_route)?;
    let who = placeholder::identify(
        state.tokens.identify(&mut head, peer),
        &lifted,
        config,
        placeholder_route,
        |t| runs.get(t).is_some() && !runs.revoked().contains(t),
    )?;
    let caller_token = who.token_id.as_deref();
    let agent = who.agent;
    authenticate::strip_caller_credentials(&mut head.headers);
    pending.record().agent(&config.agents[agent]);
    if let Some(p) = &who.person {
        // The front end's header is agent-written text: the record gets it through the scan.
        let named = scanner.redact(p.as_bytes()).into_owned();
        pending.record().person = Some(String::from_utf8_lossy(&named).into());
    }
    // Per-person limits key on the person the audit names.
    let person = pending.record().person.clone();
    admit(state, pending.record(), &who)?;
    if let Some(via) = head.extensions.get::<crate::proxy::Via>() {
        via.identified();
    }

    // route
    let routed = routed?;
    let route = &config.routes[routed.route];
    pending.record().route(route);

    // authorize
    let authorized =
        state
            .policy
            .authorize_for(config, agent, person.as_deref(), &head.method, routed)?;
    placeholder::check_foreign(route, &lifted, caller_token, &head.headers)?;
    // A shared store decides the rate on the server, for every keygate at once.
    pending.record().state = state.policy.shared_rate(config, agent).await?;
    // A budgeted request books what it may cost, which its body says.
    let budgeted = state.policy.budgeted(agent) && !body.is_end_stream();

    // scan (and read the body where policy needs all of it)
    let declared = approval::declared_length(&head);
    let sent_length = head.headers.get(header::CONTENT_LENGTH).cloned();
    let (body, request_redacted) = request_body(
        config,
        scanner,
        route,
        pending,
        &mut head,
        &target,
        body,
        budgeted || route.inject.needs_whole_body() || route.placeholder_in.body,
        body_read,
    )
    .await?;
    if route.request_scan != RequestScan::Off {
        scan::lifted(scanner, route.request_scan, &lifted.masked(), pending)?;
    }
    let mut body_sha256 = None;
    let mut plan = usage::RequestPlan::default();
    let (whole, body, streamed, seen) = match body {
        RequestBody::Whole(mut bytes) => {
            if budgeted {
                let reserve = Policy::default_reserve(config, agent, authorized.route());
                plan = usage::plan_request(head.uri.path(), &bytes, reserve);
                if let Some(asks_for_usage) = plan.body.take() {
                    bytes = asks_for_usage;
                }
            }
            if config.mode == Mode::DryRun {
                let resp =
                    local::dry_run(config, &authorized, &head, &bytes, who.person.as_deref());
                return Ok(Answer::Local(resp, Decision::DryRun, Reason::DryRun));
            }
            let seen = approval::Seen::whole(route, &bytes);
            (Some(bytes), None, None, seen)
        }
        RequestBody::Streamed(body, count) => (
            None,
            Some(body),
            Some(count),
            approval::Seen::declared(declared),
        ),
    };

    // authorize, last: a person's approval where the route asks for one (waits, blocking nothing)
    let approvals = state.control.approvals.clone();
    let ask = approval::Ask::new(config, route, agent.0, caller_token, &head.method, seen);
    approvals.check(ask, pending.record()).await?;

    // credential
    let run = pending.record().run_id.clone();
    let secret = state
        .credentials
        .get(config, &authorized, run.as_deref())
        .await?;
    let hold = secret
        .as_ref()
        .and_then(|s| state.credentials.hold(config, &authorized, s));
    let mut query = head.uri.query().map(str::to_string);
    let mut whole = whole;
    let ours = caller_token.and_then(|t| runs.placeholders.of_run(t, &route.name));
    let target = placeholder::Target {
        headers: &mut head.headers,
        query: &mut query,
        body: whole.as_mut(),
        max_body: usize::try_from(config.max_request_bytes).unwrap_or(usize::MAX),
    };
    let in_header = match &secret {
        Some(secret) => credential::replace(secret, route, lifted, ours.as_deref(), target)?,
        None => placeholder::substitute(route, lifted, None, b"", target)?,
    };
    if let Some(secret) = &secret {
        pending.record().key_id = Some(secret.key_id().shared());
        if matches!(route.inject, crate::config::Inject::AwsSigV4 { .. }) {
            body_sha256 = whole.as_deref().map(crate::secret::aws::payload_sha256);
        }
        let method = head.method.clone();
        let hash = body_sha256.as_deref();
        // A header the agent's tool filled with its placeholder now holds the credential as
        // the tool spelled it (Basic for git): `attach` would overwrite it.
        if !in_header {
            credential::attach(
                config,
                &authorized,
                secret,
                &method,
                hash,
                &mut head.headers,
                &mut query,
            )?;
        }
    }
    let body = match (whole, body) {
        (Some(bytes), _) => {
            // The agent's own `Content-Length`, where it is still the body's: hyper would
            // otherwise format the same number into a new value (two allocations). An empty
            // body is sent without one, as hyper does.
            let same =
                |v: &HeaderValue| !bytes.is_empty() && states_length(v.as_bytes(), bytes.len());
            if let Some(v) = sent_length.filter(same) {
                head.headers.insert(header::CONTENT_LENGTH, v);
            }
            full(bytes)
        }
        (None, Some(body)) => body,
        (None, None) => full(Bytes::new()),
    };
    let reservation = state
        .policy
        .reserve_for(config, agent, person.as_deref(), plan.reserve)
        .await?;

    // forward
    let route_id = authorized.route();
    let resp = state
        .forwarder
        .send(
            config,
            authorized,
            head,
            query.as_deref(),
            body,
            affinity.as_ref(),
        )
        .await;
    if let Some(count) = streamed {
        pending.record().bytes_in = count.load(Ordering::Relaxed);
    }
    let resp = resp.map_err(|e| body_timeout.explain(e))?;
    state
        .credentials
        .after_answer(resp.status(), route, secret.as_deref());
    // Loaded after the credential stage, so a value held for this request is in it.
    let redactor = state.credentials.redactor();
    forward::passable(&resp, &redactor, &route.upstream.host)?;
    Ok(Answer::Upstream(Upstream {
        resp,
        redactor,
        request_redacted,
        route: route_id,
        reservation,
        strip_usage_chunk: plan.strip_usage_chunk,
        hold,
    }))
}

/// The request body as it goes upstream.
enum RequestBody {
    /// Read whole: the lab's JSON check, dry-run, a scan that refuses, or a budgeted agent's
    /// request (its booking depends on the body).
    Whole(Bytes),
    /// Streamed through the scan's redactor, counting the bytes that passed.
    Streamed(Body, Arc<AtomicU64>),
}

/// The scan stage: the URL and headers now; the body whole where policy needs all of it, else
/// as it streams (`whole` asks for all of it). The body is re-framed, so its length is hyper's
/// to set. Also says whether anything was redacted.
// Each is borrowed on its own: the record is written while the head and body are read.
#[allow(clippy::too_many_arguments)]
async fn request_body(
    config: &Config,
    scanner: &Arc<redact::Redactor>,
    route: &Route,
    pending: &mut Pending,
    head: &mut Parts,
    target: &scan::Target,
    body: timeout::ReadTimeout<Incoming>,
    whole: bool,
    body_read: &mut bool,
) -> Result<(RequestBody, bool), Rejection> {
    let mode = route.request_scan;
    let scanner = (mode != RequestScan::Off).then_some(scanner);
    let mut redacted = match &scanner {
        Some(scanner) => scan::head(scanner, mode, head, target, pending)?,
        None => false,
    };
    head.headers.remove(header::CONTENT_LENGTH);
    let limit = config.max_request_bytes;
    let form = guard::is_form(&head.headers);
    if whole || form || route.require_json || config.mode == Mode::DryRun || mode.refuses() {
        let probe = body.probe();
        let mut bytes = guard::read_body(body, limit)
            .await
            .map_err(|e| probe.explain(e))?;
        // Read whole: a refusal from here on leaves the connection reusable.
        *body_read = true;
        pending.record().bytes_in = bytes.len() as u64;
        if route.require_json {
            guard::check_json(&bytes)?;
        }
        // A body that is not a form has no field to check (`form` read the headers as they
        // still are).
        if form {
            guard::check_form_override(head, &bytes)?;
        }
        if let Some(scanner) = &scanner {
            let body_redacted;
            (bytes, body_redacted) = scan::body(scanner, mode, bytes, pending).await?;
            redacted |= body_redacted;
        }
        return Ok((RequestBody::Whole(bytes), redacted));
    }
    let count = Arc::new(AtomicU64::new(0));
    let body = RedactingBody::new(
        body,
        scanner.map(|s| s.clone().stream()),
        CountIn(count.clone()),
    )
    .limit(limit)
    .map_err(Into::into)
    .boxed();
    Ok((RequestBody::Streamed(body, count), redacted))
}

/// redact + audit on the way back: headers are redacted now, the body chunk by chunk as it
/// streams, and the audit record is finished when the body ends (or is abandoned).
fn returning(
    state: &Arc<State>,
    up: Upstream,
    mut pending: Pending,
    start: Instant,
    closer: Option<timeout::Closer>,
) -> Response<Body> {
    let r = pending.record();
    r.decision = Decision::Allow;
    r.reason = if up.request_redacted {
        Reason::AllowedRequestRedacted
    } else {
        Reason::Allowed
    };
    r.status = up.resp.status().as_u16();
    let bodiless = r.method == "HEAD" || matches!(r.status, 204 | 304);
    let redactor = up.redactor;
    let (mut head, body) = up.resp.into_parts();
    let meter = Meter::new(head.status, &head.headers, up.reservation);
    guard::strip_hop_by_hop(&mut head.headers);
    redact::response_head(&redactor, &mut head);
    if bodiless {
        // No body will be polled: the record is complete now.
        r.tokens = meter.settle(true);
        r.latency_ms = audit::ms(start);
        pending.finish();
        return Response::from_parts(head, full(Bytes::new()));
    }
    let stream = (!redactor.is_empty()).then(|| {
        // Redaction may change the length; the body goes out chunked instead.
        head.headers.remove(header::CONTENT_LENGTH);
        redactor.response_stream(&head.headers)
    });
    let route = &state.config.routes[up.route];
    let watch = timeout::ResponseWatch::start(route.timeout, route.max_response_time, closer);
    let finishing = Finishing::new(pending, start, Some(meter)).watched(watch.verdict_handle());
    let body = RedactingBody::new(body, stream, finishing)
        .idle_timeout(route.timeout)
        .map_err(forward::BoxError::from);
    let body = if up.strip_usage_chunk && head.status.is_success() {
        head.headers.remove(header::CONTENT_LENGTH);
        watch.wrap(StripUsageChunk::new(body)).boxed()
    } else {
        watch.wrap(body).boxed()
    };
    let body = match up.hold {
        Some(hold) => credential::HeldBody::new(body, Some(hold)).boxed(),
        None => body,
    };
    Response::from_parts(head, body)
}

/// Counts the request bytes that streamed upstream, for the audit record.
struct CountIn(Arc<AtomicU64>);

impl Observer for CountIn {
    fn data(&mut self, data: &[u8]) {
        self.0.fetch_add(data.len() as u64, Ordering::Relaxed);
    }

    fn end(&mut self, _: End, _: u64, _: u64) {}
}

fn full(b: Bytes) -> Body {
    Full::new(b)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Whether `value` is `len` in decimal as hyper writes it (no sign, no leading zero).
fn states_length(value: &[u8], len: usize) -> bool {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = len;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    value == &digits[at..]
}

const REQUEST_ID_LEN: usize = 4 + 24;

/// `req_` + 24 hex digits: a request's id in its record, its answer and its errors.
pub(crate) fn new_request_id() -> String {
    use rand::Rng;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n: u128 = rand::rng().random::<u128>() >> 32;
    // Sized exactly, so the id is one allocation and the `x-request-id` header takes it over;
    // written digit by digit (`{:024x}` goes through the formatting machinery).
    let mut id = String::with_capacity(REQUEST_ID_LEN);
    id.push_str("req_");
    for shift in (0..24).rev() {
        id.push(char::from(HEX[((n >> (shift * 4)) & 0xf) as usize]));
    }
    id
}

/// Names the caller's run in the record (the run's person and id) and refuses a frozen agent:
/// what every entry point does once it knows who calls (the reverse proxy here, CONNECT in
/// `proxy`).
pub(crate) fn admit(
    state: &State,
    record: &mut Record,
    who: &authenticate::Identity,
) -> Result<(), Rejection> {
    record.token_id = who.token_id.clone();
    if let Some(run) = who
        .token_id
        .as_deref()
        .and_then(|t| state.control.runs.get(t))
    {
        record.person = Some(run.person.into());
        record.run_id = Some(run.run_id);
    }
    state
        .control
        .check_frozen(Some(&state.config.agents[who.agent].name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_ids_are_req_and_24_hex_digits() {
        let id = new_request_id();
        assert_eq!(id.len(), REQUEST_ID_LEN);
        assert!(id.starts_with("req_"));
        assert!(id[4..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(new_request_id(), id);
    }

    proptest! {
        /// The agent's `Content-Length` is kept only when it spells the body's length the way
        /// hyper would: a sign, a leading zero or another number is not the same value.
        #[test]
        fn content_length_is_reused_only_when_it_spells_the_length(
            len in 0usize..1_000_000,
            other in 0usize..1_000_000,
        ) {
            prop_assert!(states_length(len.to_string().as_bytes(), len));
            prop_assert_eq!(states_length(other.to_string().as_bytes(), len), other == len);
            let plus = format!("+{len}");
            let zero = format!("0{len}");
            let spaced = format!("{len} ");
            prop_assert!(!states_length(plus.as_bytes(), len));
            prop_assert!(!states_length(zero.as_bytes(), len));
            prop_assert!(!states_length(spaced.as_bytes(), len));
            prop_assert!(!states_length(b"", len));
        }
    }
}
