//! The forward proxy on the wire: a CONNECT tunnel to a host a route names, terminated with
//! keygate's CA, forwarded over TLS to a local upstream whose test CA keygate trusts only via
//! `upstream_ca`.

use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::Keygate;

pub(crate) const HOST: &str = "api.example.test";

/// A test CA and a TLS upstream for `HOST` that records each request's `Authorization` and
/// answers with it in the body (as a careless API might).
pub(crate) struct TlsUpstream {
    pub(crate) port: u16,
    pub(crate) ca_pem: String,
    pub(crate) seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn test_ca() -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    (p.self_signed(&key).unwrap(), key)
}

pub(crate) async fn tls_upstream() -> TlsUpstream {
    let (ca, ca_key) = test_ca();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![HOST.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let rec = rec.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        rec.lock().unwrap().push(auth.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                crate::support::full(format!("you sent {auth}")),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsUpstream {
        port,
        ca_pem: ca.pem(),
        seen,
        task,
    }
}

fn start(up: &TlsUpstream, trusted_ca_pem: &str, key: &str, token: &str) -> Keygate {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, trusted_ca_pem).unwrap();
    let state = dir.path().join("state");
    let config = format!(
        r#"listen = ["127.0.0.1:0"]
proxy_listen = ["127.0.0.1:0"]
audit_log = "AUDIT"
state_dir = "{}"

[secrets.gh]
source = "env"
name = "GH_KEY"

[routes.gh]
host = "{HOST}"
upstream = "https://127.0.0.1:{}"
upstream_ca = "{}"
secret = "gh"
allow = ["GET /user"]

[agents.coder]
routes = ["gh"]
token_env = "AGENT_TOKEN"
"#,
        state.display(),
        up.port,
        ca_file.display()
    );
    let audit = dir.path().join("audit.jsonl");
    Keygate::start_with_audit(
        &config,
        &[("GH_KEY", key), ("AGENT_TOKEN", token)],
        dir,
        audit,
    )
}

/// CONNECT with the token as Basic password, TLS with keygate's CA, one GET; the answer's
/// status line and body.
async fn get_through(kg: &Keygate, token: &str) -> (String, String) {
    use base64::Engine as _;
    let proxy = kg
        .proxy_url
        .as_deref()
        .unwrap()
        .trim_start_matches("http://");
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("keygate:{token}"));
    s.write_all(
        format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\nProxy-Authorization: Basic {auth}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            1,
            "proxy closed during CONNECT"
        );
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let ca_pem = std::fs::read(kg.dir.path().join("state/proxy-ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(HOST).unwrap(), s)
        .await
        .unwrap();
    tls.write_all(
        format!("GET /user HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut out),
    )
    .await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

fn token() -> String {
    format!(
        "kg_{}",
        "t".repeat(8) + &std::process::id().to_string() + "AbCdEfGhIjKlMnOpQrStUvWxYz"
    )
}

#[tokio::test]
async fn tunnel_to_a_route_host_reaches_the_upstream_with_the_real_key_and_redacts_it_back() {
    let up = tls_upstream().await;
    let key = format!("ghp_{}", "k".repeat(12) + "ZyXwVu0123456789abcd");
    let token = token();
    let kg = start(&up, &up.ca_pem, &key, &token);
    let (status, body) = get_through(&kg, &token).await;
    assert!(status.contains(" 200"), "{status} {body}");
    assert_eq!(
        up.seen.lock().unwrap().as_slice(),
        [format!("Bearer {key}")]
    );
    assert!(!body.contains(&key), "{body}");
    assert!(body.contains("[REDACTED:"), "{body}");
    let recs = kg.audit_records(2);
    assert!(recs
        .iter()
        .any(|r| r["method"] == "CONNECT" && r["reason"] == "tunnel_terminated"));
    assert!(recs
        .iter()
        .any(|r| r["method"] == "GET" && r["decision"] == "allow" && r["destination"] == HOST));
}

#[tokio::test]
async fn upstream_certificate_from_a_ca_keygate_does_not_trust_is_a_502() {
    let up = tls_upstream().await;
    let (other_ca, _) = test_ca();
    let key = format!("ghp_{}", "k".repeat(12) + "ZyXwVu0123456789abcd");
    let token = token();
    let kg = start(&up, &other_ca.pem(), &key, &token);
    let (status, body) = get_through(&kg, &token).await;
    assert!(status.contains(" 502"), "{status} {body}");
    assert!(body.contains("upstream_certificate_invalid"), "{body}");
    assert!(up.seen.lock().unwrap().is_empty());
}

#[test]
fn a_proxy_listener_off_loopback_is_refused_at_config_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(&path, "proxy_listen = [\"0.0.0.0:8792\"]\n").unwrap();
    let out = crate::support::run(
        {
            let mut c = crate::support::keygate();
            c.args(["check", "--config"]).arg(&path);
            c
        },
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("proxy_listen") && err.contains("loopback"),
        "{err}"
    );
    // Benign neighbour: loopback is accepted.
    std::fs::write(&path, "proxy_listen = [\"127.0.0.1:8792\"]\n").unwrap();
    let out = crate::support::run(
        {
            let mut c = crate::support::keygate();
            c.args(["check", "--config"]).arg(&path);
            c
        },
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
