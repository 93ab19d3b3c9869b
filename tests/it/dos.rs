//! Denial of service from a local process, through the real binary: idle and preface-only
//! connections, a full listener, stalled request bodies, clients that stop reading, slow
//! responses past their deadline, secret commands (environment and process group), an untrusted
//! token store, and signals. Every test is bounded in time and in connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "sk-test-dos-key-0123456789abcdef";
/// Built at run time so the repository's own `keygate redact --check` finds no token literal.
const TOKEN: &str = concat!("kg", "_dostesttoken0123456789abcdefXYZ");
/// The client preface of HTTP/2 with prior knowledge, then an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// `top` goes before the tables (or is a `[connections]` table); `route` extends the route.
fn config(upstream: std::net::SocketAddr, top: &str, route: &str) -> String {
    format!(
        r#"listen = ["127.0.0.1:0"]
audit_log = "AUDIT"

{top}

[secrets.k]
source = "env"
name = "DOS_KEY"

[routes.r]
prefix = "/r"
upstream = "http://{upstream}"
secret = "k"
allow = ["POST /v1/chat/completions", "POST /v1/stream", "POST /v1/endless", "POST /v1/big", "POST /v1/drip"]
{route}

[agents.a]
token_env = "DOS_TOKEN"
"#
    )
}

fn env() -> [(&'static str, &'static str); 2] {
    [("DOS_KEY", KEY), ("DOS_TOKEN", TOKEN)]
}

