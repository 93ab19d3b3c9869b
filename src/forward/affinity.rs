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
//! An upstream that negotiates h2 (ALPN) is remembered and served by the pooled client instead.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tower_service::Service;

use super::Body;
use crate::lock;

/// Which upstream a connection talks to.
pub(super) type Key = (Scheme, Authority);

/// An upstream connection's I/O half: it moves bytes only while something polls it, either the
/// downstream connection's task ([`Host`]) or a task of its own.
type Driver = Pin<
    Box<
        hyper::client::conn::http1::Connection<
            hyper_rustls::MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>,
            Body,
        >,
    >,
>;

/// How long an idle upstream connection stays in the pool.
const IDLE_FOR: Duration = Duration::from_secs(60);
/// How often the pool looks for idle connections the upstream closed (nothing polls them while
/// they wait, so their sockets would otherwise stay open until the next checkout).
const SWEEP_EVERY: Duration = Duration::from_secs(15);
/// Idle connections kept per upstream.
const IDLE_PER_UPSTREAM: usize = 256;
/// How long a bound connection may take to become free again after the previous answer: the
/// last body chunk reaches the agent a moment before the connection marks itself idle.
const READY_WITHIN: Duration = Duration::from_secs(1);

/// A downstream connection's upstream connection, if it has one yet. `listen` makes one per
/// HTTP/1 downstream connection and hands a clone to each of its requests (`pipeline::Conn`); the last
/// clone dropped (the connection closed) returns the upstream connection to its pool.
///
/// Made with [`Affinity::hosted`], the downstream connection's own task also drives the upstream
/// connection ([`Host::poll_with`]): a request and its answer then never cross tasks. Made with
/// `default()`, each upstream connection runs in a task of its own.
#[derive(Clone, Default)]
pub struct Affinity(Arc<Slot>);

#[derive(Default)]
struct Slot {
    held: Mutex<Option<Held>>,
    drive: Mutex<Drive>,
    /// The deadline of the request in flight ([`Affinity::within`]), kept between requests.
    timer: Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
}

/// A request bounded by [`Affinity::within`] did not finish in time.
pub(super) struct TimedOut;

struct Held {
    pool: Arc<Pool>,
    key: Key,
    sender: SendRequest<Body>,
}

/// Who polls the bound connection's I/O.
#[derive(Default)]
struct Drive {
    /// A [`Host`] polls `conn`; when false every connection is detached into its own task.
    hosted: bool,
    /// The host is inside its poll and polls `conn` before returning, so no wake is needed.
    in_poll: bool,
    waker: Option<Waker>,
    /// The I/O of the connection in `held` (or of the one out for a request).
    conn: Option<Driver>,
}

/// The downstream connection task's side of an [`Affinity::hosted`]: it polls the bound
/// upstream connection's I/O along with the downstream connection. Dropped (the task ends), it
/// returns an idle upstream connection to its pool and detaches a busy one into its own task, so
/// an answer still streaming elsewhere is not cut.
pub struct Host(Affinity);

impl Affinity {
    /// An affinity whose upstream connections the returned [`Host`] drives.
    pub fn hosted() -> (Affinity, Host) {
        let a = Affinity::default();
        lock(&a.0.drive).hosted = true;
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
    fn take(&self, pool: &Arc<Pool>, key: &Key) -> Option<SendRequest<Body>> {
        let held = lock(&self.0.held).take()?;
        if Arc::ptr_eq(&held.pool, pool) && held.key == *key {
            return Some(held.sender);
        }
        let conn = lock(&self.0.drive).conn.take();
        Pool::put(&held.pool, held.key, held.sender, conn);
        None
    }

    fn bind(&self, pool: &Arc<Pool>, key: Key, sender: SendRequest<Body>) {
        // `send` took the bound connection before asking for another, so nothing is replaced.
        *lock(&self.0.held) = Some(Held {
            pool: pool.clone(),
            key,
            sender,
        });
    }

    /// Makes `conn` the I/O to drive for the connection about to be bound; `None` when it
    /// already runs in a task of its own. A previous one still here (its sender was dropped
    /// after a failure or a slow finish) is detached so it can end by itself.
    fn install(&self, conn: Option<Driver>) {
        let mut d = lock(&self.0.drive);
        let old = match conn {
            Some(c) if d.hosted => {
                let old = d.conn.replace(c);
                if !d.in_poll {
                    if let Some(w) = &d.waker {
                        w.wake_by_ref();
                    }
                }
                old
            }
            Some(c) => {
                detach(c);
                d.conn.take()
            }
            None => d.conn.take(),
        };
        drop(d);
        if let Some(old) = old {
            detach(old);
        }
    }

    /// Returns the bound connection to its pool (with its I/O) and stops hosting.
    fn release(&self) {
        let held = lock(&self.0.held).take();
        let conn = {
            let mut d = lock(&self.0.drive);
            d.hosted = false;
            d.waker = None;
            d.conn.take()
        };
        match held {
            Some(h) => Pool::put(&h.pool, h.key, h.sender, conn),
            None => {
                if let Some(c) = conn {
                    detach(c);
                }
            }
        }
    }
}

impl Host {
    /// Polls `conn` (the downstream connection) and the bound upstream connection's I/O
    /// together; ready when `conn` is.
    pub fn poll_with<F: Future + ?Sized>(
        &self,
        cx: &mut Context<'_>,
        conn: Pin<&mut F>,
    ) -> Poll<F::Output> {
        let slot = &self.0 .0;
        {
            let mut d = lock(&slot.drive);
            // An answer that arrived is taken in before the downstream side looks for it.
            poll_driver(&mut d, cx);
            d.in_poll = true;
        }
        let out = conn.poll(cx);
        let mut d = lock(&slot.drive);
        d.in_poll = false;
        // A request the downstream side just queued is written now, not on the next wake.
        poll_driver(&mut d, cx);
        out
    }
}

fn poll_driver(d: &mut Drive, cx: &mut Context<'_>) {
    if !d.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        d.waker = Some(cx.waker().clone());
    }
    if let Some(c) = d.conn.as_mut() {
        // Ready means the connection ended (closed, or an error its request already got).
        if c.as_mut().poll(cx).is_ready() {
            d.conn = None;
        }
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
            Ok(h) => h.take(),
            Err(p) => p.into_inner().take(),
        };
        let conn = match self.drive.get_mut() {
            Ok(d) => d.conn.take(),
            Err(p) => p.into_inner().conn.take(),
        };
        match held {
            Some(h) => Pool::put(&h.pool, h.key, h.sender, conn),
            None => {
                if let Some(c) = conn {
                    detach(c);
                }
            }
        }
    }
}

