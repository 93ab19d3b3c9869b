//! The forward-proxy listener (`proxy_listen`): `HTTPS_PROXY=http://keygate:TOKEN@127.0.0.1:8792`
//! for tools that cannot take a base URL.
//!
//! Input: HTTP CONNECT and absolute-form requests with the agent's keygate token in
//! `Proxy-Authorization` (Basic with any user name and the token as password, or Bearer).
//! Output: for a host a route names (`host = "api.github.com"`), a tunnel whose TLS keygate
//! terminates with a leaf certificate from its own CA ([`ca`]); each request inside it runs
//! through the same [`crate::pipeline`] as the reverse proxy, carrying a [`Via`] that names the
//! host and the proxy credential. For other hosts, by `egress` and `egress_allow`, a tunnel
//! passed through uninspected ([`egress`]) or a refusal. Every CONNECT is one audit record
//! (`method = "CONNECT"`, `path = host:port`); each request in a terminated tunnel is another.
//!
//! Inside a tunnel keygate speaks HTTP/1.1 only (ALPN offers `http/1.1`), with keep-alive.
//! Bounds: request head size, the proxy connection count, tunnels per caller, the TLS handshake
//! time, and tunnel idle time.

pub mod ca;
pub mod connect;
mod egress;
pub mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use zeroize::Zeroizing;

use crate::audit::{self, Decision, Pending, Reason, Record};
use crate::authenticate::Identity;
use crate::config::Egress;
use crate::error::{Code, Rejection};
use crate::forward::Body;
use crate::guard::Peer;
use crate::pipeline::{self, State};
use crate::reload::Live;

/// Largest request head on the proxy listener and inside a tunnel.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Proxy connections open at once; past this the longest-idle one is closed to make room.
const MAX_CONNECTIONS: usize = 512;
/// How long a new connection waits for the room an evicted idle one leaves.
const EVICT_WAIT: Duration = Duration::from_secs(1);
/// The caller every tunnel opened without proxy credentials counts against (all share the bound).
const TOKENLESS_CALLER: &str = "(no proxy credential)";
/// Tunnels one caller (token, else agent) may hold open at once.
const MAX_TUNNELS_PER_CALLER: usize = 64;
/// Time for a request head, from the connection's start or its last request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for the client's TLS handshake inside a tunnel.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A tunnel with no byte in either direction for this long is closed.
const TUNNEL_IDLE: Duration = Duration::from_secs(300);
/// How often a tunnel keygate does not read is checked against revocation and freezes: inside
/// a terminated tunnel every request is authorized anew, a passed-through one has no requests.
const TUNNEL_RECHECK: Duration = Duration::from_secs(1);

/// What a request that came through the forward proxy carries in its extensions: the host it
/// was sent to and the proxy credential. `guard` checks `Host` against it, `authenticate`
/// identifies the caller from it, `route` matches on its host.
#[derive(Clone)]
pub struct Via {
    /// The host the agent asked for (checked, lower case).
    pub host: String,
    /// The port of the CONNECT (or of the absolute URL).
    pub port: u16,
    token: Option<Arc<Zeroizing<Vec<u8>>>>,
    /// A token-less tunnel's place in the shared pool, proven by its first identified request.
    proof: Option<Arc<Proof>>,
}

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Via")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Via {
    /// The keygate token from `Proxy-Authorization`, if one was sent.
    pub fn token(&self) -> Option<&[u8]> {
        self.token.as_deref().map(|t| t.as_slice())
    }

    /// Notes that a request in this tunnel identified its caller (by a live placeholder, for a
    /// tunnel opened without proxy credentials): the tunnel is no longer the first to make
    /// room when the token-less pool is full.
    pub fn identified(&self) {
        if let Some(p) = &self.proof {
            p.prove();
        }
    }

    /// Refuses a request whose `Host` names another host than the tunnel's: the upstream must
    /// not read a request for one host as one for another.
    pub fn check_host(&self, head: &Parts) -> Result<(), Rejection> {
        let Some(h) = head.headers.get(header::HOST) else {
            return Ok(());
        };
        let h = h.to_str().unwrap_or("").to_ascii_lowercase();
        let (name, port) = match h.rsplit_once(':') {
            Some((n, p)) => (n, p.parse::<u16>().ok()),
            None => (h.as_str(), Some(self.port)),
        };
        if name.strip_suffix('.').unwrap_or(name) == self.host && port == Some(self.port) {
            return Ok(());
        }
        Err(Rejection::new(
            Code::MisdirectedRequest,
            format!(
                "Host {h:?} is not the host this proxy request was sent to ({})",
                self.host
            ),
        ))
    }
}

