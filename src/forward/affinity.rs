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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use tower_service::Service;

use super::Body;

/// Which upstream a connection talks to.
pub(super) type Key = (Scheme, Authority);

/// How long an idle upstream connection stays in the pool.
const IDLE_FOR: Duration = Duration::from_secs(60);
/// Idle connections kept per upstream.
const IDLE_PER_UPSTREAM: usize = 256;
/// How long a bound connection may take to become free again after the previous answer: the
/// last body chunk reaches the agent a moment before the connection task marks itself idle.
const READY_WITHIN: Duration = Duration::from_secs(1);

/// A downstream connection's upstream connection, if it has one yet. `listen` makes one per
/// HTTP/1 downstream connection and puts a clone in each of its requests' extensions; the last
/// clone dropped (the connection closed) returns the upstream connection to its pool.
#[derive(Clone, Default)]
pub struct Affinity(Arc<Slot>);

#[derive(Default)]
struct Slot(Mutex<Option<Held>>);

struct Held {
    pool: Arc<Pool>,
    key: Key,
    sender: SendRequest<Body>,
}

impl Affinity {
    /// Takes the bound connection if it talks to `key` through `pool`; one bound elsewhere (a
    /// request to another upstream, or a reload made a new pool) goes back to its pool.
    fn take(&self, pool: &Arc<Pool>, key: &Key) -> Option<SendRequest<Body>> {
        let held = lock(&self.0 .0).take()?;
        if Arc::ptr_eq(&held.pool, pool) && held.key == *key {
            return Some(held.sender);
        }
        held.pool.put(held.key, held.sender);
        None
    }

    fn bind(&self, pool: &Arc<Pool>, key: Key, sender: SendRequest<Body>) {
        let old = lock(&self.0 .0).replace(Held {
            pool: pool.clone(),
            key,
            sender,
        });
        if let Some(old) = old {
            old.pool.put(old.key, old.sender);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let held = match self.0.get_mut() {
            Ok(h) => h.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(h) = held {
            h.pool.put(h.key, h.sender);
        }
    }
}

/// An idle connection and when it became idle.
type Idle = (SendRequest<Body>, Instant);

/// Idle HTTP/1.1 upstream connections, most recently used last.
#[derive(Default)]
pub(super) struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    /// Upstreams that chose h2 in ALPN: the pooled client multiplexes those.
    h2: Mutex<HashSet<Key>>,
}

impl Pool {
    fn checkout(&self, key: &Key) -> Option<SendRequest<Body>> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(key)?;
        while let Some((sender, since)) = list.pop() {
            if sender.is_ready() && since.elapsed() < IDLE_FOR {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps a connection only if it is idle and open; dropping one closes it.
    fn put(&self, key: Key, sender: SendRequest<Body>) {
        if !sender.is_ready() {
            return;
        }
        let mut idle = lock(&self.idle);
        let list = idle.entry(key).or_default();
        list.retain(|(s, since)| !s.is_closed() && since.elapsed() < IDLE_FOR);
        if list.len() < IDLE_PER_UPSTREAM {
            list.push((sender, Instant::now()));
        }
    }

    pub(super) fn is_h2(&self, key: &Key) -> bool {
        lock(&self.h2).contains(key)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
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
        sender = pool.checkout(&key);
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
    let mut s = match connect(pool, connector, &key).await? {
        Some(s) => s,
        None => return Err(Failed::H2(Box::new(req))),
    };
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

/// A new HTTP/1.1 connection, or `None` when the upstream chose h2.
async fn connect(
    pool: &Pool,
    connector: &super::Connector,
    key: &Key,
) -> Result<Option<SendRequest<Body>>, Failed> {
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
    tokio::spawn(async move {
        // An error here is the upstream's (reset, bad framing); the request that was on the
        // connection gets it from `send_request`.
        let _ = conn.await;
    });
    Ok(Some(sender))
}
