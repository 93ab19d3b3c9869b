//! The path of a request, top to bottom: `guard` → `authenticate` → `route` → `authorize` →
//! `credential` → `forward` → `redact` → `audit`. Each stage is a call in [`process`]; a reader
//! finds any behaviour by following it.
//!
//! Architecture invariants enforced here:
//! - every request gets exactly one audit record: an [`audit::Pending`] is created before the
//!   first check and travels with the request, into the response body when it streams;
//! - nothing is forwarded while the audit log is failing (503 `audit_unavailable`);
//! - response headers and every body chunk pass through the redactor built from held secrets.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::audit::{self, AuditLog, PeerRecord, Pending, Record};
use crate::authenticate::{self, Tokens};
use crate::authorize::Policy;
use crate::config::{Config, Format, Mode, RequestScan, Route};
use crate::credential::{self, Credentials};
use crate::error::{json_response, Rejection};
use crate::forward::{Body, BodyLimit, BoxError, Forwarder};
use crate::guard::{self, Guard, Peer};
use crate::redact::{Redactor, StreamRedactor};
use crate::route;

/// Everything a request needs, built once at start-up.
pub struct State {
    pub config: Arc<Config>,
    pub policy_version: String,
    pub guard: Guard,
    pub tokens: Tokens,
    pub policy: Policy,
    pub credentials: Credentials,
    pub forwarder: Forwarder,
    pub audit: Arc<AuditLog>,
    /// The person behind agents that name none: the user keygate runs as.
    pub default_person: Option<String>,
    /// Listener URLs, for `/healthz`.
    pub listen_urls: Vec<String>,
    pub listen_port: u16,
}

