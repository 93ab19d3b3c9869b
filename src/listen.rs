//! Stage `listen`: accepts connections and hands each request to the pipeline.
//!
//! Input: the configured listeners. Output: requests, each with what is known of its peer
//! ([`Peer`]: the TCP address, or a Unix socket peer's uid and pid from `SO_PEERCRED`).
//! Speaks HTTP/1.1 with keep-alive and HTTP/2 with prior knowledge (h2c), detected per
//! connection. Header size and header read time are bounded, so a slow or huge head cannot tie
//! keygate up; so are the time to the first request, the time a connection may sit idle, and the
//! number of connections per listener (`[connections]`): when a listener is full its longest-idle
//! connection is closed to make room, and when none is idle the newcomer gets 503
//! `too_many_connections`. Each request carries a [`Closer`] for its connection, which the
//! response watch uses to drop a client that stopped reading.
//!
//! An `https://` listener ([`tls`]) does the TLS handshake within the first-request deadline,
//! at most as many at once as the listener has connection slots, and tells each request who the
//! client certificate named ([`ConnInfo`]).
//!
//! Architecture invariant: plaintext TCP listeners are loopback unless config says otherwise
//! (checked in `config`); Unix sockets are created mode 0600.

pub mod h1;
mod sniff;
pub mod tls;

pub use h1::Incoming;

pub use tls::normalize_subject;

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};

use crate::audit::{Decision, Reason, Record};
use crate::config::{Connections, Http1, Listen};
use crate::error::{Code, Rejection};
use crate::forward::affinity::Host;
use crate::forward::{Affinity, Body, BoxError};
use crate::guard::timeout::{Closer, WatchHost};
use crate::guard::Peer;
use crate::pipeline::{self, State};
use crate::reload::Live;

/// Largest request head accepted (HTTP/1 buffer, HTTP/2 header list).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A listener bound at start-up, before privileges and config checks finish.
pub enum Bound {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix socket listener and its socket file, removed when the listener stops.
    Unix(UnixListener, PathBuf),
    /// A TCP listener that speaks TLS first.
    Tls(TcpListener),
}

/// What the listener knows of a request's connection, in the request's extensions when it is
/// not the default (a local listener without client certificates).
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    /// The subject of the client's verified certificate (TLS listener with `client_ca`).
    pub client_subject: Option<Arc<str>>,
    /// The listener is bound to a non-loopback address: other machines reach it by their own
    /// name for it, so `Host` is not required to be a loopback name.
    pub exposed: bool,
}

impl Bound {
    /// The address agents use to reach this listener (`http://host:port` or `unix:path`).
    pub fn url(&self) -> String {
        match self {
            Bound::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("http://{a}"),
                Err(_) => "http://(unknown)".into(),
            },
            Bound::Unix(_, p) => format!("unix:{}", p.display()),
            Bound::Tls(l) => match l.local_addr() {
                Ok(a) => format!("https://{a}"),
                Err(_) => "https://(unknown)".into(),
            },
        }
    }

    fn exposed(&self) -> bool {
        match self {
            Bound::Tcp(l) | Bound::Tls(l) => l.local_addr().is_ok_and(|a| !a.ip().is_loopback()),
            Bound::Unix(..) => false,
        }
    }
}

/// Binds every listener, or says which one could not be bound.
pub async fn bind(listen: &[Listen]) -> Result<Vec<Bound>, String> {
    let mut out = Vec::new();
    for l in listen {
        match l {
            Listen::Tcp(addr) => {
                let tl = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                out.push(Bound::Tcp(tl));
            }
            Listen::Unix(path) => out.push(bind_unix(path)?),
            Listen::Tls(addr) => {
                let tl = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on https://{addr}: {e}"))?;
                out.push(Bound::Tls(tl));
            }
        }
    }
    Ok(out)
}

fn bind_unix(path: &PathBuf) -> Result<Bound, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail = |e: std::io::Error| format!("cannot listen on unix:{}: {e}", path.display());
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(fail)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
        }
    }
    // A socket left by an earlier run is replaced; any other file at that path is not ours.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(fail)?;
        } else {
            return Err(format!(
                "cannot listen on unix:{}: a file that is not a socket is there",
                path.display()
            ));
        }
    }
    let l = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    Ok(Bound::Unix(l, path.clone()))
}