/// Lets a connection's I/O run to its end in a task of its own (dropped when there is no
/// runtime any more: keygate is stopping and the connection goes with it).
fn detach(conn: Driver) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            // An error here is the upstream's (reset, bad framing); the request that was on
            // the connection gets it from `send_request`.
            let _ = conn.await;
        });
    }
}

/// Whether an idle connection nobody polls is still open; polling it also takes in the
/// upstream's close.
fn still_open(conn: &mut Driver) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    conn.as_mut().poll(&mut cx).is_pending()
}

/// An idle connection: its sender, its I/O unless that runs in a task of its own, and when it
/// became idle.
struct Idle {
    sender: SendRequest<Body>,
    conn: Option<Driver>,
    since: Instant,
}

impl Idle {
    fn usable(&mut self) -> bool {
        if self.since.elapsed() >= IDLE_FOR {
            return false;
        }
        match self.conn.as_mut() {
            Some(c) => still_open(c) && self.sender.is_ready(),
            None => self.sender.is_ready(),
        }
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
    fn checkout(&self, key: &Key) -> Option<(SendRequest<Body>, Option<Driver>)> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(&(crate::runtime::worker(), key.clone()))?;
        while let Some(mut i) = list.pop() {
            if i.usable() {
                return Some((i.sender, i.conn));
            }
        }
        None
    }

    /// Keeps a connection only if it is idle and open; dropping one closes it. A busy one's I/O
    /// is detached so its answer can finish.
    fn put(this: &Arc<Pool>, key: Key, sender: SendRequest<Body>, conn: Option<Driver>) {
        if !sender.is_ready() {
            if let Some(c) = conn {
                detach(c);
            }
            return;
        }
        let mut idle = lock(&this.idle);
        let list = idle.entry((crate::runtime::worker(), key)).or_default();
        list.retain(|i| {
            i.since.elapsed() < IDLE_FOR && (i.conn.is_some() || !i.sender.is_closed())
        });
        if list.len() < IDLE_PER_UPSTREAM {
            let undriven = conn.is_some();
            list.push(Idle {
                sender,
                conn,
                since: Instant::now(),
            });
            drop(idle);
            if undriven {
                this.start_sweeping();
            }
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
    Connect(super::BoxError),
    /// The request failed on an open connection.
    Request(hyper::Error),
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
) -> Result<Response<Incoming>, Failed> {
    let mut sender = match affinity.take(pool, &key) {
        Some(mut s) => match tokio::time::timeout(READY_WITHIN, s.ready()).await {
            Ok(Ok(())) => Some(s),
            _ => None,
        },
        None => None,
    };
    if sender.is_none() {
        if let Some((s, conn)) = pool.checkout(&key) {
            affinity.install(conn);
            sender = Some(s);
        }
    }
    let mut req = req;
    if let Some(mut s) = sender {
        match s.try_send_request(req).await {
            Ok(resp) => return Ok(keep(pool, affinity, key, s, resp)),
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(Failed::Request(e.into_error())),
            },
        }
    }
    // Boxed: connecting is the cold branch, and its future (TCP, TLS, handshake) would make
    // every request's future, moved on each await, several KB larger.
    let (mut s, conn) = match Box::pin(connect(pool, connector, &key)).await? {
        Some(s) => s,
        None => return Err(Failed::H2(Box::new(req))),
    };
    affinity.install(Some(conn));
    match s.send_request(req).await {
        Ok(resp) => Ok(keep(pool, affinity, key, s, resp)),
        Err(e) => Err(Failed::Request(e)),
    }
}

/// Binds the connection to the downstream connection unless the answer ends its use: a 101
/// (refused by `forward`, and the connection is no longer HTTP).
fn keep(
    pool: &Arc<Pool>,
    affinity: &Affinity,
    key: Key,
    sender: SendRequest<Body>,
    resp: Response<Incoming>,
) -> Response<Incoming> {
    if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        affinity.bind(pool, key, sender);
    }
    resp
}

/// A new HTTP/1.1 connection and its I/O, or `None` when the upstream chose h2.
async fn connect(
    pool: &Pool,
    connector: &super::Connector,
    key: &Key,
) -> Result<Option<(SendRequest<Body>, Driver)>, Failed> {
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
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(Failed::Request)?;
    Ok(Some((sender, Box::pin(conn))))
}
