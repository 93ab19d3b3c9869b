//! Upstream connection affinity: an HTTP/1.1 downstream connection keeps one upstream HTTP/1.1
//! connection for as long as both live.
//!
//! Requests on an HTTP/1.1 downstream connection are sequential, so the upstream connection
//! bound to it is always free when the next one comes: no pool lookup, no dispatch task, no lock
//! per request beyond the connection's own. The first request checks an idle connection out of
//! [`Pool`] (or handshakes one, TCP and TLS included); the connection goes back to the pool when
//! the downstream connection closes, only if it is idle and reusable (an upstream connection
//! with an unfinished body, an upgrade or an error is dropped, which closes it). So one upstream
//! connection serves one downstream connection at a time: callers are never mixed on it, and
//! each request carries its own headers (the credential is attached per request).
//!
//! The exchange itself is keygate's own HTTP/1.1 client ([`super::h1`]): no dispatcher task or
//! driver, the answer's body reads from the socket when the downstream side polls it, and the
//! connection comes back here when the body ends.
//!
//! An upstream that negotiates h2 (ALPN) is remembered and served by the pooled client instead.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Frame, SizeHint};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tower_service::Service;

use super::h1::{self, Conn, Decoded, Decoder};
use super::{Body, BoxError};
use crate::lock;

/// Which upstream a connection talks to.
pub(super) type Key = (Scheme, Authority);

/// How long an idle upstream connection stays in the pool.
const IDLE_FOR: Duration = Duration::from_secs(60);
/// How often the pool looks for idle connections the upstream closed (nothing reads them while
/// they wait, so their sockets would otherwise stay open until the next checkout).
const SWEEP_EVERY: Duration = Duration::from_secs(15);
/// Idle connections kept per upstream.
const IDLE_PER_UPSTREAM: usize = 256;

/// A downstream connection's upstream connection, if it has one yet. `listen` makes one per
/// HTTP/1 downstream connection and hands a clone to each of its requests (`pipeline::Conn`);
/// when the downstream connection ends ([`Host`] dropped), or the last clone is dropped, the
/// upstream connection goes back to its pool.
#[derive(Clone, Default)]
pub struct Affinity(Arc<Slot>);

#[derive(Default)]
struct Slot {
    held: Mutex<Held>,
    /// The deadline of the request in flight ([`Affinity::within`]), kept between requests.
    timer: Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
}

#[derive(Default)]
struct Held {
    conn: Option<(Arc<Pool>, Key, Box<Conn>)>,
    /// The downstream connection ended: a connection whose answer ends later goes to the pool.
    released: bool,
}

/// A request bounded by [`Affinity::within`] did not finish in time.
pub(super) struct TimedOut;

/// The downstream connection task's side of an [`Affinity::hosted`]. Dropped (the connection
/// ended), it returns the idle upstream connection to its pool; one still carrying an answer
/// goes there when the answer ends.
pub struct Host(Affinity);

impl Affinity {
    /// An affinity whose upstream connection is released when the returned [`Host`] drops.
    pub fn hosted() -> (Affinity, Host) {
        let a = Affinity::default();
        (a.clone(), Host(a))
    }

