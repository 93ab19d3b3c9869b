//! A fast fake model API for benchmarks.
//!
//! - `POST <any path>` with a JSON body: a fixed ~600-byte chat.completion JSON.
//! - the same with `"stream":true` in the body: an SSE stream of `bench_events` events (default 20)
//!   sent `bench_interval_ms` apart (default 20), the first one at once; every event carries the
//!   CLOCK_MONOTONIC time at which it was handed to the socket, so a client can compute the delay
//!   each hop added. Ends with `data: [DONE]`.
//! - `GET /healthz`: `ok`.
//!
//! With `--expect-auth VALUE`, a POST whose `Authorization` header is not exactly VALUE gets 401,
//! so a proxy that forgot to attach the key shows up as errors instead of fast answers.
//!
//! With `--tls-cert PEM --tls-key PEM` it serves HTTPS (rustls, ALPN `http/1.1`) instead.
//!
//! Usage: fake-upstream [--port 0] [--threads N] [--expect-auth 'Bearer sk-…'] [--tls-cert C --tls-key K];
//! prints `{"listen":"http://127.0.0.1:PORT","threads":N}` (`https://` with TLS).
#![allow(clippy::unwrap_used)]
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use keygate_bench_tools::{mono_ns, Args};
use tokio::net::TcpListener;

static EXPECT_AUTH: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

const COMPLETION: &str = r#"{"id":"chatcmpl-bench0000000000000000000000001","object":"chat.completion","created":1767225600,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a fixed answer from the keygate benchmark fake upstream. It is long enough to look like a short real completion, and it never changes, so every proxy moves the same bytes.","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":41,"total_tokens":53,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0}},"service_tier":"default","system_fingerprint":"fp_bench00001"}"#;

type Body = BoxBody<Bytes, Infallible>;

fn main() {
    let args = Args::from_env();
    let port: u16 = args.num("port", 0);
    let threads = args.num(
        "threads",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    );
    EXPECT_AUTH.get_or_init(|| args.get("expect-auth").map(str::to_string));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = match (args.get("tls-cert"), args.get("tls-key")) {
            (Some(c), Some(k)) => Some(tls_acceptor(c, k)),
            _ => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        println!("{{\"listen\":\"{scheme}://{addr}\",\"threads\":{threads}}}");
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(handle);
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(acc) => {
                        if let Ok(s) = acc.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                }
            });
        }
    });
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() == hyper::Method::GET {
        return Ok(Response::builder()
            .header("content-type", "text/plain")
            .body(full("ok\n"))
            .unwrap());
    }
    if let Some(Some(want)) = EXPECT_AUTH.get() {
        let got = req.headers().get("authorization").map(|v| v.as_bytes());
        if got != Some(want.as_bytes()) {
            return Ok(Response::builder()
                .status(401)
                .header("content-type", "application/json")
                .body(full(r#"{"error":{"message":"fake upstream: wrong or missing key","type":"invalid_request_error"}}"#))
                .unwrap());
        }
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let streaming = memchr::memmem::find(&body, b"\"stream\":true").is_some()
        || memchr::memmem::find(&body, b"\"stream\": true").is_some();
    if !streaming {
        return Ok(Response::builder()
            .header("content-type", "application/json")
            .body(full(COMPLETION))
            .unwrap());
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let n = v.get("bench_events").and_then(|x| x.as_u64()).unwrap_or(20);
    let interval = v.get("bench_interval_ms").and_then(|x| x.as_u64()).unwrap_or(20);
    // `"bench_leak":true`: event 1 carries the key the proxy attached (to check response redaction)
    let leak = v.get("bench_leak").and_then(|x| x.as_bool()).unwrap_or(false);
    let leaked = if leak {
        EXPECT_AUTH.get().cloned().flatten().unwrap_or_default().trim_start_matches("Bearer ").to_string()
    } else {
        String::new()
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        for seq in 0..n {
            if seq > 0 {
                // (the first event goes out at once: tokio's timer would round a zero wait up to 1 ms)
                tokio::time::sleep_until(start + Duration::from_millis(interval * seq)).await;
            }
            let ev = format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{seq} {}\"}}}}],\"seq\":{seq},\"t\":{}}}\n\n",
                if seq == 1 { leaked.as_str() } else { "" },
                mono_ns()
            );
            if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n")))).await;
    });
    let stream = tokio_stream_from(rx);
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap())
}

fn tls_acceptor(cert: &str, key: &str) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg))
}

fn full(s: &'static str) -> Body {
    Full::new(Bytes::from_static(s.as_bytes())).boxed()
}

/// mpsc receiver as a `Stream` without pulling in tokio-stream.
fn tokio_stream_from<T>(rx: tokio::sync::mpsc::Receiver<T>) -> RxStream<T> {
    RxStream(rx)
}

struct RxStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for RxStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}