/// Serves one request. Never fails: every outcome is an HTTP answer with one audit record.
pub async fn handle(
    state: Arc<State>,
    peer: Arc<Peer>,
    listener: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let request_id = new_request_id();
    let (head, body) = req.into_parts();
    let is_head = head.method == Method::HEAD;
    let mut pending = state.audit.begin(Record {
        time: audit::now_rfc3339(),
        request_id: request_id.clone(),
        method: head.method.to_string(),
        path: head.uri.path().chars().take(2048).collect(),
        policy_version: state.policy_version.clone(),
        listener: listener.to_string(),
        peer: match &*peer {
            Peer::Unix { uid, pid } => Some(PeerRecord {
                uid: *uid,
                pid: *pid,
            }),
            Peer::Tcp(_) => None,
        },
        person: state.default_person.clone(),
        ..Record::default()
    });

    // An HTTP/1 request refused before its body was read leaves that body on the connection;
    // hyper then closes it, and a pooled client must be told so rather than find out on reuse.
    let http1_with_body = head.version < http::Version::HTTP_2 && !body.is_end_stream();
    let mut body_read = false;
    let mut resp = match process(&state, &peer, &mut pending, head, body, &mut body_read).await {
        Ok(Answer::Local(resp, decision, reason)) => {
            let r = pending.record();
            r.decision = decision;
            r.reason = reason.into();
            r.status = resp.status().as_u16();
            r.bytes_out = resp.body().len() as u64;
            r.latency_ms = ms(start);
            pending.finish();
            resp.map(full)
        }
        Ok(Answer::Upstream {
            request_redacted,
            resp,
            redactor,
            idle,
            tokens_agent,
        }) => {
            let r = pending.record();
            r.decision = "allow";
            r.reason = if request_redacted {
                "allowed_request_redacted"
            } else {
                "allowed"
            }
            .into();
            r.status = resp.status().as_u16();
            if is_head || matches!(r.status, 204 | 304) {
                // No body will be polled: the record is complete now.
                r.latency_ms = ms(start);
                pending.finish();
                let (mut parts, _) = resp.into_parts();
                guard::strip_hop_by_hop(&mut parts.headers);
                redact_headers(&redactor, &mut parts.headers);
                Response::from_parts(parts, full(Bytes::new()))
            } else {
                returning(&state, resp, redactor, idle, pending, start, tokens_agent)
            }
        }
        Err(rejection) => {
            let r = pending.record();
            r.decision = "deny";
            r.reason = rejection.code.into();
            r.status = rejection.status.as_u16();
            r.blame = Some(rejection.blame);
            r.latency_ms = ms(start);
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
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    Ok(resp)
}

enum Answer {
    /// Answered by keygate itself (health, dry-run).
    Local(Response<Bytes>, &'static str, &'static str),
    /// The upstream's answer, body still streaming.
    Upstream {
        request_redacted: bool,
        resp: Response<Incoming>,
        redactor: Arc<Redactor>,
        idle: Duration,
        tokens_agent: Option<usize>,
    },
}

async fn process(
    state: &State,
    peer: &Peer,
    pending: &mut Pending,
    mut head: Parts,
    body: Incoming,
    body_read: &mut bool,
) -> Result<Answer, Rejection> {
    let config = &*state.config;

    // guard
    state.guard.check(&head, peer)?;
    guard::strip_hop_by_hop(&mut head.headers);
    if !state.audit.healthy() && config.audit_fail_closed {
        return Err(Rejection::unavailable(
            "audit_unavailable",
            "the audit log cannot be written; requests are refused until it can",
        ));
    }
    if head.uri.path() == "/healthz" && (head.method == Method::GET || head.method == Method::HEAD)
    {
        return Ok(Answer::Local(healthz(state), "allow", "healthz"));
    }

    // authenticate
    let agent = state.tokens.authenticate(&head.headers)?;
    authenticate::strip_caller_credentials(&mut head.headers);
    let a = &config.agents[agent];
    {
        let r = pending.record();
        r.agent = Some(a.name.clone());
        if a.person.is_some() {
            r.person = a.person.clone();
        }
    }

    // route
    let routed = route::select(&config.routes, head.uri.path())?;
    let route: &Route = &config.routes[routed.route];
    {
        let r = pending.record();
        r.route = Some(route.name.clone());
        r.destination = Some(route.upstream.host.clone());
        r.classification = Some(route.classification.clone());
        r.key_id = config.secret_of(route).map(|s| s.name.clone());
    }
    if config.format == Format::Seed && head.method != Method::POST {
        // The lab broker answered only POST (and GET /healthz); keep its 403 for other methods.
        return Err(Rejection::forbidden(
            "path_not_allowed",
            format!("{} {} is not allowed", head.method, routed.path),
        ));
    }

    // authorize
    let authorized = state
        .policy
        .authorize(config, agent, &head.method, routed)?;

    // The body: buffered only where policy needs all of it (the lab's JSON check, dry-run's
    // echo); otherwise streamed with a running limit.
    let limit = config.max_request_bytes;
    let body_limit = BodyLimit {
        max: limit,
        exceeded: Arc::new(AtomicBool::new(false)),
    };
    let bytes_in = Arc::new(AtomicU64::new(0));
    // The request exfiltration scan: an agent's request must not carry a secret keygate holds
    // or anything shaped like a credential. Refusing needs the whole body before forwarding;
    // redacting works on the stream.
    let scan = route.request_scan;
    let scanner = (scan != RequestScan::Off).then(|| state.credentials.scanner());
    let mut request_redacted = false;
    if let Some(scanner) = &scanner {
        // The URL cannot be redacted without changing what was authorized: refused in both modes.
        if let Some(pq) = head.uri.path_and_query() {
            refuse_findings(scanner, pq.as_str().as_bytes(), "URL")?;
        }
        request_redacted |= scan_headers(scanner, scan, &mut head.headers)?;
        // A compressed body would hide what it carries from the scan.
        if let Some(enc) = head.headers.get(header::CONTENT_ENCODING) {
            if !enc.as_bytes().eq_ignore_ascii_case(b"identity") {
                return Err(Rejection::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "request_encoding_not_scannable",
                    "a Content-Encoding'd request body cannot be scanned for credentials; send it uncompressed",
                ));
            }
        }
    }
    // The body is re-framed below, so its length is hyper's to set (from an exact size, or
    // chunked when redaction may change it).
    head.headers.remove(header::CONTENT_LENGTH);

    let needs_whole_body =
        route.require_json || config.mode == Mode::DryRun || scan == RequestScan::Refuse;
    let (body, whole): (Body, Option<Bytes>) = if needs_whole_body {
        let mut bytes = collect_limited(body, limit).await?;
        *body_read = true;
        pending.record().bytes_in = bytes.len() as u64;
        if route.require_json
            && !bytes.is_empty()
            && serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err()
        {
            return Err(Rejection::bad_request(
                "invalid_json",
                "the request body is not valid JSON",
            ));
        }
        if let Some(scanner) = &scanner {
            if scan == RequestScan::Refuse {
                refuse_findings(scanner, &bytes, "body")?;
            } else if let std::borrow::Cow::Owned(clean) = scanner.redact(&bytes) {
                bytes = Bytes::from(clean);
                request_redacted = true;
            }
        }
        (full(bytes.clone()), Some(bytes))
    } else {
        let limited = Limited {
            inner: body,
            seen: 0,
            limit,
            too_large: body_limit.exceeded.clone(),
            counter: bytes_in.clone(),
            redactor: scanner.map(|s| s.stream()),
            ended: false,
        };
        (limited.boxed(), None)
    };

    if config.mode == Mode::DryRun {
        return Ok(Answer::Local(
            dry_run(
                state,
                &authorized,
                &head,
                whole.as_deref().unwrap_or_default(),
            ),
            "dry_run",
            "dry_run",
        ));
    }

    // credential
    let secret = state.credentials.get(route).await?;
    let mut query = head.uri.query().map(str::to_string);
    if let Some(secret) = &secret {
        pending.record().key_id = Some(secret.key_id().to_string());
        credential::attach(&authorized, route, secret, &mut head.headers, &mut query)?;
    }

    // forward
    let resp = state
        .forwarder
        .send(authorized, route, head, query.as_deref(), body, &body_limit)
        .await;
    if whole.is_none() {
        pending.record().bytes_in = bytes_in.load(Ordering::Relaxed);
    }
    let resp = resp?;
    if resp.status() == StatusCode::UNAUTHORIZED {
        if let (Some(id), Some(secret)) = (route.secret, &secret) {
            // The key may have been rotated at its source: fetch afresh for the next request.
            state.credentials.invalidate(id, secret.key_id());
        }
    }
    // keygate asks for `identity`; an upstream (or a proxy before it) that compresses anyway
    // would hide a secret from the redactor, so its answer is not passed on.
    let redactor = state.credentials.redactor();
    if let Some(enc) = resp.headers().get(header::CONTENT_ENCODING) {
        if !redactor.is_empty() && !enc.as_bytes().eq_ignore_ascii_case(b"identity") {
            return Err(Rejection::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unredactable",
                format!(
                    "upstream {} answered with a {}-encoded body, which keygate cannot scan for secrets",
                    route.upstream.host,
                    enc.to_str().unwrap_or("compressed")
                ),
            ));
        }
    }
    let tokens_agent = config.agents[agent].budget.as_ref().map(|_| agent);
    Ok(Answer::Upstream {
        request_redacted,
        resp,
        redactor,
        idle: route.timeout,
        tokens_agent,
    })
}

