//! Upstream connection affinity: an HTTP/1 downstream connection keeps its own upstream
//! connection while both live. These tests watch, from the upstream's side, which upstream
//! connection each request came on and what credential it carried.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// Built at run time so the repository's own `keygate redact --check` finds no key literal.
fn key(which: &str) -> String {
    format!("sk-test-affinity-{which}-{}", "0123456789abcdef")
}

fn token(which: &str) -> String {
    format!("{}_affinity{which}token0123456789abcdef", "kg")
}

fn config(upstream: std::net::SocketAddr, connections: &str) -> String {
    format!(
        r#"listen = ["127.0.0.1:0"]
audit_log = "AUDIT"

[connections]
{connections}

[secrets.ka]
source = "env"
name = "AFF_KEY_A"

[secrets.kb]
source = "env"
name = "AFF_KEY_B"

[routes.ra]
prefix = "/ra"
upstream = "http://{upstream}"
secret = "ka"
allow = ["POST /v1/chat/completions"]

[routes.rb]
prefix = "/rb"
upstream = "http://{upstream}"
secret = "kb"
allow = ["POST /v1/chat/completions"]

[agents.a]
token_env = "AFF_TOKEN_A"
routes = ["ra"]

[agents.b]
token_env = "AFF_TOKEN_B"
routes = ["rb"]
"#
    )
}

fn start(upstream: std::net::SocketAddr) -> Keygate {
    start_with(upstream, "")
}

/// With `[connections]` keys (`h2c`, `runtime`).
fn start_with(upstream: std::net::SocketAddr, connections: &str) -> Keygate {
    start_config(&config(upstream, connections))
}

/// A whole config with this file's keys and tokens in the environment.
fn start_config(cfg: &str) -> Keygate {
    let (ka, kb, ta, tb) = (key("a"), key("b"), token("a"), token("b"));
    Keygate::start(
        cfg,
        &[
            ("AFF_KEY_A", ka.as_str()),
            ("AFF_KEY_B", kb.as_str()),
            ("AFF_TOKEN_A", ta.as_str()),
            ("AFF_TOKEN_B", tb.as_str()),
        ],
    )
}

/// One request as the upstream saw it: which of its connections, which credential.
#[derive(Clone, Debug)]
struct Hit {
    conn: usize,
    auth: String,
}

/// An HTTP/1.1 upstream that numbers its connections and records each request's.
struct Numbered {
    addr: std::net::SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Numbered {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn numbered_upstream() -> Numbered {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(Mutex::new(Vec::new()));
    let rec = hits.clone();
    let next = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let conn = next.fetch_add(1, Ordering::Relaxed);
            let rec = rec.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let auth = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    rec.lock().unwrap().push(Hit { conn, auth });
                    async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(full("{}")))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Numbered { addr, hits, task }
}

/// A downstream HTTP/1.1 connection of its own to keygate (the pooled test client could spread
/// requests over several).
struct Downstream {
    send: hyper::client::conn::http1::SendRequest<B>,
    conn: tokio::task::JoinHandle<()>,
    host: String,
}

impl Drop for Downstream {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

type B = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn downstream(kg: &Keygate) -> Downstream {
    let host = kg.url.trim_start_matches("http://").to_string();
    let stream = TcpStream::connect(&host).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    Downstream { send, conn, host }
}

impl Downstream {
    async fn post(&mut self, route: &str, token: &str) -> u16 {
        let req = hyper::Request::post(format!("/{route}/v1/chat/completions"))
            .header("host", &self.host)
            .header("authorization", format!("Bearer {token}"))
            .body(full("{}"))
            .unwrap();
        self.send.ready().await.unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), self.send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await.unwrap();
        status
    }
}

fn last_hit(up: &Numbered) -> Hit {
    up.hits.lock().unwrap().last().cloned().unwrap()
}

#[tokio::test]
async fn affinity_two_callers_never_share_an_upstream_connection_and_each_request_carries_its_own_credential(
) {
    let up = numbered_upstream().await;
    let kg = start(up.addr);
    let (ta, tb) = (token("a"), token("b"));
    let (ka, kb) = (
        format!("Bearer {}", key("a")),
        format!("Bearer {}", key("b")),
    );

    let mut a = downstream(&kg).await;
    let mut b = downstream(&kg).await;
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    // Interleaved while both connections are open.
    for _ in 0..3 {
        assert_eq!(a.post("ra", &ta).await, 200);
        let hit = last_hit(&up);
        assert_eq!(hit.auth, ka);
        on_a.push(hit.conn);
        assert_eq!(b.post("rb", &tb).await, 200);
        let hit = last_hit(&up);
        assert_eq!(hit.auth, kb);
        on_b.push(hit.conn);
    }
    assert!(
        on_a.iter().all(|c| !on_b.contains(c)),
        "a on {on_a:?}, b on {on_b:?}"
    );
    // Each downstream connection kept its own upstream connection.
    on_a.dedup();
    on_b.dedup();
    assert_eq!((on_a.len(), on_b.len()), (1, 1), "a {on_a:?}, b {on_b:?}");

    // a leaves: its upstream connection goes back to the pool, and the next caller that takes
    // it sends its own credential on it, none of a's.
    drop(a);
    let mut c = downstream(&kg).await;
    let mut on_c = Vec::new();
    for _ in 0..2 {
        // The pool gets a's connection once keygate saw a's close; until then c may open one.
        assert_eq!(c.post("rb", &tb).await, 200);
        let hit = last_hit(&up);
        assert_eq!(hit.auth, kb, "a request carries only its own credential");
        on_c.push(hit.conn);
    }
    assert!(!on_c.contains(&on_b[0]), "b is still open: c {on_c:?}");
    let hits = up.hits.lock().unwrap().clone();
    assert_eq!(hits.len(), 8);
    assert_eq!(hits.iter().filter(|h| h.auth == ka).count(), 3, "{hits:?}");
    assert_eq!(kg.audit_records(8).len(), 8);
}

#[tokio::test]
async fn affinity_a_connection_returned_to_the_pool_serves_the_next_caller_with_its_own_credential()
{
    let up = numbered_upstream().await;
    let kg = start(up.addr);
    let (ta, tb) = (token("a"), token("b"));
    let kb = format!("Bearer {}", key("b"));

    let mut a = downstream(&kg).await;
    assert_eq!(a.post("ra", &ta).await, 200);
    let first = last_hit(&up).conn;
    drop(a);
    // Bounded wait for keygate to see a's close and return the connection to the pool.
    let mut reused = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut c = downstream(&kg).await;
        assert_eq!(c.post("rb", &tb).await, 200);
        let hit = last_hit(&up);
        assert_eq!(hit.auth, kb);
        if hit.conn == first {
            reused = true;
            break;
        }
    }
    assert!(reused, "the returned connection was never reused");
}