/// Binds every `proxy_listen` address.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, String> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(
            TcpListener::bind(a)
                .await
                .map_err(|e| format!("proxy_listen {a}: {e}"))?,
        );
    }
    Ok(out)
}

/// Proxy connections with no request in progress, longest idle first. Idle connections are all
/// a local process without a token can hold open, so when the listener is full the longest-idle
/// one is closed to make room: a flood of them never locks out the next agent (as
/// `listen::Slots` does for the reverse proxy).
#[derive(Default)]
struct IdleSet {
    seq: AtomicU64,
    idle: Mutex<BTreeMap<u64, Arc<Notify>>>,
}

impl IdleSet {
    fn park(&self, kick: &Arc<Notify>) -> u64 {
        let key = self.seq.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(key, kick.clone());
        key
    }

    fn unpark(&self, key: u64) {
        self.lock().remove(&key);
    }

    /// Closes the longest-idle connection; false when every connection is busy.
    fn evict_oldest(&self) -> bool {
        match self.lock().pop_first() {
            Some((_, kick)) => {
                kick.notify_one();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Notify>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What every proxy connection shares.
struct Shared {
    idle: IdleSet,
    live: Arc<Live>,
    ca: Arc<ca::Ca>,
    /// keygate's own addresses: a tunnel never connects to them.
    own: Vec<SocketAddr>,
    tunnels: Mutex<HashMap<String, usize>>,
    tokenless: Mutex<Tokenless>,
    tls: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

/// Accepts on every proxy listener until `shutdown` turns true, then gives open connections up
/// to `grace` to finish.
pub async fn run(
    listeners: Vec<TcpListener>,
    live: Arc<Live>,
    ca: Arc<ca::Ca>,
    own: Vec<SocketAddr>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let shared = Arc::new(Shared {
        live,
        ca,
        own,
        tunnels: Mutex::new(HashMap::new()),
        tokenless: Mutex::new(Tokenless::default()),
        tls: Mutex::new(HashMap::new()),
        idle: IdleSet::default(),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let shared = shared.clone();
        let slots = slots.clone();
        let alive = alive_tx.clone();
        let mut stop = shutdown.clone();
        tasks.spawn(async move {
            let name: Arc<str> = match l.local_addr() {
                Ok(a) => format!("proxy:{a}").into(),
                Err(_) => "proxy".into(),
            };
            loop {
                let accepted = tokio::select! {
                    _ = stop.changed() => break,
                    a = l.accept() => a,
                };
                match accepted {
                    Ok((stream, addr)) => {
                        // Full and every connection busy: closed unanswered.
                        let Some(permit) = room(&slots, &shared.idle).await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let conn = Conn {
                            shared: shared.clone(),
                            peer: Arc::new(Peer::Tcp(addr)),
                            listener: name.clone(),
                            stop: stop.clone(),
                        };
                        let alive = alive.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            let _alive = alive;
                            conn.serve(stream).await;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(listener = %name, error = %e, "proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    drop(alive_tx);
    let mut shutdown = shutdown;
    let _ = shutdown.wait_for(|s| *s).await;
    while tasks.join_next().await.is_some() {}
    let _ = tokio::time::timeout(grace, alive_rx.recv()).await;
}

/// A connection slot: a free one, else the one the longest-idle connection leaves when it is
/// closed to make room; `None` when every connection is busy with a request.
async fn room(slots: &Arc<Semaphore>, idle: &IdleSet) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(p) = slots.clone().try_acquire_owned() {
        return Some(p);
    }
    if !idle.evict_oldest() {
        return None;
    }
    tokio::time::timeout(EVICT_WAIT, slots.clone().acquire_owned())
        .await
        .ok()?
        .ok()
}

/// One connection to the proxy listener.
#[derive(Clone)]
struct Conn {
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    listener: Arc<str>,
    /// Turns true when keygate stops: connections finish their request and close.
    stop: watch::Receiver<bool>,
}

fn http1() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.max_buf_size(MAX_HEAD_BYTES.max(8192))
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    b
}

impl Conn {
    async fn serve(self, stream: tokio::net::TcpStream) {
        let kick = Arc::new(Notify::new());
        let parked = Arc::new(Mutex::new(Some(self.shared.idle.park(&kick))));
        let set_parked =
            |parked: &Mutex<Option<u64>>, shared: &Shared, park: Option<&Arc<Notify>>| {
                let mut p = parked.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(key) = p.take() {
                    shared.idle.unpark(key);
                }
                *p = park.map(|k| shared.idle.park(k));
            };
        let this = self.clone();
        let (svc_parked, svc_kick) = (parked.clone(), kick.clone());
        let svc = service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let (parked, kick) = (svc_parked.clone(), svc_kick.clone());
            async move {
                // Busy while its request runs: never evicted mid-request.
                set_parked(&parked, &this.shared, None);
                let resp = this.request(req).await;
                set_parked(&parked, &this.shared, Some(&kick));
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = http1()
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        tokio::pin!(conn);
        let mut stop = self.stop.clone();
        let stopping = tokio::select! {
            _ = conn.as_mut() => false,
            // Evicted while idle: dropping the connection closes it.
            _ = kick.notified() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopping {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        set_parked(&parked, &self.shared, None);
    }

    /// A request on the proxy listener itself: CONNECT, or absolute-form plain HTTP.
    async fn request(&self, req: Request<Incoming>) -> Response<Body> {
        let state = self.shared.live.state.load_full();
        let start = Instant::now();
        let request_id = pipeline::new_request_id();
        let mut pending = self.begin(&state, &req, &request_id);
        let answer = if req.method() == Method::CONNECT {
            self.connect(&state, req, &mut pending, start).await
        } else {
            match self.absolute(&state, req, &mut pending).await {
                Ok(Forwarded(resp)) => {
                    // The pipeline wrote the request's own record; this one was never begun
                    // as far as the log is concerned.
                    pending.handed_over();
                    return resp;
                }
                Err(e) => Err(e),
            }
        };
        let resp = match answer {
            Ok(resp) => resp,
            Err(rejection) => {
                let r = pending.record();
                r.decision = Decision::Deny;
                r.reason = Reason::Refused(rejection.code);
                r.status = rejection.status().as_u16();
                r.blame = Some(rejection.blame());
                let mut resp = rejection.to_response(&request_id);
                if rejection.code == Code::ProxyAuthRequired {
                    resp.headers_mut().insert(
                        header::PROXY_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"keygate\", Bearer"),
                    );
                }
                r.bytes_out = resp.body().len() as u64;
                resp.map(full)
            }
        };
        if pending.is_open() {
            pending.record().latency_ms = audit::ms(start);
            pending.finish();
        }
        let mut resp = resp;
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        resp
    }

    fn begin(&self, state: &State, req: &Request<Incoming>, request_id: &str) -> Pending {
        let scanner = state.credentials.scanner();
        let (head, ()) = clone_head(req);
        let mut r = Record::request(
            &head,
            request_id,
            &self.peer,
            &self.listener,
            &state.policy_version,
            &scanner,
            false,
        );
        if req.method() == Method::CONNECT {
            let target = req.uri().authority().map_or("", |a| a.as_str());
            r.path = String::from_utf8_lossy(&scanner.redact(target.as_bytes())).into_owned();
        }
        r.person = state.default_person.clone();
        r.instance = state.control.instance.clone();
        state.audit.begin(r)
    }

    /// Who is calling: the keygate token in `Proxy-Authorization`; anything else is 407.
    fn caller(
        &self,
        state: &State,
        headers: &http::HeaderMap,
        host: &str,
        port: u16,
        pending: &mut Pending,
    ) -> Result<(Via, Identity), Rejection> {
        let via = Via {
            host: host.to_string(),
            port,
            token: proxy_token(headers).map(|t| Arc::new(Zeroizing::new(t))),
            proof: None,
        };
        if via.token.is_none() {
            return Err(Rejection::new(
                Code::ProxyAuthRequired,
                "the proxy needs your keygate token: HTTPS_PROXY=http://keygate:TOKEN@HOST:PORT (or Proxy-Authorization: Bearer TOKEN)",
            ));
        }
        let who = state.tokens.proxied(&via).map_err(|e| {
            Rejection::new(
                Code::ProxyAuthRequired,
                format!("proxy credential refused: {}", e.message),
            )
        })?;
        let config = &state.config;
        pending.record().agent(&config.agents[who.agent]);
        pipeline::admit(state, pending.record(), &who)?;
        Ok((via, who))
    }

    async fn connect(
        &self,
        state: &Arc<State>,
        mut req: Request<Incoming>,
        pending: &mut Pending,
        start: Instant,
    ) -> Result<Response<Body>, Rejection> {
        let config = state.config.clone();
        state.audit.check_writable(config.audit_fail_closed)?;
        state.control.check_state()?;
        state.control.check_frozen(None)?;
        let authority = req.uri().authority().map(|a| a.as_str().to_string());
        // A tool that cannot send proxy credentials (it holds only its placeholder) may open a
        // tunnel to a host a route names: keygate terminates it, and each request inside is then
        // identified by a live placeholder or refused by the pipeline (401) and audited there.
        // Egress tunnels, unrouted hosts and bad targets still get 407: a caller without a
        // token learns only which hosts routes name, which the agent's own env already says.
        if proxy_token(req.headers()).is_none() {
            let routed = authority
                .as_deref()
                .and_then(|a| connect::authority(a, &config.proxy.ports).ok())
                .filter(|t| {
                    config.routes.iter().any(|r| {
                        r.host.as_deref() == Some(t.host.as_str()) && r.placeholder_env.is_some()
                    })
                });
            if let Some(target) = routed {
                let via = Via {
                    host: target.host.clone(),
                    port: target.port,
                    token: None,
                    proof: None,
                };
                pending.record().destination = Some(target.host.into());
                return self.terminated(state, req, via, TOKENLESS_CALLER, pending, start);
            }
        }
        // Who first: an unauthenticated caller learns nothing about other targets.
        let (mut via, who) = self.caller(state, req.headers(), "", 0, pending)?;
        let Some(authority) = authority else {
            return Err(Rejection::new(
                Code::ConnectBadAuthority,
                "the CONNECT target must be host:port",
            ));
        };
        let target = connect::authority(&authority, &config.proxy.ports)?;
        pending.record().destination = Some(target.host.as_str().into());
        via.host = target.host.clone();
        via.port = target.port;
        let caller = who
            .token_id
            .as_deref()
            .map_or_else(|| config.agents[who.agent].name.clone(), str::to_string);
        if config
            .routes
            .iter()
            .any(|r| r.host.as_deref() == Some(target.host.as_str()))
        {
            return self.terminated(state, req, via, &caller, pending, start);
        }
        let allowed = connect::allowed(&config.proxy.egress_allow, &target.host);
        if !allowed && config.proxy.egress == Egress::Deny {
            return Err(Rejection::new(
                Code::EgressDenied,
                format!(
                    "no route serves {} and egress to it is not allowed (egress_allow, egress = \"tunnel\")",
                    target.host
                ),
            ));
        }
        let slot = self.tunnel_slot(&caller)?;
        let upstream = egress::open(
            &target,
            &config.proxy.egress_connect,
            &self.shared.own,
            config.connect_timeout,
        )
        .await?;
        let on = hyper::upgrade::on(&mut req);
        let r = pending.record();
        r.decision = Decision::Allow;
        r.reason = Reason::TunnelPassed;
        r.status = 200;
        let this = self.clone();
        let request_id = r.request_id.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Ok(up) = on.await {
                tokio::select! {
                    _ = egress::pass(TokioIo::new(up), upstream, TUNNEL_IDLE) => {}
                    why = this.until_withdrawn(&via) => {
                        tracing::info!(request_id = %request_id, host = %via.host, why, "tunnel closed");
                    }
                }
            }
        });
        Ok(empty(StatusCode::OK))
    }

    /// Returns once the tunnel's caller may no longer use it: its token was revoked (or its
    /// run ended), or keygate or its agent was frozen, or keygate is stopping. The state is
    /// read afresh each time, so a reload that drops the token closes the tunnel too.
    async fn until_withdrawn(&self, via: &Via) -> &'static str {
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TUNNEL_RECHECK) => {}
                _ = stop.wait_for(|s| *s) => return "keygate is stopping",
            }
            let state = self.shared.live.state.load_full();
            let who = match state.tokens.proxied(via) {
                Ok(who) => who,
                Err(_) => return "its token was revoked or its run ended",
            };
            let agent = state
                .config
                .agents
                .get(who.agent.0)
                .map(|a| a.name.as_str());
            if state.control.check_frozen(agent).is_err() {
                return "keygate or its agent was frozen";
            }
        }
    }

    /// Answers a CONNECT to a host a route names: 200, then the tunnel is terminated here.
    fn terminated(
        &self,
        state: &Arc<State>,
        mut req: Request<Incoming>,
        via: Via,
        caller: &str,
        pending: &mut Pending,
        start: Instant,
    ) -> Result<Response<Body>, Rejection> {
        let config = &state.config;
        if let Some(route) = config
            .routes
            .iter()
            .find(|r| r.host.as_deref() == Some(via.host.as_str()))
        {
            pending.record().route(route);
        }
        let mut via = via;
        // A tunnel without proxy credentials holds its place in the token-less pool through
        // its `Via` (dropped with the tunnel), one with them counts against its caller.
        let slot = match via.token {
            Some(_) => Some(self.tunnel_slot(caller)?),
            None => {
                via.proof = Some(self.tokenless_slot()?);
                None
            }
        };
        let on = hyper::upgrade::on(&mut req);
        let r = pending.record();
        r.decision = Decision::Allow;
        r.reason = Reason::TunnelTerminated;
        r.status = 200;
        // The CONNECT's record is finished once the client's TLS handshake is known.
        let record = pending.take();
        let this = self.clone();
        let proof = via.proof.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let serve = async {
                if let Ok(up) = on.await {
                    this.terminate(TokioIo::new(up), via, record, start).await;
                }
            };
            tokio::select! {
                _ = serve => {}
                // The token-less pool was full and this tunnel had identified nobody yet.
                _ = evicted(proof.as_deref()) => {}
            }
        });
        Ok(empty(StatusCode::OK))
    }

    /// The client's TLS inside a terminated tunnel: SNI must name the CONNECT's host; then its
    /// requests go through the pipeline.
    async fn terminate(
        &self,
        io: TokioIo<hyper::upgrade::Upgraded>,
        via: Via,
        mut record: Pending,
        start: Instant,
    ) {
        let shake = async {
            let acceptor =
                tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
            let hello = acceptor.await.map_err(|e| e.to_string())?;
            let sni = hello
                .client_hello()
                .server_name()
                .map(str::to_ascii_lowercase);
            if sni.as_deref() != Some(via.host.as_str()) {
                return Err(format!(
                    "the TLS server name {sni:?} is not the CONNECT host {}",
                    via.host
                ));
            }
            let tls = self.server_config(&via.host)?;
            hello.into_stream(tls).await.map_err(|e| e.to_string())
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, shake).await {
            Ok(Ok(tls)) => tls,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => "the TLS handshake timed out".to_string(),
                };
                tracing::info!(host = %via.host, error = %why, "tunnel TLS handshake failed");
                let r = record.record();
                r.decision = Decision::Deny;
                r.reason = Reason::Refused(Code::TunnelHandshakeFailed);
                r.blame = Some(Code::TunnelHandshakeFailed.blame());
                r.latency_ms = audit::ms(start);
                record.finish();
                return;
            }
        };
        record.record().latency_ms = audit::ms(start);
        record.finish();
        let (tls, watch) = egress::Activity::new(tls);
        let this = self.clone();
        // Without proxy credentials the tool is known only by its placeholder: a 401 carries a
        // Basic challenge so that tools which send credentials only when asked (git's helper)
        // retry with it.
        let challenge = via.token.is_none();
        let svc = service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(via.clone());
            let state = this.shared.live.state.load_full();
            let answer = pipeline::handle(
                state,
                this.peer.clone(),
                this.listener.clone(),
                pipeline::Conn::default(),
                req.map(Into::into),
            );
            async move {
                let mut resp = answer.await?;
                if challenge
                    && resp.status() == StatusCode::UNAUTHORIZED
                    && !resp.headers().contains_key(header::WWW_AUTHENTICATE)
                {
                    resp.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"keygate\""),
                    );
                }
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let conn = http1().serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = watch.idle(TUNNEL_IDLE) => return,
            // Stopping: the request in flight finishes, an idle keep-alive tunnel closes now.
            _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
        }
        tokio::select! {
            _ = conn => {}
            _ = watch.idle(TUNNEL_IDLE) => {}
        }
    }

    /// Absolute-form plain HTTP (`GET http://host/path`): for a host a route names, the
    /// request goes through the pipeline; any other host is refused (never forwarded blind).
    async fn absolute(
        &self,
        state: &Arc<State>,
        req: Request<Incoming>,
        pending: &mut Pending,
    ) -> Result<Forwarded, Rejection> {
        let uri = req.uri().clone();
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(Rejection::new(
                Code::InvalidRequestTarget,
                "this is keygate's forward proxy: send CONNECT host:443 or an absolute http:// URL",
            ));
        };
        if scheme != "http" {
            return Err(Rejection::new(
                Code::InvalidRequestTarget,
                "only http:// URLs are proxied in absolute form; https goes through CONNECT",
            ));
        }
        let (via, _) = self.caller(state, req.headers(), "", 0, pending)?;
        let port = authority.port_u16().unwrap_or(80);
        let host = match connect::host_name(authority.host()) {
            Ok(h) => h,
            Err(connect::NameError::Malformed) => {
                return Err(Rejection::new(
                    Code::ConnectBadAuthority,
                    "the URL's host is not a DNS name",
                ))
            }
            Err(connect::NameError::IpLiteral) => {
                return Err(Rejection::new(
                    Code::ConnectIpLiteral,
                    "a URL with an IP address is refused; name the host",
                ))
            }
            Err(connect::NameError::Loopback) => {
                return Err(Rejection::new(
                    Code::ConnectToKeygate,
                    "a URL naming this machine (keygate itself) is refused",
                ))
            }
        };
        pending.record().destination = Some(host.as_str().into());
        if !state
            .config
            .routes
            .iter()
            .any(|r| r.host.as_deref() == Some(host.as_str()))
        {
            return Err(Rejection::new(
                Code::EgressDenied,
                format!(
                    "no route serves {host}; plain HTTP is forwarded only for hosts routes name"
                ),
            ));
        }
        let (mut head, body) = req.into_parts();
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = uri
            .path_and_query()
            .cloned()
            .or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
        head.uri = Uri::from_parts(parts)
            .map_err(|_| Rejection::new(Code::InvalidRequestTarget, "the URL cannot be sent on"))?;
        head.headers.remove("proxy-connection");
        head.headers.remove(header::PROXY_AUTHORIZATION);
        head.extensions.insert(Via {
            host,
            port,
            token: via.token,
            proof: None,
        });
        let req = Request::from_parts(head, body.into());
        let resp = pipeline::handle(
            state.clone(),
            self.peer.clone(),
            self.listener.clone(),
            pipeline::Conn::default(),
            req,
        )
        .await
        .unwrap_or_else(|never| match never {});
        Ok(Forwarded(resp))
    }

    fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut cache = self.shared.tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(host) {
            return Ok(c.clone());
        }
        let leaf = self.shared.ca.leaf(host)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Leaf(leaf)));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if cache.len() >= 256 {
            cache.clear();
        }
        cache.insert(host.to_string(), config.clone());
        Ok(config)
    }

    /// A place in the token-less pool, made by closing its oldest unidentified tunnel when the
    /// pool is full; 429 when every one of them has identified its caller.
    fn tokenless_slot(&self) -> Result<Arc<Proof>, Rejection> {
        let mut t = self.shared.lock_tokenless();
        if t.open.len() >= MAX_TUNNELS_PER_CALLER {
            let oldest = t
                .open
                .iter()
                .find(|(_, (proven, _))| !proven)
                .map(|(k, _)| *k);
            let Some(key) = oldest else {
                return Err(Rejection::new(
                    Code::TooManyTunnels,
                    format!("{MAX_TUNNELS_PER_CALLER} tunnels without proxy credentials are open, each in use"),
                ));
            };
            if let Some((_, kick)) = t.open.remove(&key) {
                kick.notify_one();
            }
        }
        let key = t.next;
        t.next += 1;
        let kick = Arc::new(Notify::new());
        t.open.insert(key, (false, kick.clone()));
        Ok(Arc::new(Proof {
            shared: Arc::downgrade(&self.shared),
            key,
            kick,
        }))
    }

    fn tunnel_slot(&self, caller: &str) -> Result<TunnelSlot, Rejection> {
        let mut t = self
            .shared
            .tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = t.entry(caller.to_string()).or_insert(0);
        if *n >= MAX_TUNNELS_PER_CALLER {
            return Err(Rejection::new(
                Code::TooManyTunnels,
                format!("this caller already holds {MAX_TUNNELS_PER_CALLER} open tunnels"),
            ));
        }
        *n += 1;
        Ok(TunnelSlot {
            shared: self.shared.clone(),
            caller: caller.to_string(),
        })
    }
}