    /// `fut` bounded by `limit`, as `tokio::time::timeout` bounds it, on a timer the connection
    /// keeps: requests on an HTTP/1 connection are sequential, so each re-arms the previous one's
    /// timer to a later deadline (tokio extends a registered timer without touching its wheel)
    /// instead of making one, registering it and removing it again per request.
    ///
    /// `fut` comes pinned by the caller: the request's future is large, and taking it by value
    /// moved it once more (into this future, then into the `select!`) than `timeout` did.
    pub(super) async fn within<F: Future>(
        &self,
        limit: Duration,
        fut: Pin<&mut F>,
    ) -> Result<F::Output, TimedOut> {
        let now = tokio::time::Instant::now();
        // As `timeout` does for a limit past the clock's range: practically never.
        let deadline = now
            .checked_add(limit)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
        let taken = lock(&self.0.timer).take();
        let mut timer = match taken {
            Some(mut t) => {
                t.as_mut().reset(deadline);
                t
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let out = tokio::select! {
            biased;
            out = fut => Ok(out),
            // Outside the task's budget, as `tokio::time::timeout` polls its delay: a request
            // that used the budget up must not postpone its own deadline.
            () = tokio::task::unconstrained(timer.as_mut()) => Err(TimedOut),
        };
        *lock(&self.0.timer) = Some(timer);
        out
    }

    /// Takes the bound connection if it talks to `key` through `pool`; one bound elsewhere (a
    /// request to another upstream, or a reload made a new pool) goes back to its pool.
    fn take(&self, pool: &Arc<Pool>, key: &Key) -> Option<Box<Conn>> {
        let (p, k, conn) = lock(&self.0.held).conn.take()?;
        if Arc::ptr_eq(&p, pool) && k == *key {
            return Some(conn);
        }
        Pool::put(&p, k, conn);
        None
    }

    /// A connection whose answer ended cleanly: kept for the downstream connection's next
    /// request, or pooled when that connection has gone.
    fn give_back(&self, pool: Arc<Pool>, key: Key, conn: Box<Conn>) {
        let mut held = lock(&self.0.held);
        if held.released {
            drop(held);
            Pool::put(&pool, key, conn);
            return;
        }
        let old = held.conn.replace((pool, key, conn));
        drop(held);
        if let Some((p, k, c)) = old {
            Pool::put(&p, k, c);
        }
    }

    /// Returns the bound connection to its pool; later ones go there directly.
    fn release(&self) {
        let old = {
            let mut held = lock(&self.0.held);
            held.released = true;
            held.conn.take()
        };
        if let Some((p, k, c)) = old {
            Pool::put(&p, k, c);
        }
    }
}

impl Host {
    /// Polls `conn` (the downstream connection). The upstream connection needs no polling of
    /// its own: its answer is read when the downstream side polls the body.
    pub fn poll_with<F: Future + ?Sized>(
        &self,
        cx: &mut Context<'_>,
        conn: Pin<&mut F>,
    ) -> Poll<F::Output> {
        conn.poll(cx)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let held = match self.held.get_mut() {
            Ok(h) => h.conn.take(),
            Err(p) => p.into_inner().conn.take(),
        };
        if let Some((p, k, c)) = held {
            Pool::put(&p, k, c);
        }
    }
}

/// An idle connection and when it became idle.
struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

impl Idle {
    fn usable(&mut self) -> bool {
        self.since.elapsed() < IDLE_FOR && self.conn.is_open()
    }
}

/// Idle HTTP/1.1 upstream connections, most recently used last, per runtime thread (a
/// connection's socket is served by the runtime that opened it, so another thread using it would
/// be woken across threads).
///
/// foldhash, not SipHash: `Authority` hashes byte by byte (case-folded), which SipHash made
/// ~1,100 instructions per lookup, paid twice by every fresh downstream connection (checkout,
/// put). The keys are the routes' upstreams, not agent-chosen.
#[derive(Default)]
pub(super) struct Pool {
    idle: Mutex<HashMap<(usize, Key), Vec<Idle>, foldhash::fast::RandomState>>,
    /// Upstreams that chose h2 in ALPN: the pooled client multiplexes those.
    h2: Mutex<HashSet<Key, foldhash::fast::RandomState>>,
    sweeping: std::sync::atomic::AtomicBool,
}

impl Pool {
    fn checkout(&self, key: &Key) -> Option<Box<Conn>> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(&(crate::runtime::worker(), key.clone()))?;
        while let Some(mut i) = list.pop() {
            if i.usable() {
                return Some(i.conn);
            }
        }
        None
    }

    /// Keeps a connection only while it is open; dropping one closes it.
    fn put(this: &Arc<Pool>, key: Key, mut conn: Box<Conn>) {
        if !conn.is_open() {
            return;
        }
        let mut idle = lock(&this.idle);
        let list = idle.entry((crate::runtime::worker(), key)).or_default();
        list.retain(|i| i.since.elapsed() < IDLE_FOR);
        if list.len() < IDLE_PER_UPSTREAM {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
            drop(idle);
            this.start_sweeping();
        }
    }

    /// Starts the task that closes idle connections the upstream closed or that waited too long;
    /// it ends with the pool (a reload makes a new one).
    fn start_sweeping(self: &Arc<Pool>) {
        use std::sync::atomic::Ordering;
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.sweeping.store(false, Ordering::Release);
            return;
        };
        let weak: Weak<Pool> = Arc::downgrade(self);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(pool) = weak.upgrade() else { return };
                let mut idle = lock(&pool.idle);
                for list in idle.values_mut() {
                    list.retain_mut(Idle::usable);
                }
                idle.retain(|_, l| !l.is_empty());
            }
        });
    }

    pub(super) fn is_h2(&self, key: &Key) -> bool {
        lock(&self.h2).contains(key)
    }
}

/// Why an affine send did not produce an answer.
pub(super) enum Failed {
    /// The upstream chose h2: send this request through the pooled client.
    H2(Box<Request<Body>>),
    /// Connecting failed (TCP, TLS, or the connect timeout).
    Connect(BoxError),
    /// The request failed on an open connection.
    Request(BoxError),
}