fn redact_headers(redactor: &Redactor, headers: &mut http::HeaderMap) {
    if redactor.is_empty() {
        return;
    }
    for v in headers.values_mut() {
        if let std::borrow::Cow::Owned(clean) = redactor.redact(v.as_bytes()) {
            *v = HeaderValue::from_bytes(&clean)
                .unwrap_or_else(|_| HeaderValue::from_static("[REDACTED]"));
        }
    }
}

/// redact + audit on the way back: headers are redacted now, the body chunk by chunk as it
/// streams, and the audit record is written when the body ends (or is abandoned).
fn returning(
    state: &Arc<State>,
    resp: Response<Incoming>,
    redactor: Arc<Redactor>,
    idle: Duration,
    pending: Pending,
    start: Instant,
    tokens_agent: Option<usize>,
) -> Response<Body> {
    let (mut head, body) = resp.into_parts();
    guard::strip_hop_by_hop(&mut head.headers);
    let stream = if redactor.is_empty() {
        None
    } else {
        redact_headers(&redactor, &mut head.headers);
        // Redaction may change the length; the body goes out chunked instead.
        head.headers.remove(header::CONTENT_LENGTH);
        Some(redactor.stream())
    };
    let body = Returning {
        inner: body,
        redactor: stream,
        idle,
        timer: Box::pin(tokio::time::sleep(idle)),
        pending: Some(pending),
        bytes_out: 0,
        start,
        usage: tokens_agent.map(|a| (a, UsageScan::default())),
        state: state.clone(),
        done: false,
    };
    Response::from_parts(head, body.boxed())
}

