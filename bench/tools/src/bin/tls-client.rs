//! HTTPS load client for the TLS-termination benchmark: N connections, each optionally a CONNECT
//! tunnel through an HTTP proxy first, then TLS (rustls, ALPN `http/1.1`) and HTTP/1.1 keep-alive
//! POSTs one after another for `--seconds`. wrk cannot speak TLS inside a CONNECT tunnel, hence this.
//!
//! Usage: tls-client --addr 127.0.0.1:PORT --host api.bench.test --ca ca.pem [--connect]
//!                   [--path /v1/chat/completions] [--conns 1] [--seconds 5]
//! - `--addr`: where the TCP connection goes (the proxy with `--connect`, else the TLS server);
//! - `--host`: SNI, certificate name and `Host`; with `--connect` the tunnel target is `HOST:443`;
//! - request headers from `BENCH_HEADERS` ("Name: value" lines) and, with `--connect`, the CONNECT's
//!   `Proxy-Authorization` from `BENCH_PROXY_AUTH`: secrets stay off the command line.
//!
//! Prints one JSON line: requests, rps, p50/p90/p99 in µs, non2xx, errors (transport failures; the
//! connection is then re-established), tunnels (connections opened) and the first failure seen.
#![allow(clippy::unwrap_used)]
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use keygate_bench_tools::{pct, Args};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BODY: &str = r#"{"model":"bench","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":64}"#;

struct Conf {
    addr: String,
    host: String,
    path: String,
    connect: Option<String>,
    headers: Vec<(String, String)>,
    tls: tokio_rustls::TlsConnector,
    deadline: Instant,
}

#[derive(Default)]
struct Tally {
    lat_us: Vec<f64>,
    non2xx: u64,
    errors: u64,
    tunnels: u64,
    first_failure: Option<String>,
}

impl Tally {
    fn fail(&mut self, what: String) {
        if self.first_failure.is_none() {
            self.first_failure = Some(what);
        }
    }
}

fn main() {
    let args = Args::from_env();
    let ca = args.get("ca").expect("--ca PEM");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let headers = std::env::var("BENCH_HEADERS")
        .unwrap_or_default()
        .split('\n')
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .filter(|(k, _)| !k.is_empty())
        .collect();
    let conns: usize = args.num("conns", 1);
    let seconds: f64 = args.num("seconds", 5.0);
    let conf = Arc::new(Conf {
        addr: args.get("addr").expect("--addr HOST:PORT").to_string(),
        host: args.get("host").expect("--host NAME").to_string(),
        path: args.get("path").unwrap_or("/v1/chat/completions").to_string(),
        connect: args.has("connect").then(|| std::env::var("BENCH_PROXY_AUTH").unwrap_or_default()),
        headers,
        tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        deadline: Instant::now() + Duration::from_secs_f64(seconds),
    });

    // One thread, like `wrk -t1`: the client is pinned to one CPU by the harness.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let start = Instant::now();
    let tallies = rt.block_on(async move {
        let tasks: Vec<_> = (0..conns).map(|_| tokio::spawn(run_conn(conf.clone()))).collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = Tally::default();
    for t in tallies {
        all.lat_us.extend(t.lat_us);
        all.non2xx += t.non2xx;
        all.errors += t.errors;
        all.tunnels += t.tunnels;
        if all.first_failure.is_none() {
            all.first_failure = t.first_failure;
        }
    }
    all.lat_us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = all.lat_us.len();
    let out = serde_json::json!({
        "requests": n,
        "seconds": elapsed,
        "rps": n as f64 / elapsed,
        "p50_us": pct(&all.lat_us, 50.0),
        "p90_us": pct(&all.lat_us, 90.0),
        "p99_us": pct(&all.lat_us, 99.0),
        "non2xx": all.non2xx,
        "errors": all.errors,
        "tunnels": all.tunnels,
        "conns": conns,
        "first_failure": all.first_failure,
    });
    println!("{out}");
}

async fn run_conn(conf: Arc<Conf>) -> Tally {
    let mut t = Tally::default();
    while Instant::now() < conf.deadline {
        let remaining = conf.deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining + Duration::from_secs(5), session(&conf, &mut t)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                t.errors += 1;
                t.fail(e);
                // a refusing server would otherwise be hammered in a tight loop
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => {
                t.errors += 1;
                t.fail("timed out".into());
            }
        }
    }
    t
}

/// One connection: (CONNECT), TLS, then keep-alive requests until the deadline.
async fn session(conf: &Conf, t: &mut Tally) -> Result<(), String> {
    let mut tcp = TcpStream::connect(&conf.addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if let Some(auth) = &conf.connect {
        let mut head = format!("CONNECT {h}:443 HTTP/1.1\r\nHost: {h}:443\r\n", h = conf.host);
        if !auth.is_empty() {
            head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes()).await.map_err(|e| format!("CONNECT write: {e}"))?;
        let mut buf = Vec::with_capacity(512);
        let mut byte = [0u8; 1];
        // byte by byte: nothing after the head may be swallowed (the TLS handshake follows)
        while !buf.ends_with(b"\r\n\r\n") {
            if buf.len() > 16384 || tcp.read(&mut byte).await.map_err(|e| format!("CONNECT read: {e}"))? == 0 {
                return Err(format!("CONNECT: no answer head ({} bytes)", buf.len()));
            }
            buf.push(byte[0]);
        }
        let status = String::from_utf8_lossy(&buf);
        if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
            return Err(format!("CONNECT refused: {}", status.lines().next().unwrap_or("")));
        }
    }
    let name = ServerName::try_from(conf.host.clone()).map_err(|e| format!("server name: {e}"))?;
    let tls = conf.tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    t.tunnels += 1;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls))
        .await
        .map_err(|e| format!("http1 handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let result = async {
        while Instant::now() < conf.deadline {
            sender.ready().await.map_err(|e| format!("connection closed: {e}"))?;
            let mut req = Request::post(conf.path.as_str())
                .header("host", conf.host.as_str())
                .header("content-type", "application/json");
            for (k, v) in &conf.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let req = req.body(Full::new(Bytes::from_static(BODY.as_bytes()))).unwrap();
            let t0 = Instant::now();
            let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
            t.lat_us.push(t0.elapsed().as_secs_f64() * 1e6);
            if !status.is_success() {
                t.non2xx += 1;
                t.fail(format!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)])));
            }
        }
        Ok(())
    }
    .await;
    driver.abort();
    result
}