/// Sends `req` (origin-form URI, `Host` set) on the connection bound to `affinity`, else on one
/// from the pool, else on a new one. A request that was provably not written (the connection
/// turned out closed) is retried once on a new connection, as hyper's pooled client does.
pub(super) async fn send(
    pool: &Arc<Pool>,
    connector: &super::Connector,
    affinity: &Affinity,
    key: Key,
    req: Request<Body>,
) -> Result<Response<Answer>, Failed> {
    // An upstream that closed the connection while it idled is found out here, before a byte
    // is written (a readiness check: no system call unless the socket became readable).
    let mut conn = affinity
        .take(pool, &key)
        .and_then(|mut c| c.is_open().then_some(c));
    if conn.is_none() {
        conn = pool.checkout(&key);
    }
    let (parts, body) = req.into_parts();
    let mut out = h1::Outgoing {
        parts,
        first: None,
        body,
    };
    if let Some(c) = conn {
        match h1::exchange(c, out).await {
            Ok(x) => return Ok(answer(pool, affinity, key, x)),
            Err(h1::Failure::Unsent(unsent)) => out = *unsent,
            Err(h1::Failure::Failed(e)) => return Err(Failed::Request(e.into())),
        }
    }
    // Boxed: connecting is the cold branch, and its future (TCP, TLS) would make every
    // request's future, moved on each await, several KB larger.
    let c = match Box::pin(connect(pool, connector, &key)).await? {
        Some(c) => c,
        None => return Err(Failed::H2(Box::new(out.into_request()))),
    };
    match h1::exchange(c, out).await {
        Ok(x) => Ok(answer(pool, affinity, key, x)),
        Err(h1::Failure::Unsent(_)) => Err(Failed::Request(
            "the upstream closed a new connection before the request".into(),
        )),
        Err(h1::Failure::Failed(e)) => Err(Failed::Request(e.into())),
    }
}

/// The answer with its body reading from the connection; a body already complete (none, or
/// all of it here) frees the connection now.
fn answer(pool: &Arc<Pool>, affinity: &Affinity, key: Key, x: h1::Exchanged) -> Response<Answer> {
    let h1::Exchanged {
        head,
        conn,
        request_whole,
    } = x;
    let mut resp = Response::new(());
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    let mut body = Answer {
        conn: Some(conn),
        decoder: Decoder::new(head.framing),
        reusable: head.reusable && request_whole,
        home: Some((affinity.clone(), pool.clone(), key)),
    };
    if body.decoder.is_done() {
        body.finish();
    }
    resp.map(|()| body)
}

/// An answer's body, read from the upstream connection as it is polled. Ended cleanly, the
/// connection goes back to the downstream connection (or the pool); dropped before its end, the
/// connection is closed.
pub struct Answer {
    conn: Option<Box<Conn>>,
    decoder: Decoder,
    reusable: bool,
    home: Option<(Affinity, Arc<Pool>, Key)>,
}

impl Answer {
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if let Some((a, p, k)) = self.home.take() {
            if self.reusable && conn.is_drained() {
                a.give_back(p, k, conn);
            }
        }
    }
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match conn.decode(&mut this.decoder) {
                Ok(Decoded::Data(d)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                // Trailers are not passed on (neither were hyper's).
                Ok(Decoded::Trailers(_)) => continue,
                Ok(Decoded::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            match conn.poll_more(cx) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) => {
                    // The upstream closed the connection: the end of a close-delimited body.
                    this.reusable = false;
                    if let Err(e) = this.decoder.eof() {
                        this.conn = None;
                        return Poll::Ready(Some(Err(h1::Error::from(e).into())));
                    }
                }
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(h1::Error::Io(e).into())));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl h1::Outgoing {
    /// The request again, for the pooled client: a frame already read goes first.
    fn into_request(self) -> Request<Body> {
        use http_body_util::BodyExt;
        let body = match self.first {
            Some(first) => Prepended {
                first: Some(first),
                rest: self.body,
            }
            .boxed(),
            None => self.body,
        };
        Request::from_parts(self.parts, body)
    }
}

/// A body with a frame put back in front.
struct Prepended {
    first: Option<Bytes>,
    rest: Body,
}

impl http_body::Body for Prepended {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(f))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let first = self.first.as_ref().map_or(0, |f| f.len() as u64);
        let mut h = self.rest.size_hint();
        h.set_lower(h.lower() + first);
        if let Some(u) = h.upper() {
            h.set_upper(u + first);
        }
        h
    }
}

/// A new HTTP/1.1 connection, or `None` when the upstream chose h2.
async fn connect(
    pool: &Pool,
    connector: &super::Connector,
    key: &Key,
) -> Result<Option<Box<Conn>>, Failed> {
    let uri = Uri::builder()
        .scheme(key.0.clone())
        .authority(key.1.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| Failed::Connect(e.into()))?;
    let mut c: hyper_rustls::HttpsConnector<HttpConnector> = connector.clone();
    std::future::poll_fn(|cx| c.poll_ready(cx))
        .await
        .map_err(Failed::Connect)?;
    let io = c.call(uri).await.map_err(Failed::Connect)?;
    if io.connected().is_negotiated_h2() {
        lock(&pool.h2).insert(key.clone());
        return Ok(None);
    }
    Ok(Some(Conn::new(TokioIo::new(io))))
}