struct Returning {
    inner: Incoming,
    redactor: Option<StreamRedactor>,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    pending: Option<Pending>,
    bytes_out: u64,
    start: Instant,
    usage: Option<(usize, UsageScan)>,
    state: Arc<State>,
    done: bool,
}

impl Returning {
    fn finish(&mut self, reason: Option<&'static str>) {
        self.done = true;
        if let Some(mut p) = self.pending.take() {
            let r = p.record();
            r.bytes_out = self.bytes_out;
            r.latency_ms = ms(self.start);
            if let Some((agent, scan)) = &self.usage {
                if let Some(t) = scan.total() {
                    r.tokens = Some(t);
                    self.state.policy.record_tokens(*agent, t);
                }
            }
            if let Some(reason) = reason {
                r.reason = reason.into();
                r.decision = "allow";
            }
            p.finish();
        }
    }
}

impl HttpBody for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    if this.timer.as_mut().poll(cx).is_ready() {
                        this.finish(Some("upstream_idle_timeout"));
                        return Poll::Ready(Some(Err(
                            "upstream sent nothing within the idle timeout".into(),
                        )));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.timer.as_mut().reset(deadline);
                    let Ok(data) = frame.into_data() else {
                        continue;
                    }; // trailers are not forwarded
                    if let Some((_, scan)) = &mut this.usage {
                        scan.feed(&data);
                    }
                    let Some(out) = through(&mut this.redactor, data) else {
                        continue;
                    };
                    this.bytes_out += out.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.finish(Some("upstream_body_error"));
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(None) => {
                    let rest = rest(&mut this.redactor);
                    this.bytes_out += rest.as_ref().map_or(0, |r| r.len() as u64);
                    this.finish(None);
                    return Poll::Ready(rest.map(|r| Ok(Frame::data(r))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.redactor.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if self.pending.is_some() {
            self.finish(Some("client_disconnected"));
        }
    }
}

/// Passes a chunk through the stream redactor, if there is one; `None` when all of it is held
/// back because it could still be the start of a secret.
fn through(redactor: &mut Option<StreamRedactor>, data: Bytes) -> Option<Bytes> {
    let out = match redactor {
        Some(r) => r.push(&data),
        None => data,
    };
    (!out.is_empty()).then_some(out)
}

/// What the stream redactor still holds at the end of the body.
fn rest(redactor: &mut Option<StreamRedactor>) -> Option<Bytes> {
    redactor
        .take()
        .map(|r| r.finish())
        .filter(|b| !b.is_empty())
}

/// Finds the token usage an upstream reports (`total_tokens`, or `input_tokens` +
/// `output_tokens`), in JSON or SSE, without parsing the body: the largest value seen of each.
#[derive(Default)]
struct UsageScan {
    total: u64,
    input: u64,
    output: u64,
    tail: Vec<u8>,
}

impl UsageScan {
    fn feed(&mut self, data: &[u8]) {
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(data);
        for (key, slot) in [
            (&b"\"total_tokens\":"[..], 0),
            (b"\"input_tokens\":", 1),
            (b"\"output_tokens\":", 2),
        ] {
            for at in memchr::memmem::find_iter(&buf, key) {
                let digits = buf[at + key.len()..]
                    .iter()
                    .skip_while(|b| **b == b' ')
                    .take_while(|b| b.is_ascii_digit());
                let n = digits.fold(0u64, |n, d| {
                    n.saturating_mul(10).saturating_add((d - b'0') as u64)
                });
                let s = match slot {
                    0 => &mut self.total,
                    1 => &mut self.input,
                    _ => &mut self.output,
                };
                *s = (*s).max(n);
            }
        }
        let keep = buf.len().saturating_sub(32);
        self.tail = buf.split_off(keep);
    }

    fn total(&self) -> Option<u64> {
        let t = self.total.max(self.input + self.output);
        (t > 0).then_some(t)
    }
}

/// Refuses when the scanner finds anything, naming what was found (labels, never values).
fn refuse_findings(scanner: &Redactor, bytes: &[u8], place: &str) -> Result<(), Rejection> {
    let found = scanner.find(bytes);
    if found.is_empty() {
        return Ok(());
    }
    let mut labels: Vec<&str> = found.iter().map(|f| f.label.as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    Err(Rejection::forbidden(
        "secret_in_request",
        format!(
            "the request {place} holds a credential ({}); keygate attaches credentials itself, so remove it from the request",
            labels.join(", ")
        ),
    ))
}

/// Scans header values; returns whether any was redacted.
fn scan_headers(
    scanner: &Redactor,
    scan: RequestScan,
    headers: &mut http::HeaderMap,
) -> Result<bool, Rejection> {
    let mut redacted = false;
    for name in headers.keys() {
        refuse_findings(scanner, name.as_str().as_bytes(), "header name")?;
    }
    for (name, value) in headers.iter_mut() {
        if scan == RequestScan::Refuse {
            refuse_findings(scanner, value.as_bytes(), &format!("header {name}"))?;
        } else if let std::borrow::Cow::Owned(clean) = scanner.redact(value.as_bytes()) {
            *value = HeaderValue::from_bytes(&clean)
                .unwrap_or_else(|_| HeaderValue::from_static("[REDACTED]"));
            redacted = true;
        }
    }
    Ok(redacted)
}

/// The request body with a running size limit (exceeding it aborts the upstream request) and,
/// when the route redacts requests, the stream redactor.
struct Limited {
    inner: Incoming,
    seen: u64,
    limit: u64,
    too_large: Arc<AtomicBool>,
    counter: Arc<AtomicU64>,
    redactor: Option<StreamRedactor>,
    ended: bool,
}

impl HttpBody for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    }; // no trailers upstream
                    this.seen += data.len() as u64;
                    this.counter.store(this.seen, Ordering::Relaxed);
                    if this.seen > this.limit {
                        this.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err("request body over the limit".into())));
                    }
                    let Some(out) = through(&mut this.redactor, data) else {
                        continue;
                    };
                    Poll::Ready(Some(Ok(Frame::data(out))))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => {
                    this.ended = true;
                    Poll::Ready(rest(&mut this.redactor).map(|r| Ok(Frame::data(r))))
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.redactor.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.redactor.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

async fn collect_limited(body: Incoming, limit: u64) -> Result<Bytes, Rejection> {
    let limited = http_body_util::Limited::new(body, limit as usize);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Rejection::too_large(limit)),
        Err(_) => Err(Rejection::bad_request(
            "bad_request",
            "the request body could not be read",
        )),
    }
}