/// Accepts on every listener until `shutdown` turns true, then lets open connections finish
/// their requests (up to `grace`).
pub async fn run(
    bound: Vec<Bound>,
    state: Arc<Live>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    // Connection limits are the start-up config's: like the listeners, they change at a restart.
    let limits = state.state.load().config.connections.clone();
    let max = effective_max(limits.max_per_listener, bound.len());
    // Every connection task holds a sender; `recv` returns `None` once the last one is gone.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let mut tasks = tokio::task::JoinSet::new();
    for b in bound {
        let state = state.clone();
        let mut stop = shutdown.clone();
        let alive = alive_tx.clone();
        let slots = Arc::new(Slots::new(max));
        let limits = limits.clone();
        tasks.spawn(async move {
            let name: Arc<str> = b.url().into();
            let exposed = b.exposed();
            tracing::info!(listener = %name, max_connections = max, "listener limits");
            loop {
                let accepted = tokio::select! {
                    _ = stop.changed() => break,
                    a = accept(&b) => a,
                };
                match accepted {
                    Ok((io, peer)) => {
                        let conn = Accepted {
                            peer: Arc::new(peer),
                            listener: name.clone(),
                            state: state.clone(),
                            slots: slots.clone(),
                            limits: limits.clone(),
                            stop: stop.clone(),
                            alive: alive.clone(),
                            info: ConnInfo {
                                client_subject: None,
                                exposed,
                            },
                        };
                        let h2c = conn.limits.h2c;
                        match io {
                            Io::Tcp(s) => conn.serve(Box::new(s), h2c),
                            Io::Unix(s) => conn.serve(Box::new(s), h2c),
                            Io::Tls(s) => conn.handshake(s),
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(listener = %name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            if let Bound::Unix(_, path) = &b {
                let _ = std::fs::remove_file(path);
            }
        });
    }
    drop(alive_tx);
    let mut shutdown = shutdown;
    let _ = shutdown.wait_for(|s| *s).await;
    while tasks.join_next().await.is_some() {}
    let _ = tokio::time::timeout(grace, alive_rx.recv()).await;
}

/// The configured cap, lowered to what the open-files limit can hold: each busy connection may
/// need a second descriptor for its upstream, and audit, listeners and the runtime need some.
fn effective_max(configured: usize, listeners: usize) -> usize {
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let budget = usize::try_from(nofile.saturating_sub(128) / 2).unwrap_or(usize::MAX);
    configured.min(budget / listeners.max(1)).max(1)
}

/// Connections answered with 503 while a listener is full and none is idle; past this they are
/// closed unanswered, so refusing cannot itself use up descriptors.
const MAX_REFUSING: usize = 64;
/// How long an answered-with-503 connection may take to send its request.
const REFUSE_WITHIN: Duration = Duration::from_secs(5);
/// How long a connection closed for idleness may take to finish closing.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);
/// An HTTP/1 connection's next request head must be complete this long after the previous
/// answer (hyper's header read timeout, enforced by the connection's idle check instead, so no
/// timer is made per request head).
const HEAD_WITHIN: Duration = Duration::from_secs(30);

/// One listener's open connections.
struct Slots {
    max: usize,
    epoch: Instant,
    /// foldhash: the ids are our own counter, and SipHash cost every connection ~300
    /// instructions to enter and leave.
    open: Mutex<HashMap<u64, Arc<Tracked>, foldhash::fast::RandomState>>,
    next_id: AtomicU64,
    refusing: AtomicUsize,
    /// TLS handshakes under way; at most `max`, so silent peers cannot hold descriptors.
    handshaking: AtomicUsize,
}

/// What the listener knows of one open connection.
struct Tracked {
    /// Drops the connection at once: a stalled client, or evicted to make room (it is idle, so
    /// nothing is lost, and a graceful close would hold its descriptor while a flood goes on).
    close: Closer,
    in_flight: AtomicUsize,
    /// Milliseconds after `Slots::epoch` when the connection last became idle.
    idle_since: AtomicU64,
    served: AtomicBool,
    /// Speaks HTTP/1 (known from the start, or from its first request): its heads are bounded
    /// by [`HEAD_WITHIN`].
    http1: AtomicBool,
}

impl Slots {
    fn new(max: usize) -> Self {
        Slots {
            max,
            epoch: Instant::now(),
            open: Mutex::new(HashMap::default()),
            next_id: AtomicU64::new(0),
            refusing: AtomicUsize::new(0),
            handshaking: AtomicUsize::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Makes room for a new connection, evicting the longest-idle one if the listener is full;
    /// `None` when it is full of busy connections.
    fn admit(&self) -> Option<(u64, Arc<Tracked>)> {
        let mut open = match self.open.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if open.len() >= self.max {
            let victim = open
                .iter()
                .filter(|(_, t)| t.in_flight.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, t)| t.idle_since.load(Ordering::Relaxed))
                .map(|(id, _)| *id)?;
            if let Some(t) = open.remove(&victim) {
                t.close.close();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let t = Arc::new(Tracked {
            close: Closer::default(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now_ms()),
            served: AtomicBool::new(false),
            http1: AtomicBool::new(false),
        });
        open.insert(id, t.clone());
        Some((id, t))
    }

    fn leave(&self, id: u64) {
        match self.open.lock() {
            Ok(mut g) => g.remove(&id),
            Err(p) => p.into_inner().remove(&id),
        };
    }
}

/// Removes a connection from its listener's table when its task ends, however it ends.
struct Leave(Arc<Slots>, u64);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.leave(self.1);
    }
}

/// One request in flight on a tracked connection; the connection counts as idle again when the
/// response body is done or dropped.
struct InFlight {
    tracked: Arc<Tracked>,
    slots: Arc<Slots>,
}

impl InFlight {
    fn enter(tracked: &Arc<Tracked>, slots: &Arc<Slots>) -> Self {
        tracked.served.store(true, Ordering::Relaxed);
        tracked.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            tracked: tracked.clone(),
            slots: slots.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.tracked
            .idle_since
            .store(self.slots.now_ms(), Ordering::Relaxed);
        self.tracked.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The response body, holding its request's [`InFlight`] until hyper is done with it.
pub struct InFlightBody {
    inner: Body,
    _in_flight: Option<InFlight>,
}

impl HttpBody for InFlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An accepted connection of any kind (TCP, Unix, TLS): one type, so the HTTP server code is
/// compiled once rather than once per kind (code size is most of keygate's idle RSS).
type Stream = Box<dyn AnyStream>;

/// What serving a connection needs of its stream.
trait AnyStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AnyStream for S {}

enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
    /// Not yet handshaken.
    Tls(tokio::net::TcpStream),
}

async fn accept(b: &Bound) -> std::io::Result<(Io, Peer)> {
    match b {
        Bound::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Io::Tcp(s), Peer::Tcp(addr)))
        }
        Bound::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            let cred = s.peer_cred()?;
            Ok((
                Io::Unix(s),
                Peer::Unix {
                    uid: cred.uid(),
                    pid: cred.pid(),
                },
            ))
        }
        Bound::Tls(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Io::Tls(s), Peer::Tcp(addr)))
        }
    }
}

/// A connection just accepted, with what serving it needs.
struct Accepted {
    peer: Arc<Peer>,
    listener: Arc<str>,
    /// The live state: each request loads the state of the moment it arrives and keeps it to
    /// its end, so a reload never changes the policy under a request or stream already running.
    state: Arc<Live>,
    slots: Arc<Slots>,
    limits: Connections,
    stop: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
    info: ConnInfo,
}

/// What serves each request of one connection: the pipeline, with what the listener knows.
struct Serve {
    tracked: Arc<Tracked>,
    slots: Arc<Slots>,
    info: ConnInfo,
    affinity: Affinity,
    state: Arc<Live>,
    peer: Arc<Peer>,
    listener: Arc<str>,
}

/// The pipeline's answer to one request, holding its [`InFlight`] until the body takes it.
struct Answer {
    answer: Pin<
        Box<
            dyn std::future::Future<Output = Result<http::Response<Body>, std::convert::Infallible>>
                + Send,
        >,
    >,
    in_flight: Option<InFlight>,
}

impl std::future::Future for Answer {
    type Output = http::Response<InFlightBody>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let resp = match std::task::ready!(self.answer.as_mut().poll(cx)) {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
        let in_flight = self.in_flight.take();
        Poll::Ready(resp.map(|inner| InFlightBody {
            inner,
            _in_flight: in_flight,
        }))
    }
}

impl h1::Service for Serve {
    type Body = InFlightBody;
    type Future = Answer;

    fn call(&self, mut req: http::Request<Incoming>) -> Answer {
        let in_flight = InFlight::enter(&self.tracked, &self.slots);
        // Only a listener that differs from a local plain one puts what it knows in the
        // extensions: their map costs a request five allocations (absent and default read the
        // same, see `guard` and `authenticate`).
        if self.info.exposed || self.info.client_subject.is_some() {
            req.extensions_mut().insert(self.info.clone());
        }
        // HTTP/1 requests on one connection are sequential, so they can share one upstream
        // connection, and their answers are written by the connection's own task, which
        // watches them too (`drive`); HTTP/2 streams run at once, in tasks of their own, and
        // use the pooled client.
        let conn = if req.version() < http::Version::HTTP_2 {
            self.tracked.http1.store(true, Ordering::Relaxed);
            pipeline::Conn {
                closer: Some(self.tracked.close.hosting()),
                affinity: Some(self.affinity.clone()),
            }
        } else {
            pipeline::Conn {
                closer: Some(self.tracked.close.clone()),
                affinity: None,
            }
        };
        // Boxed: the pipeline's future is several KB, and a pointer moves for free.
        Answer {
            answer: Box::pin(pipeline::handle(
                self.state.state.load_full(),
                self.peer.clone(),
                self.listener.clone(),
                conn,
                req,
            )),
            in_flight: Some(in_flight),
        }
    }
}

/// HTTP/1.1 only: no look for the HTTP/2 preface (a client that sends one gets an error).
fn http1_builder() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.keep_alive(true)
        .max_buf_size(MAX_HEAD_BYTES.max(8192))
        // `HEAD_WITHIN` in the idle check bounds the head instead.
        .header_read_timeout(None);
    b
}