/// An upstream that answers one request per connection without saying so (no `Connection:
/// close`), then closes the connection, as an upstream whose keep-alive timeout ran out does.
async fn closing_upstream() -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::Relaxed);
            conns.spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head, then the body its Content-Length or chunked framing says.
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if request_complete(&buf) {
                        break;
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, accepted, task)
}

fn request_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let body = &buf[end + 4..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap())
        .unwrap_or(0);
    body.len() >= len
}

#[tokio::test]
async fn affinity_an_upstream_that_closed_the_idle_connection_does_not_fail_the_next_request() {
    let (addr, accepted, task) = closing_upstream().await;
    let kg = start(addr);
    let ta = token("a");
    let mut a = downstream(&kg).await;
    for i in 1..=3 {
        assert_eq!(a.post("ra", &ta).await, 200, "request {i}");
        // Give the close time to arrive, as it does between an agent's calls.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each request found the previous connection closed and opened its own.
    assert_eq!(accepted.load(Ordering::Relaxed), 3);
    let recs = kg.audit_records(3);
    assert!(recs.iter().all(|r| r["status"] == 200), "{recs:?}");
    task.abort();
}

#[tokio::test]
async fn affinity_pipelined_requests_on_one_connection_are_answered_in_order() {
    let up = numbered_upstream().await;
    let kg = start(up.addr);
    let ta = token("a");
    let host = kg.url.trim_start_matches("http://").to_string();
    let one = |_n: usize| {
        format!(
            "POST /ra/v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {ta}\r\ncontent-length: 2\r\n\r\n{{}}"
        )
    };
    let mut s = TcpStream::connect(&host).await.unwrap();
    // Three requests in one write, before any answer; the last one asks to close.
    let mut all = one(1) + &one(2) + &one(3);
    let last = all.rfind("content-length").unwrap();
    all.insert_str(last, "connection: close\r\n");
    s.write_all(all.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    let hits = up.hits.lock().unwrap().clone();
    assert_eq!(hits.len(), 3);
    assert!(hits.iter().all(|h| h.conn == hits[0].conn), "{hits:?}");
}

#[tokio::test]
async fn affinity_h2_downstream_streams_run_at_once_over_the_pooled_client() {
    let up = numbered_upstream().await;
    let kg = start(up.addr);
    let ta = token("a");
    let c = h2c_client();
    let reqs = (0..4).map(|_| {
        let c = c.clone();
        let url = format!("{}/ra/v1/chat/completions", kg.url);
        let ta = ta.clone();
        async move {
            let resp = c
                .request(
                    hyper::Request::post(url)
                        .header("authorization", format!("Bearer {ta}"))
                        .body(full("{}"))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(resp.version(), http::Version::HTTP_2);
            resp.status().as_u16()
        }
    });
    let statuses = tokio::time::timeout(Duration::from_secs(10), futures_join(reqs))
        .await
        .unwrap();
    assert_eq!(statuses, vec![200; 4]);
    assert_eq!(up.hits.lock().unwrap().len(), 4);
    assert_eq!(kg.audit_records(4).len(), 4);
}

async fn futures_join<F: std::future::Future<Output = u16> + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<u16> {
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn affinity_http1_only_listener_serves_http1_and_answers_an_h2_preface_without_serving_it() {
    let up = numbered_upstream().await;
    let kg = start_with(up.addr, "h2c = false");
    // Attack-ish: an h2 prior-knowledge client is not served, and the connection ends promptly.
    let host = kg.url.trim_start_matches("http://").to_string();
    let mut raw = TcpStream::connect(&host).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut got))
        .await
        .expect("an h2 preface on an HTTP/1-only listener left the connection open")
        .ok();
    let text = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.1 5"),
        "{text}"
    );
    let h2 = h2c_client();
    let tried = tokio::time::timeout(
        Duration::from_secs(10),
        h2.request(
            hyper::Request::post(format!("{}/ra/v1/chat/completions", kg.url))
                .header("authorization", format!("Bearer {}", token("a")))
                .body(full("{}"))
                .unwrap(),
        ),
    )
    .await
    .expect("the h2 client hung");
    assert!(tried.is_err(), "h2c was served with h2c = false");
    assert!(up.hits.lock().unwrap().is_empty());
    // Benign neighbour: HTTP/1.1 on the same listener is served and audited.
    let mut d = downstream(&kg).await;
    assert_eq!(d.post("ra", &token("a")).await, 200);
    assert_eq!(d.post("ra", &token("a")).await, 200);
    assert_eq!(last_hit(&up).auth, format!("Bearer {}", key("a")));
    let records = kg.audit_records(2);
    assert!(records.iter().all(|r| r["status"] == 200), "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_per_core_runtime_keeps_each_connection_on_its_own_upstream_connection_and_credential(
) {
    const CONNS: usize = 24;
    const EACH: usize = 5;
    let up = numbered_upstream().await;
    let kg = start_with(up.addr, "runtime = \"per-core\"");
    if std::thread::available_parallelism().unwrap().get() > 1 {
        let cores = std::fs::read_dir(format!("/proc/{}/task", kg.pid()))
            .unwrap()
            .filter(|t| {
                let comm = t.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm)
                    .unwrap_or_default()
                    .starts_with("keygate-core-")
            })
            .count();
        assert_eq!(cores, std::thread::available_parallelism().unwrap().get());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONNS {
        let mut d = downstream(&kg).await;
        let (route, agent) = if i % 2 == 0 { ("ra", "a") } else { ("rb", "b") };
        tasks.spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..EACH {
                statuses.push(d.post(route, &token(agent)).await);
            }
            statuses
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(20), tasks.join_all())
        .await
        .expect("per-core runtime did not answer in time");
    assert!(all.iter().flatten().all(|s| *s == 200), "{all:?}");
    let hits = up.hits.lock().unwrap().clone();
    assert_eq!(hits.len(), CONNS * EACH);
    // Every upstream connection carried one caller's credential only.
    let mut by_conn: std::collections::HashMap<usize, std::collections::HashSet<String>> =
        Default::default();
    for h in &hits {
        by_conn.entry(h.conn).or_default().insert(h.auth.clone());
    }
    assert!(by_conn.values().all(|a| a.len() == 1), "{by_conn:?}");
    assert!(
        by_conn.len() >= CONNS,
        "{} upstream connections",
        by_conn.len()
    );
    let records = kg.audit_records(CONNS * EACH);
    assert_eq!(records.len(), CONNS * EACH);
}

/// A raw HTTP/1.1 upstream: each accepted connection, numbered from 0, is served by `serve`.
/// Counts connections.
async fn raw_upstream<F, Fut>(
    serve: F,
) -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
)
where
    F: Fn(TcpStream, usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    let task = tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            set.spawn(serve(s, c.fetch_add(1, Ordering::Relaxed)));
        }
    });
    (addr, conns, task)
}