fn healthz(state: &State) -> Response<Bytes> {
    let c = &*state.config;
    let v = match &c.seed {
        Some(seed) => serde_json::json!({
            "ok": true,
            "listen": {"host": seed.listen_host, "port": state.listen_port},
            "mode": c.mode,
            "upstream_base_url": seed.upstream_base_url,
            "allowed_paths": seed.allowed_paths,
            "client_auth": seed.client_auth,
            "secret_source": seed.secret_source,
            "audit": state.audit.healthy(),
            "policy_version": state.policy_version,
        }),
        None => {
            let routes: serde_json::Map<String, serde_json::Value> = c
                .routes
                .iter()
                .map(|r| {
                    let source = c.secret_of(r).map(|s| s.source.label()).unwrap_or_else(|| "none".into());
                    (r.name.clone(), serde_json::json!({"prefix": r.prefix, "upstream": r.upstream.url, "secret_source": source, "allow": r.allow}))
                })
                .collect();
            serde_json::json!({
                "ok": true,
                "listen": state.listen_urls,
                "mode": c.mode,
                "routes": routes,
                "client_auth": true,
                "audit": state.audit.healthy(),
                "policy_version": state.policy_version,
            })
        }
    };
    json_response(StatusCode::OK, Bytes::from(v.to_string()))
}