type B = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn post(url: &str, body: B) -> hyper::Request<B> {
    hyper::Request::post(url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(body)
        .unwrap()
}

fn stream_of<S>(s: S) -> hyper::Response<B>
where
    S: futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static,
{
    hyper::Response::new(StreamBody::new(s).boxed())
}

fn from_rx(
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// An upstream by path: `/v1/stream` sends one event and then holds the stream open until
/// `release` is notified; `/v1/endless` never stops sending 64 KiB chunks; `/v1/big` sends 4 MiB
/// and ends; `/v1/drip` sends a small chunk every 100 ms forever; anything else answers JSON.
fn upstream_handler(release: Arc<tokio::sync::Notify>) -> Handler {
    Arc::new(move |req| {
        let path = req.uri().path().to_string();
        if path.ends_with("/v1/stream") {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let release = release.clone();
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"data: first\n\n"))))
                    .await;
                tokio::select! {
                    _ = release.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(25)) => {}
                }
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"data: last\n\n"))))
                    .await;
            });
            stream_of(from_rx(rx))
        } else if path.ends_with("/v1/endless") {
            let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
            stream_of(futures_util::stream::iter(std::iter::repeat_with(
                move || Ok(Frame::data(chunk.clone())),
            )))
        } else if path.ends_with("/v1/big") {
            let chunk = Bytes::from(vec![b'b'; 64 * 1024]);
            stream_of(futures_util::stream::iter(
                std::iter::repeat_n(chunk, 64).map(|c| Ok(Frame::data(c))),
            ))
        } else if path.ends_with("/v1/drip") {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                for _ in 0..250 {
                    if tx
                        .send(Ok(Frame::data(Bytes::from_static(b"data: drip\n\n"))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            stream_of(from_rx(rx))
        } else {
            hyper::Response::new(full(r#"{"ok":true}"#))
        }
    })
}

fn addr(kg: &Keygate) -> String {
    kg.url.trim_start_matches("http://").to_string()
}

/// A whole HTTP/1.1 request with this body, on a raw connection.
fn raw_post(addr: &str, path: &str, content_length: usize, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n"
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Reads until the peer closes (or `within` passes); returns what was read.
async fn read_to_close(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    out
}

/// Whether keygate closed this connection: a read returns end of file or a reset (bounded).
async fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Polls the audit log (bounded) for a request record matching `pred`.
fn wait_for_record(
    kg: &Keygate,
    within: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(r) = kg
            .audit_all()
            .into_iter()
            .find(|r| r.get("request_id").is_some() && pred(r))
        {
            return Some(r);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn raise_own_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dos_idle_connections_past_the_open_files_limit_do_not_stop_an_agent_request() {
    const IDLE: usize = 1_100;
    let ours = raise_own_nofile();
    assert!(
        ours > IDLE as u64 + 64,
        "the test itself needs {IDLE} descriptors"
    );
    let up = upstream(upstream_handler(Default::default())).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    // The usual limit, soft and hard, so raising it at start cannot help: only the connection
    // cap and eviction can.
    // Timeouts longer than the test, so only the cap and its eviction can keep keygate answering.
    let top = "[connections]\nfirst_request_timeout = \"60s\"\nidle_timeout = \"60s\"";
    let kg = Keygate::start_wrapped(
        &config(up.addr, top, ""),
        &env(),
        dir,
        audit,
        &["sh", "-c", "ulimit -n 1024 && exec \"$0\" \"$@\""],
    );
    let a = addr(&kg);
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut idle = Vec::with_capacity(IDLE);
        for i in 0..IDLE {
            let mut s = TcpStream::connect(&a).await.unwrap();
            // One in ten speaks HTTP/2: the preface and nothing more.
            if i % 10 == 0 {
                s.write_all(H2_PREFACE).await.unwrap();
            }
            idle.push(s);
        }
        let resp = client()
            .request(post(&format!("{}/r/v1/chat/completions", kg.url), full("{}")))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "an agent request after {IDLE} idle connections");
        // The longest-idle connection made room: it is closed.
        assert!(closed_by_peer(&mut idle[1], Duration::from_secs(10)).await);
        let open = idle
            .iter()
            .filter(|s| {
                // Drain what keygate sent (an h2 peer gets its SETTINGS); open means no EOF yet.
                let mut b = [0u8; 256];
                loop {
                    match s.try_read(&mut b) {
                        Ok(0) => return false,
                        Ok(_) => continue,
                        Err(e) => return e.kind() == std::io::ErrorKind::WouldBlock,
                    }
                }
            })
            .count();
        eprintln!("measured: {IDLE} idle connections opened, {open} still held open by keygate, agent request answered 200");
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn dos_silent_and_preface_only_connections_are_closed_after_the_first_request_timeout() {
    let up = upstream(upstream_handler(Default::default())).await;
    let kg = Keygate::start(
        &config(
            up.addr,
            "[connections]\nfirst_request_timeout = \"1s\"\nidle_timeout = \"2s\"",
            "",
        ),
        &env(),
    );
    let a = addr(&kg);
    let mut silent = TcpStream::connect(&a).await.unwrap();
    let mut preface = TcpStream::connect(&a).await.unwrap();
    preface.write_all(H2_PREFACE).await.unwrap();
    // Benign neighbour: a prompt request on a keep-alive connection is answered.
    let mut prompt = TcpStream::connect(&a).await.unwrap();
    prompt
        .write_all(&raw_post(&a, "/r/v1/chat/completions", 2, b"{}"))
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), prompt.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    assert!(closed_by_peer(&mut silent, Duration::from_secs(15)).await);
    assert!(closed_by_peer(&mut preface, Duration::from_secs(15)).await);
    // ...and once idle past idle_timeout, the keep-alive connection is closed too.
    assert!(closed_by_peer(&mut prompt, Duration::from_secs(15)).await);
}

#[tokio::test]
async fn dos_listener_full_of_busy_connections_answers_503_too_many_connections() {
    let release = Arc::new(tokio::sync::Notify::new());
    let up = upstream(upstream_handler(release.clone())).await;
    let kg = Keygate::start(
        &config(up.addr, "[connections]\nmax_per_listener = 2", ""),
        &env(),
    );
    let url = format!("{}/r/v1/stream", kg.url);
    let c = client();
    tokio::time::timeout(Duration::from_secs(25), async {
        // Two streams in flight fill the listener.
        let mut busy = Vec::new();
        for _ in 0..2 {
            let resp = c.request(post(&url, full("{}"))).await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            body.frame().await.unwrap().unwrap();
            busy.push(body);
        }
        let a = addr(&kg);
        let mut s = TcpStream::connect(&a).await.unwrap();
        s.write_all(&raw_post(&a, "/r/v1/chat/completions", 2, b"{}"))
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&read_to_close(&mut s, Duration::from_secs(10)).await)
            .to_string();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.contains(r#""code":"too_many_connections""#),
            "{answer}"
        );
        // Benign neighbour: once the streams end, a new connection is served.
        for _ in 0..2 {
            release.notify_one();
        }
        for mut b in busy {
            while let Some(f) = b.frame().await {
                f.unwrap();
            }
        }
        let mut served = false;
        for _ in 0..50 {
            let resp = client()
                .request(post(
                    &format!("{}/r/v1/chat/completions", kg.url),
                    full("{}"),
                ))
                .await
                .unwrap();
            if resp.status() == 200 {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(served);
    })
    .await
    .expect("bounded");
    let refused = wait_for_record(&kg, Duration::from_secs(10), |r| {
        r["reason"] == "too_many_connections"
    })
    .expect("the 503 is audited");
    assert_eq!(refused["status"], 503);
}

#[tokio::test]
async fn dos_request_body_that_stalls_gets_408_and_is_audited() {
    // Buffered (the default scan reads the body whole) and streamed (scan off).
    for scan in ["", "request_scan = \"off\""] {
        let up = upstream(upstream_handler(Default::default())).await;
        let kg = Keygate::start(
            &config(
                up.addr,
                "[connections]\nrequest_body_timeout = \"1s\"",
                scan,
            ),
            &env(),
        );
        let a = addr(&kg);
        // Benign neighbour: a whole body is forwarded.
        let mut ok = TcpStream::connect(&a).await.unwrap();
        ok.write_all(&raw_post(&a, "/r/v1/chat/completions", 2, b"{}"))
            .await
            .unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), ok.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "scan {scan:?}");

        let mut s = TcpStream::connect(&a).await.unwrap();
        s.write_all(&raw_post(&a, "/r/v1/chat/completions", 100, b"{\"a\":"))
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&read_to_close(&mut s, Duration::from_secs(15)).await)
            .to_string();
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "scan {scan:?}: {answer}"
        );
        assert!(answer.contains("request_body_timeout"), "{answer}");
        let r = wait_for_record(&kg, Duration::from_secs(10), |r| r["status"] == 408)
            .expect("the 408 is audited");
        assert_eq!(r["reason"], "request_body_timeout");
        assert_eq!(r["blame"], "agent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dos_http1_client_that_stops_reading_is_closed_and_audited_as_client_stalled() {
    let up = upstream(upstream_handler(Default::default())).await;
    let kg = Keygate::start(&config(up.addr, "", "timeout = \"2s\""), &env());
    let a = addr(&kg);
    tokio::time::timeout(Duration::from_secs(28), async {
        // Benign neighbour: a large answer read to the end completes and is audited as allowed.
        let resp = client()
            .request(post(&format!("{}/r/v1/big", kg.url), full("{}")))
            .await
            .unwrap();
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 4 * 1024 * 1024);

        let mut s = TcpStream::connect(&a).await.unwrap();
        s.write_all(&raw_post(&a, "/r/v1/endless", 2, b"{}"))
            .await
            .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        // ...and stop reading. keygate closes the connection and writes the record.
        let r = tokio::task::block_in_place(|| {
            wait_for_record(&kg, Duration::from_secs(20), |r| {
                r["path"] == "/r/v1/endless"
            })
        })
        .expect("the stalled request is audited");
        assert_eq!(r["reason"], "client_stalled");
        assert!(closed_by_peer(&mut s, Duration::from_secs(10)).await);
        let big =
            wait_for_record(&kg, Duration::from_secs(5), |r| r["path"] == "/r/v1/big").unwrap();
        assert_eq!(big["reason"], "allowed");
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dos_h2_client_that_stops_reading_is_closed_and_audited_as_client_stalled() {
    let up = upstream(upstream_handler(Default::default())).await;
    let kg = Keygate::start(&config(up.addr, "", "timeout = \"2s\""), &env());
    tokio::time::timeout(Duration::from_secs(28), async {
        let c = h2c_client();
        // Benign neighbour on the same kind of connection.
        let resp = c
            .request(post(&format!("{}/r/v1/big", kg.url), full("{}")))
            .await
            .unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 4 * 1024 * 1024);

        let resp = h2c_client()
            .request(post(&format!("{}/r/v1/endless", kg.url), full("{}")))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let held = resp.into_body(); // never polled
        let r = tokio::task::block_in_place(|| {
            wait_for_record(&kg, Duration::from_secs(20), |r| {
                r["path"] == "/r/v1/endless"
            })
        })
        .expect("the stalled request is audited");
        assert_eq!(r["reason"], "client_stalled");
        drop(held);
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn dos_response_past_max_response_time_is_ended_and_audited() {
    let up = upstream(upstream_handler(Default::default())).await;
    let kg = Keygate::start(&config(up.addr, "", "max_response_time = \"3s\""), &env());
    tokio::time::timeout(Duration::from_secs(25), async {
        // Benign neighbour: an answer that ends is passed whole.
        let resp = client()
            .request(post(
                &format!("{}/r/v1/chat/completions", kg.url),
                full("{}"),
            ))
            .await
            .unwrap();
        assert_eq!(body_json(resp).await["ok"], true);

        let resp = client()
            .request(post(&format!("{}/r/v1/drip", kg.url), full("{}")))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut ended_with_error = false;
        while let Some(f) = body.frame().await {
            if f.is_err() {
                ended_with_error = true;
                break;
            }
        }
        assert!(
            ended_with_error,
            "a drip of 25 s must be cut at max_response_time"
        );
    })
    .await
    .expect("bounded");
    let r = wait_for_record(&kg, Duration::from_secs(10), |r| r["path"] == "/r/v1/drip").unwrap();
    assert_eq!(r["reason"], "max_response_time_exceeded");
}

fn command_config(upstream: std::net::SocketAddr, dir: &std::path::Path) -> String {
    let d = dir.display();
    format!(
        r#"listen = ["127.0.0.1:0"]
audit_log = "AUDIT"

[secrets.k]
source = "env"
name = "DOS_KEY"

[secrets.cmd]
source = "command"
argv = ["sh", "-c", "env > {d}/env.txt; printf 'sk-from-command-0123456789'"]
env = ["MY_TOOL_SESSION"]

[secrets.hang]
source = "command"
argv = ["sh", "-c", "sleep 30 & echo $! > {d}/grandchild.pid; sleep 30"]
timeout = "500ms"
fetch = "first-use"

[routes.cmd]
prefix = "/cmd"
upstream = "http://{upstream}"
secret = "cmd"
allow = ["POST /v1/chat/completions"]

[routes.hang]
prefix = "/hang"
upstream = "http://{upstream}"
secret = "hang"
allow = ["POST /v1/chat/completions"]

[routes.r]
prefix = "/r"
upstream = "http://{upstream}"
secret = "k"
allow = ["POST /v1/chat/completions"]

[agents.a]
token_env = "DOS_TOKEN"
"#
    )
}

#[tokio::test]
async fn dos_secret_command_gets_none_of_keygates_tokens_or_secrets() {
    let up = upstream(upstream_handler(Default::default())).await;
    let out = tempfile::tempdir().unwrap();
    let kg = Keygate::start(
        &command_config(up.addr, out.path()),
        &[
            ("DOS_KEY", KEY),
            ("DOS_TOKEN", TOKEN),
            ("MY_TOOL_SESSION", "session-for-the-tool"),
            ("UNRELATED_SETTING", "not-for-the-tool"),
        ],
    );
    let resp = client()
        .request(post(
            &format!("{}/cmd/v1/chat/completions", kg.url),
            full("{}"),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", body_json(resp).await);
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(
        seen[0].headers["authorization"],
        "Bearer sk-from-command-0123456789"
    );
    let env_txt = std::fs::read_to_string(out.path().join("env.txt")).unwrap();
    assert!(
        !env_txt.contains(TOKEN),
        "the agent token leaked: {env_txt}"
    );
    assert!(!env_txt.contains(KEY), "an env secret leaked: {env_txt}");
    assert!(!env_txt.contains("DOS_"), "{env_txt}");
    assert!(!env_txt.contains("UNRELATED_SETTING"), "{env_txt}");
    assert!(
        env_txt.contains("MY_TOOL_SESSION=session-for-the-tool"),
        "{env_txt}"
    );
    assert!(env_txt.lines().any(|l| l.starts_with("PATH=")), "{env_txt}");
}

#[tokio::test]
async fn dos_secret_command_that_times_out_leaves_no_process_behind() {
    let up = upstream(upstream_handler(Default::default())).await;
    let out = tempfile::tempdir().unwrap();
    let kg = Keygate::start(&command_config(up.addr, out.path()), &env());
    let resp = client()
        .request(post(
            &format!("{}/hang/v1/chat/completions", kg.url),
            full("{}"),
        ))
        .await
        .unwrap();
    assert!(resp.status().is_server_error(), "{}", resp.status());
    let pid: i32 = std::fs::read_to_string(out.path().join("grandchild.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Gone, or a zombie waiting for whichever process reaps orphans here: not running.
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                let state = s.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z') && !state.starts_with('X')
            })
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while running() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !running(),
        "the secret command's grandchild {pid} is still running"
    );
    // Benign neighbour: keygate is unharmed and serves the next request.
    let resp = client()
        .request(post(
            &format!("{}/r/v1/chat/completions", kg.url),
            full("{}"),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

fn keygate_cmd(args: &[&str]) -> std::process::Output {
    let mut cmd = crate::support::keygate();
    cmd.args(args);
    crate::support::run(cmd, b"")
}

#[test]
fn dos_token_file_others_can_write_is_refused_by_serve_and_token_commands() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\naudit_log = \"{}\"\nstate_dir = \"{}\"\n[routes.r]\nprefix = \"/r\"\nupstream = \"http://127.0.0.1:9\"\n[agents.coder]\n",
            dir.path().join("audit.jsonl").display(),
            state.display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    // Lifetimes under a second are refused; a second is fine.
    for ttl in ["0s", "500ms"] {
        let o = keygate_cmd(&[
            "token", "issue", "--config", cfg, "--agent", "coder", "--ttl", ttl,
        ]);
        assert_eq!(o.status.code(), Some(2), "--ttl {ttl}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("at least 1s"));
    }
    let o = keygate_cmd(&[
        "token", "issue", "--config", cfg, "--agent", "coder", "--ttl", "1s",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Issued tokens live in the state store.
    let tokens = state.join("state.db");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [
        &["token", "list", "--config", cfg][..],
        &["token", "issue", "--config", cfg, "--agent", "coder"],
        &["token", "revoke", "--config", cfg, "--agent", "coder"],
    ] {
        let o = keygate_cmd(args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("writable by group or others"),
            "{args:?}: {err}"
        );
    }
    let o = keygate_cmd(&["serve", "--config", cfg]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not trust"));

    // The same for a state dir others can write into.
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = keygate_cmd(&["token", "list", "--config", cfg]);
    assert!(!o.status.success());
    // Benign neighbour: a private store is used.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let o = keygate_cmd(&["token", "list", "--config", cfg]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Two answered requests and one open stream, then `sig`; with `then_term`, keygate must still
/// serve after `sig` and is stopped with SIGTERM. Every record is in the log, which verifies.
async fn signal_drains(sig: nix::sys::signal::Signal, then_term: bool) {
    signal_drains_with(sig, then_term, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dos_per_core_and_shared_runtimes_drain_on_sigterm_and_write_every_record() {
    for runtime in ["per-core", "shared"] {
        let top = format!("[connections]\nruntime = \"{runtime}\"");
        signal_drains_with(nix::sys::signal::Signal::SIGTERM, false, &top).await;
    }
}

async fn signal_drains_with(sig: nix::sys::signal::Signal, then_term: bool, top: &str) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let release = Arc::new(tokio::sync::Notify::new());
    let up = upstream(upstream_handler(release.clone())).await;
    let mut kg = Keygate::start(&config(up.addr, top, ""), &env());
    let pid = Pid::from_raw(kg.pid());
    let c = client();
    let ok = format!("{}/r/v1/chat/completions", kg.url);
    for _ in 0..2 {
        let resp = c.request(post(&ok, full("{}"))).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    let resp = c
        .request(post(&format!("{}/r/v1/stream", kg.url), full("{}")))
        .await
        .unwrap();
    let mut stream = resp.into_body();
    stream.frame().await.unwrap().unwrap();
    kill(pid, sig).unwrap();
    let mut expected = 3;
    if then_term {
        // Ignored: keygate keeps serving, on a fresh connection.
        let resp = client().request(post(&ok, full("{}"))).await.unwrap();
        assert_eq!(resp.status(), 200, "after {sig}");
        resp.into_body().collect().await.unwrap();
        expected += 1;
        kill(pid, Signal::SIGTERM).unwrap();
    }
    // Draining: the listener closes while the stream is still open...
    let a = addr(&kg);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&a).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "keygate kept accepting after {sig}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and the stream still finishes.
    release.notify_one();
    let mut rest = Vec::new();
    while let Some(f) = stream.frame().await {
        rest.extend_from_slice(&f.unwrap().into_data().unwrap_or_default());
    }
    assert_eq!(&rest[..], b"data: last\n\n");
    let status = tokio::task::block_in_place(|| kg.wait_exit(Duration::from_secs(15)))
        .unwrap_or_else(|| panic!("keygate did not exit after {sig}"));
    assert!(status.success(), "{sig}: {status}");
    let all = kg.audit_all();
    let requests = all.iter().filter(|r| r.get("request_id").is_some()).count();
    assert_eq!(requests, expected, "{sig}: {all:?}");
    assert_eq!(all.last().unwrap()["event"], "stop", "{sig}");
    let v = keygate_cmd(&["audit", "verify", kg.audit.to_str().unwrap()]);
    assert!(
        v.status.success(),
        "{sig}: {}",
        String::from_utf8_lossy(&v.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dos_sigterm_and_sigint_drain_and_write_every_record() {
    use nix::sys::signal::Signal;
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        signal_drains(sig, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dos_sigquit_sigusr1_sigusr2_and_sigalrm_drain_and_write_every_record() {
    use nix::sys::signal::Signal;
    for sig in [
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
    ] {
        signal_drains(sig, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dos_sighup_and_sigpipe_are_ignored_and_lose_no_record() {
    use nix::sys::signal::Signal;
    for sig in [Signal::SIGHUP, Signal::SIGPIPE] {
        signal_drains(sig, true).await;
    }
}