/// HTTP/2's settings (HTTP/1.1's are [`http1_builder`]'s).
fn http2_builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    // A peer that vanished without closing (a dead network path, a suspended laptop) is found
    // by pings, not left holding its streams.
    sniff::http2_builder(MAX_HEAD_BYTES as u32, Duration::from_secs(20))
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .max_buf_size(MAX_HEAD_BYTES.max(8192))
        // `HEAD_WITHIN` in the idle check bounds the head instead.
        .header_read_timeout(None);
    builder
        .http2()
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .timer(TokioTimer::new())
        // A peer that vanished without closing (a dead network path, a suspended laptop) is
        // found by pings, not left holding its streams.
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

impl Accepted {
    /// The TLS handshake, bounded in time (the first-request deadline) and in number; then the
    /// connection is served like any other, its requests knowing the client's certificate.
    fn handshake(mut self, stream: tokio::net::TcpStream) {
        let Some(config) = self.state.state.load().tls.clone() else {
            // Config refuses an https:// listener without tls, so this is not reached.
            return;
        };
        if self.slots.handshaking.fetch_add(1, Ordering::AcqRel) >= self.slots.max {
            self.slots.handshaking.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let within = self.limits.first_request_timeout;
        crate::runtime::spawn_conn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let done = tokio::time::timeout(within, acceptor.accept(stream)).await;
            self.slots.handshaking.fetch_sub(1, Ordering::AcqRel);
            match done {
                Ok(Ok(tls)) => {
                    self.info.client_subject = tls::client_subject(tls.get_ref().1).map(Into::into);
                    // ALPN decides between HTTP/1.1 and h2 here, whatever `h2c` says.
                    self.serve(Box::new(tls), true);
                }
                Ok(Err(e)) => {
                    tracing::info!(listener = %self.listener, peer = ?self.peer, error = %e, "TLS handshake refused")
                }
                Err(_) => {
                    tracing::info!(listener = %self.listener, peer = ?self.peer, "TLS handshake timed out")
                }
            }
        });
    }

    /// Serves the connection: HTTP/1.1, and HTTP/2 too when `h2` (recognised by its preface).
    fn serve(self, stream: Stream, h2: bool) {
        let Some((id, tracked)) = self.slots.admit() else {
            return self.refuse(stream);
        };
        let Accepted {
            peer,
            listener,
            state,
            slots,
            limits,
            stop,
            alive,
            info,
        } = self;
        let leave = Leave(slots.clone(), id);
        // The connection's task drives its upstream connection too (`host`); dropped with the
        // connection, which returns the upstream connection to the pool.
        let (affinity, host) = Affinity::hosted();
        let own = limits.http1 == Http1::Keygate;
        if !h2 {
            tracked.http1.store(true, Ordering::Relaxed);
        }
        let svc = Serve {
            tracked: tracked.clone(),
            slots: slots.clone(),
            info,
            affinity,
            state,
            peer,
            listener,
        };
        if own {
            let conn = h1::Connection::new(stream, svc, h2);
            let drain = |c: Pin<&mut h1::Connection>| c.graceful_shutdown();
            let run = drive(
                conn, drain, host, tracked, slots, limits, stop, leave, alive,
            );
            crate::runtime::spawn_conn(run);
        } else if h2 {
            // HTTP/1.1 or h2c, told by the first read (`sniff`): `auto` reads the preface alone.
            let svc = h1::ViaHyper(svc);
            let conn = sniff::Served::new(stream, svc, http1_builder(), http2_builder());
            let drain = |c: Pin<&mut _>| sniff::Served::graceful_shutdown(c);
            let run = drive(
                conn, drain, host, tracked, slots, limits, stop, leave, alive,
            );
            crate::runtime::spawn_conn(run);
        } else {
            // The type `h1` hands a connection over in: one copy of hyper's HTTP/1 server.
            let io = TokioIo::new(sniff::Rewind::new(Vec::new(), stream));
            let conn = http1_builder().serve_connection(io, h1::ViaHyper(svc));
            let drain =
                |c: Pin<&mut _>| hyper::server::conn::http1::Connection::graceful_shutdown(c);
            let run = drive(
                conn, drain, host, tracked, slots, limits, stop, leave, alive,
            );
            crate::runtime::spawn_conn(run);
        }
    }

    /// The listener is full of busy connections: answer this one's first request with 503
    /// `too_many_connections` (audited), then close it.
    fn refuse(self, stream: Stream) {
        if self.slots.refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
            self.slots.refusing.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let Accepted {
            peer,
            listener,
            state,
            slots,
            alive,
            ..
        } = self;
        let max = slots.max;
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let resp = refuse_overloaded(&state.state.load(), &peer, &listener, req, max);
            async move { Ok::<_, std::convert::Infallible>(resp) }
        });
        let mut b = builder();
        b.http1().keep_alive(false);
        let conn = b.serve_connection(TokioIo::new(stream), svc).into_owned();
        tokio::spawn(async move {
            let _alive = alive;
            let _ = tokio::time::timeout(REFUSE_WITHIN, conn).await;
            slots.refusing.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Serves one connection until it ends, is closed (stalled client, evicted), sits idle too long,
/// or keygate stops (then it drains: the request in flight finishes).
#[allow(clippy::too_many_arguments)]
async fn drive<C, G>(
    conn: C,
    drain: G,
    host: Host,
    tracked: Arc<Tracked>,
    slots: Arc<Slots>,
    limits: Connections,
    mut stop: watch::Receiver<bool>,
    leave: Leave,
    alive: mpsc::Sender<()>,
) where
    C: std::future::Future,
    G: Fn(Pin<&mut C>),
{
    let _leave = leave;
    let _alive = alive;
    // Declared before `conn`, so it is dropped after it: the answers are done with the
    // upstream connection by then.
    let host = host;
    tokio::pin!(conn);
    let mut watch = WatchHost::new();
    // Set once the connection was asked to close: by then only its own end, a hard
    // close or (unless keygate is stopping, which has its own grace) a bound is awaited.
    let mut closing: Option<Option<tokio::time::Instant>> = None;
    loop {
        let check = match closing {
            Some(_) => Duration::from_secs(3600),
            None => tracked.idle_check(&slots, &limits),
        };
        let bound = closing
            .flatten()
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            // The connection first: it is what most wake-ups are for.
            biased;
            // A connection error is the client's (reset, bad framing); nothing to report. The
            // watch of the answer being written is checked after each poll of the connection,
            // which is what changes it; it ends the connection when the client stopped reading.
            _ = std::future::poll_fn(|cx| match host.poll_with(cx, conn.as_mut()) {
                Poll::Ready(_) => Poll::Ready(()),
                Poll::Pending => watch.poll(&tracked.close, cx),
            }) => break,
            _ = tracked.close.closed() => break,
            _ = tokio::time::sleep_until(bound), if closing.flatten().is_some() => break,
            _ = stop.changed(), if closing.is_none() => {
                drain(conn.as_mut());
                closing = Some(None);
            }
            _ = tokio::time::sleep(check), if closing.is_none() => {
                if tracked.idle_check(&slots, &limits).is_zero() {
                    drain(conn.as_mut());
                    closing = Some(Some(tokio::time::Instant::now() + CLOSE_WITHIN));
                }
            }
        }
    }
}

impl Tracked {
    /// Time left before this connection counts as idle too long; zero when it does.
    fn idle_check(&self, slots: &Slots, limits: &Connections) -> Duration {
        let mut limit = if self.served.load(Ordering::Relaxed) {
            limits.idle_timeout
        } else {
            limits.first_request_timeout
        };
        if self.http1.load(Ordering::Relaxed) {
            limit = limit.min(HEAD_WITHIN);
        }
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return limit;
        }
        let idle = Duration::from_millis(
            slots
                .now_ms()
                .saturating_sub(self.idle_since.load(Ordering::Relaxed)),
        );
        limit.saturating_sub(idle)
    }
}