/// What would have been sent, with the credential named by its id; no secret is fetched.
fn dry_run(
    state: &State,
    authorized: &crate::authorize::Authorized,
    head: &Parts,
    body: &[u8],
) -> Response<Bytes> {
    let c = &*state.config;
    let route = &c.routes[authorized.route()];
    let up = &route.upstream;
    let base = up.url.trim_end_matches('/');
    let mut url = format!("{base}{}", authorized.raw_path());
    if let Some(q) = head.uri.query() {
        url.push('?');
        url.push_str(q);
    }
    let secret = c.secret_of(route);
    let source = secret.map(|s| s.source.clone());
    let label = source
        .as_ref()
        .map(|s| s.label())
        .unwrap_or_else(|| "none".into());
    let attaches = source.as_ref().is_some_and(|s| !s.is_none());
    let parsed: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let stream = parsed
        .get("stream")
        .and_then(|s| s.as_bool())
        .unwrap_or(false);
    let mut headers: Vec<&str> = head.headers.keys().map(|k| k.as_str()).collect();
    headers.sort_unstable();
    let answer = serde_json::json!({
        "ok": true,
        "mode": "dry_run",
        "forward": {
            "url": url,
            "method": head.method.as_str(),
            "path": authorized.raw_path(),
            "route": route.name,
            "secret_source": label,
            "key_id": secret.map(|s| &s.name),
            "inject": if attaches { serde_json::to_value(&route.inject).unwrap_or_default() } else { serde_json::Value::Null },
            "would_attach_bearer_token": attaches && route.inject == crate::config::Inject::Bearer,
            "would_attach_credential": attaches,
            "headers": headers,
        },
        "request": parsed,
        "request_bytes": body.len(),
    });
    if stream {
        let text = format!("data: {answer}\n\ndata: [DONE]\n\n");
        let mut resp = Response::new(Bytes::from(text));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return resp;
    }
    json_response(StatusCode::OK, Bytes::from(answer.to_string()))
}

fn full(b: Bytes) -> Body {
    Full::new(b)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn ms(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

fn new_request_id() -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("req_{:024x}", n >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_found_across_chunks_in_json_and_sse() {
        let mut s = UsageScan::default();
        s.feed(b"data: {\"usage\":{\"prompt_tokens\":5,\"total_to");
        s.feed(b"kens\": 42}}\n\n");
        assert_eq!(s.total(), Some(42));
        let mut a = UsageScan::default();
        a.feed(br#"event: message_start\ndata: {"usage":{"input_tokens":10,"output_tokens":1}}"#);
        a.feed(br#"event: message_delta\ndata: {"usage":{"output_tokens":15}}"#);
        assert_eq!(a.total(), Some(25));
    }
}