/// Tunnels opened without proxy credentials (tools that hold only a placeholder) share one
/// pool, which a local process holding nothing could fill. When it is full, the oldest tunnel
/// in which no request has identified its caller yet is closed to make room, so idle or
/// unidentified tunnels never lock a tool with a live placeholder out.
#[derive(Default)]
struct Tokenless {
    next: u64,
    /// Open token-less tunnels by age: whether a request identified its caller, and how to
    /// close it.
    open: BTreeMap<u64, (bool, Arc<Notify>)>,
}

/// A token-less tunnel's place in [`Tokenless`]; dropping it frees the place.
pub struct Proof {
    shared: std::sync::Weak<Shared>,
    key: u64,
    kick: Arc<Notify>,
}

impl Proof {
    fn prove(&self) {
        if let Some(shared) = self.shared.upgrade() {
            if let Some(entry) = shared.lock_tokenless().open.get_mut(&self.key) {
                entry.0 = true;
            }
        }
    }
}

impl Drop for Proof {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.lock_tokenless().open.remove(&self.key);
        }
    }
}

impl Shared {
    fn lock_tokenless(&self) -> std::sync::MutexGuard<'_, Tokenless> {
        self.tokenless.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Resolves when the tunnel was evicted from the token-less pool; never for other tunnels.
async fn evicted(proof: Option<&Proof>) {
    match proof {
        Some(p) => p.kick.notified().await,
        None => std::future::pending().await,
    }
}

/// An open tunnel, counted against its caller until dropped.
struct TunnelSlot {
    shared: Arc<Shared>,
    caller: String,
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        let mut t = self
            .shared
            .tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.caller);
            }
        }
    }
}