/// 503 `too_many_connections`, with its audit record.
fn refuse_overloaded(
    state: &State,
    peer: &Peer,
    listener: &Arc<str>,
    req: http::Request<hyper::body::Incoming>,
    max: usize,
) -> http::Response<Body> {
    use http_body_util::BodyExt;
    let rejection = Rejection::new(
        Code::TooManyConnections,
        format!("keygate has {max} busy connections on this listener; retry shortly"),
    );
    let request_id = {
        use rand::Rng;
        let n: u128 = rand::rng().random();
        format!("req_{:024x}", n >> 32)
    };
    let (head, _) = req.into_parts();
    let mut resp = rejection.to_response(&request_id);
    // The path is redacted like every other record's: it is the agent's to write.
    let scanner = state.credentials.scanner();
    let mut record = Record::request(
        &head,
        &request_id,
        peer,
        listener,
        &state.policy_version,
        &scanner,
        false,
    );
    record.person = state.default_person.clone();
    record.decision = Decision::Deny;
    record.reason = Reason::Refused(rejection.code);
    record.status = rejection.status().as_u16();
    record.blame = Some(rejection.blame());
    record.bytes_out = resp.body().len() as u64;
    state.audit.begin(record).finish();
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp.map(|b| {
        http_body_util::Full::new(b)
            .map_err(|never: std::convert::Infallible| match never {})
            .boxed()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_http1_connection_gets_at_most_the_head_bound_and_an_http2_one_its_idle_timeout() {
        let slots = Slots::new(4);
        let limits = Connections {
            idle_timeout: Duration::from_secs(90),
            first_request_timeout: Duration::from_secs(45),
            ..Connections::default()
        };
        let (_, t) = slots.admit().unwrap();
        // Not served yet, protocol not known (h2c sniffing): the first-request deadline.
        let first = t.idle_check(&slots, &limits);
        assert!(
            first > HEAD_WITHIN && first <= Duration::from_secs(45),
            "{first:?}"
        );
        t.served.store(true, Ordering::Relaxed);
        let h2 = t.idle_check(&slots, &limits);
        assert!(h2 > HEAD_WITHIN && h2 <= Duration::from_secs(90), "{h2:?}");
        t.http1.store(true, Ordering::Relaxed);
        let h1 = t.idle_check(&slots, &limits);
        assert!(h1 <= HEAD_WITHIN && h1 > HEAD_WITHIN / 2, "{h1:?}");
        // A shorter configured idle time still wins.
        let short = Connections {
            idle_timeout: Duration::from_secs(5),
            ..limits
        };
        assert!(t.idle_check(&slots, &short) <= Duration::from_secs(5));
    }
}