/// Reads the connection's next whole request (headers and body); false at its end.
async fn next_request(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !request_complete(&buf) {
        let n = s.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return false;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    true
}

/// A raw HTTP/1.1 upstream that answers every request on a connection with `answer` and keeps
/// the connection open; counts connections and requests.
async fn scripted_upstream(
    answer: &'static [u8],
) -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let reqs = Arc::new(AtomicUsize::new(0));
    let r = reqs.clone();
    let (addr, conns, task) = raw_upstream(move |mut s, _| {
        let r = r.clone();
        async move {
            while next_request(&mut s).await {
                r.fetch_add(1, Ordering::Relaxed);
                if s.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, conns, reqs, task)
}

#[tokio::test]
async fn affinity_an_answer_with_both_transfer_encoding_and_content_length_does_not_keep_its_connection(
) {
    // The chunked framing wins (the agent gets the whole body), but an upstream (or a proxy
    // before it) that frames an answer two ways may be desynchronised: the next request goes on
    // a new connection.
    let (addr, conns, reqs, task) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    .await;
    let kg = start(addr);
    let ta = token("a");
    let mut a = downstream(&kg).await;
    for i in 1..=2 {
        assert_eq!(a.post("ra", &ta).await, 200, "request {i}");
    }
    assert_eq!(reqs.load(Ordering::Relaxed), 2);
    assert_eq!(conns.load(Ordering::Relaxed), 2);
    task.abort();

    // Benign neighbour: chunked alone keeps the connection for the next request.
    let (addr, conns, reqs, task) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    .await;
    let kg = start(addr);
    let mut a = downstream(&kg).await;
    for i in 1..=2 {
        assert_eq!(a.post("ra", &ta).await, 200, "request {i}");
    }
    assert_eq!(reqs.load(Ordering::Relaxed), 2);
    assert_eq!(conns.load(Ordering::Relaxed), 1);
    let recs = kg.audit_records(2);
    assert!(recs.iter().all(|r| r["status"] == 200), "{recs:?}");
    task.abort();
}

#[tokio::test]
async fn affinity_bytes_after_an_answer_do_not_reach_the_next_request() {
    // An upstream that sends a second answer nobody asked for: it must not become the answer
    // to the next request (a response-queue desync), and the connection is not kept.
    let (addr, conns, reqs, task) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 418 I'm a teapot\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let kg = start(addr);
    let ta = token("a");
    let mut a = downstream(&kg).await;
    for i in 1..=2 {
        assert_eq!(a.post("ra", &ta).await, 200, "request {i}");
    }
    assert_eq!(reqs.load(Ordering::Relaxed), 2);
    assert_eq!(conns.load(Ordering::Relaxed), 2);
    task.abort();
}

/// What an upstream does to a connection after answering its first request, while keygate's
/// side of it idles (the downstream connection waits between an agent's calls).
#[derive(Clone, Copy, Debug)]
enum WhenIdle {
    /// Closes it (FIN), as an upstream whose keep-alive timeout ran out does.
    Close,
    /// Resets it (RST), as an upstream that drops its state does.
    Reset,
    /// Answers a request nobody sent with a 408 and closes, as nginx and node do on idle
    /// timeout.
    Send408AndClose,
    /// Sends bytes nobody asked for and keeps the connection open.
    Junk,
}

/// An upstream that answers each connection's first request with a 200, then does `then` to
/// the connection a moment later. Counts connections, and requests answered on a connection
/// after its first (which must stay 0: keygate must not reuse such a connection).
async fn idle_misbehaving_upstream(
    then: WhenIdle,
) -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let reused = Arc::new(AtomicUsize::new(0));
    let r = reused.clone();
    let (addr, conns, task) = raw_upstream(move |mut s, _| {
        let r = r.clone();
        async move {
            let mut answered = 0;
            while next_request(&mut s).await {
                if answered > 0 {
                    r.fetch_add(1, Ordering::Relaxed);
                }
                answered += 1;
                if s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    .await
                    .is_err()
                {
                    return;
                }
                if answered > 1 {
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                match then {
                    WhenIdle::Close => {
                        let _ = s.shutdown().await;
                        return;
                    }
                    WhenIdle::Reset => {
                        // A zero linger resets at once: nothing blocks on the drop.
                        #[allow(deprecated)]
                        let _ = s.set_linger(Some(Duration::ZERO));
                        return;
                    }
                    WhenIdle::Send408AndClose => {
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
                            )
                            .await;
                        let _ = s.shutdown().await;
                        return;
                    }
                    WhenIdle::Junk => {
                        let _ = s.write_all(b"HTTP/1.1 418 unasked\r\n\r\njunk").await;
                    }
                }
            }
        }
    })
    .await;
    (addr, conns, reused, task)
}

#[tokio::test]
async fn affinity_an_upstream_that_closes_resets_or_speaks_while_idle_never_fails_or_answers_the_next_request(
) {
    for then in [
        WhenIdle::Close,
        WhenIdle::Reset,
        WhenIdle::Send408AndClose,
        WhenIdle::Junk,
    ] {
        let (addr, conns, reused, task) = idle_misbehaving_upstream(then).await;
        let kg = start(addr);
        let ta = token("a");
        // The connection bound to the downstream connection, between two of its requests.
        let mut a = downstream(&kg).await;
        for i in 1..=3 {
            assert_eq!(a.post("ra", &ta).await, 200, "{then:?}: request {i}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Each request went on a fresh connection; none was written to the spoiled one.
        assert_eq!(conns.load(Ordering::Relaxed), 3, "{then:?}");
        assert_eq!(reused.load(Ordering::Relaxed), 0, "{then:?}");
        // The connection idling in the pool (its downstream connection closed), taken by the
        // next downstream connection.
        drop(a);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut b = downstream(&kg).await;
        assert_eq!(b.post("ra", &ta).await, 200, "{then:?}: from the pool");
        assert_eq!(conns.load(Ordering::Relaxed), 4, "{then:?}");
        assert_eq!(reused.load(Ordering::Relaxed), 0, "{then:?}");
        let recs = kg.audit_records(4);
        assert!(
            recs.iter().all(|r| r["status"] == 200),
            "{then:?}: {recs:?}"
        );
        drop(b);
        task.abort();
    }
}

#[tokio::test]
async fn affinity_a_quiet_upstream_keeps_one_connection_between_requests() {
    // Benign neighbour of the test above: an upstream that leaves the idle connection alone
    // serves every request of the downstream connection, and the next one's, on it.
    let (addr, conns, reqs, task) =
        scripted_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
    let kg = start(addr);
    let ta = token("a");
    let mut a = downstream(&kg).await;
    for i in 1..=3 {
        assert_eq!(a.post("ra", &ta).await, 200, "request {i}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut b = downstream(&kg).await;
    assert_eq!(b.post("ra", &ta).await, 200, "from the pool");
    assert_eq!(reqs.load(Ordering::Relaxed), 4);
    assert_eq!(conns.load(Ordering::Relaxed), 1);
    task.abort();
}

#[tokio::test]
async fn affinity_an_upstream_that_dribbles_an_endless_chunk_size_line_is_cut_at_the_idle_deadline_and_not_reused(
) {
    // The chunk-size line is not bounded in length (hyper's decoder does not bound it either:
    // each byte is consumed as it comes), so what stops an upstream that sends `0` after `0`
    // without ever ending the line is time: no frame comes, so the idle deadline passes.
    let (addr, conns, task) = raw_upstream(|mut s, nth| async move {
        if !next_request(&mut s).await {
            return;
        }
        if nth > 0 {
            // Any later connection answers properly.
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                .await;
            let _ = next_request(&mut s).await;
            return;
        }
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
        if s.write_all(head).await.is_err() {
            return;
        }
        // At most 10 s of zeros, so the test stops it whatever happens.
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if s.write_all(b"0").await.is_err() {
                return;
            }
        }
    })
    .await;
    let cfg = config(addr, "").replace(
        "prefix = \"/ra\"\n",
        "prefix = \"/ra\"\ntimeout = \"400ms\"\n",
    );
    let kg = start_config(&cfg);
    let ta = token("a");
    let mut a = downstream(&kg).await;
    let req = hyper::Request::post("/ra/v1/chat/completions")
        .header("host", &a.host)
        .header("authorization", format!("Bearer {ta}"))
        .body(full("{}"))
        .unwrap();
    a.send.ready().await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), a.send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match body.frame().await {
                Some(Ok(f)) => got.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "keygate must cut the answer at its idle deadline"
    );
    assert_eq!(
        &got[..],
        b"hello",
        "the data before the endless line passes"
    );
    let recs = kg.audit_records(1);
    assert_eq!(recs[0]["reason"], "upstream_idle_timeout", "{recs:?}");
    // The cut connection is not reused: the next request, on a new downstream connection,
    // gets a proper answer on a new upstream connection.
    let mut b = downstream(&kg).await;
    assert_eq!(b.post("ra", &ta).await, 200);
    assert_eq!(conns.load(Ordering::Relaxed), 2);
    task.abort();
}
