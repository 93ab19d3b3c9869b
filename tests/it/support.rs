//! Harness for end-to-end tests: the real `keygate` binary on an ephemeral port, next to an
//! in-process upstream that records what it receives. Every process started here is killed when
//! its handle drops, also when a test fails.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub(crate) type Handler =
    Arc<dyn Fn(Request<Bytes>) -> Response<BoxBody<Bytes, std::io::Error>> + Send + Sync>;

#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

pub(crate) struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 upstream that records each request (body read whole) and answers with `handler`.
pub(crate) async fn upstream(handler: Handler) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let rec = rec.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let handler = handler.clone();
                    let rec = rec.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        rec.lock().unwrap().push(Seen {
                            method: parts.method.to_string(),
                            uri: parts.uri.to_string(),
                            headers: parts.headers.clone(),
                            body: body.clone(),
                        });
                        Ok::<_, std::convert::Infallible>(handler(Request::from_parts(parts, body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream { addr, seen, task }
}

/// The keygate binary under test.
pub(crate) fn keygate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keygate"))
}

/// Runs a one-shot keygate command to its end with `stdin`, written from a thread so a large
/// input cannot deadlock against a full stdout pipe.
pub(crate) fn run(mut cmd: Command, stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keygate");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&data));
    let out = child.wait_with_output().expect("keygate runs");
    // A command that exits before reading all of stdin breaks the pipe; its output still counts.
    let _ = writer.join();
    out
}

pub(crate) fn full(s: impl Into<Bytes>) -> BoxBody<Bytes, std::io::Error> {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

pub(crate) struct Keygate {
    child: Child,
    pub url: String,
    /// The first forward-proxy listener (`proxy_listen`), `http://IP:PORT`.
    pub proxy_url: Option<String>,
    pub dir: tempfile::TempDir,
    pub audit: PathBuf,
}

impl Drop for Keygate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Keygate {
    /// Kills keygate with SIGKILL, as a crash would, keeping its directory (config, state).
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts keygate on `config` (TOML text; `AUDIT` is replaced by the audit path) with `env`.
    pub(crate) fn start(config: &str, env: &[(&str, &str)]) -> Keygate {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.jsonl");
        Self::start_with_audit(config, env, dir, audit)
    }

    pub(crate) fn start_with_audit(
        config: &str,
        env: &[(&str, &str)],
        dir: tempfile::TempDir,
        audit: PathBuf,
    ) -> Keygate {
        Self::start_wrapped(config, env, dir, audit, &[])
    }

    /// Starts keygate under `wrapper` (a command that ends by exec'ing its arguments, e.g.
    /// `sh -c 'ulimit -n 1024 && exec "$0" "$@"'`), so the pid is still keygate's.
    pub(crate) fn start_wrapped(
        config: &str,
        env: &[(&str, &str)],
        dir: tempfile::TempDir,
        audit: PathBuf,
        wrapper: &[&str],
    ) -> Keygate {
        let path = dir.path().join("keygate.toml");
        std::fs::write(&path, config.replace("AUDIT", audit.to_str().unwrap())).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(env!("CARGO_BIN_EXE_keygate"));
                c
            }
            None => keygate(),
        };
        cmd.args(["serve", "--config"])
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("ready line {line:?}: {e}"));
        let url = v["listen"].as_str().unwrap().to_string();
        let proxy_url = v["proxy_listeners"][0].as_str().map(str::to_string);
        Keygate {
            child,
            url,
            proxy_url,
            dir,
            audit,
        }
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits (bounded) for keygate to exit; `None` if it is still running.
    pub(crate) fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every record in the audit log (lifecycle records included), parsed.
    pub(crate) fn audit_all(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits (bounded) until the audit log has `n` lines, and returns them parsed.
    pub(crate) fn audit_records(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&self.audit).unwrap_or_default();
            // Request records only; keygate's start/stop records carry `event` instead.
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|r| r.get("request_id").is_some())
                .collect();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub(crate) type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    BoxBody<Bytes, std::io::Error>,
>;

pub(crate) fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

pub(crate) fn h2c_client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub(crate) async fn body_json(resp: Response<Incoming>) -> serde_json::Value {
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&b)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&b).into()))
}