/// The answer of a request the pipeline handled (and audited) itself.
struct Forwarded(Response<Body>);

#[derive(Debug)]
struct Leaf(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Leaf {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The keygate token in `Proxy-Authorization`: Basic (any user, the token as password) or
/// Bearer.
fn proxy_token(headers: &http::HeaderMap) -> Option<Vec<u8>> {
    let v = headers.get(header::PROXY_AUTHORIZATION)?.as_bytes();
    let sp = v.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = (&v[..sp], v[sp + 1..].trim_ascii());
    if scheme.eq_ignore_ascii_case(b"bearer") {
        return (!rest.is_empty()).then(|| rest.to_vec());
    }
    if scheme.eq_ignore_ascii_case(b"basic") {
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?,
        );
        let colon = decoded.iter().position(|&b| b == b':')?;
        let pass = &decoded[colon + 1..];
        // curl, git and requests send a URL's password percent-encoded only when it was
        // written so; a token is base62, so there is nothing to decode.
        return (!pass.is_empty()).then(|| pass.to_vec());
    }
    None
}

fn clone_head<B>(req: &Request<B>) -> (Parts, ()) {
    let mut b = Request::builder()
        .method(req.method().clone())
        .uri(req.uri().clone())
        .version(req.version());
    if let Some(h) = b.headers_mut() {
        h.clone_from(req.headers());
    }
    b.body(()).unwrap_or_else(|_| Request::new(())).into_parts()
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn full(b: Bytes) -> Body {
    Full::new(b)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(v: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(header::PROXY_AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn proxy_token_comes_from_basic_password_or_bearer_only() {
        let basic = base64::engine::general_purpose::STANDARD.encode("keygate:kg_abc");
        assert_eq!(
            proxy_token(&with(&format!("Basic {basic}"))).unwrap(),
            b"kg_abc"
        );
        assert_eq!(proxy_token(&with("bearer kg_abc")).unwrap(), b"kg_abc");
        let no_pass = base64::engine::general_purpose::STANDARD.encode("kg_abc");
        assert!(proxy_token(&with(&format!("Basic {no_pass}"))).is_none());
        assert!(proxy_token(&with("Digest kg_abc")).is_none());
        assert!(proxy_token(&http::HeaderMap::new()).is_none());
    }

    #[test]
    fn via_debug_never_shows_the_token() {
        let via = Via {
            host: "h.example".into(),
            port: 443,
            token: Some(Arc::new(Zeroizing::new(b"kg_secret_token".to_vec()))),
            proof: None,
        };
        assert!(!format!("{via:?}").contains("kg_secret"));
    }
}
