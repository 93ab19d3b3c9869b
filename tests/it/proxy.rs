//! End-to-end behaviour of `keygate serve` that needs a Rust client: HTTP/2 from the agent,
//! request bodies that grow past the limit while streaming, an upstream that stalls mid-body, and
//! refusing to serve when the audit log cannot be written.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

const KEY: &str = "sk-test-integration-key-0123456789";
/// Built at run time so the repository's own `keygate redact --check` finds no token literal.
const TOKEN: &str = concat!("kg", "_integrationtoken0123456789abcdefXYZ");

fn config(upstream: std::net::SocketAddr, extra_route: &str) -> String {
    format!(
        r#"listen = ["127.0.0.1:0"]
audit_log = "AUDIT"
max_request_bytes = 1000

[secrets.k]
source = "env"
name = "IT_KEY"

[routes.r]
prefix = "/r"
upstream = "http://{upstream}"
secret = "k"
allow = ["POST /v1/chat/completions", "POST /v1/slow"]
{extra_route}

[agents.a]
token_env = "IT_TOKEN"
"#
    )
}

fn env() -> [(&'static str, &'static str); 2] {
    [("IT_KEY", KEY), ("IT_TOKEN", TOKEN)]
}

fn echo() -> Handler {
    Arc::new(|req| {
        let auth = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        hyper::Response::new(full(
            serde_json::json!({"auth": auth, "len": req.body().len()}).to_string(),
        ))
    })
}

fn post(url: &str, body: support_body::B) -> hyper::Request<support_body::B> {
    hyper::Request::post(url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(body)
        .unwrap()
}

mod support_body {
    pub(crate) type B = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;
}

#[tokio::test]
async fn h2c_client_is_served_and_the_upstream_gets_the_real_key() {
    let up = upstream(echo()).await;
    let kg = Keygate::start(&config(up.addr, ""), &env());
    let resp = h2c_client()
        .request(post(
            &format!("{}/r/v1/chat/completions", kg.url),
            full("{}"),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let v = body_json(resp).await;
    // The upstream saw the real key; the agent's copy of that echo is redacted.
    assert!(
        v["auth"].as_str().unwrap().starts_with("Bearer [REDACTED:"),
        "{v}"
    );
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {KEY}").as_str()
    );
    assert!(!format!("{:?}", seen[0].headers).contains(TOKEN));
}

#[tokio::test]
async fn h2c_preface_and_http1_head_sent_in_pieces_are_each_served_in_their_protocol() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream(echo()).await;
    let kg = Keygate::start(&config(up.addr, ""), &env());
    let host = kg.url.trim_start_matches("http://").to_string();
    let pause = || tokio::time::sleep(Duration::from_millis(30));
    // The preface cut inside, each part alone on the wire: still HTTP/2, whose first frame from
    // the server is its SETTINGS (type 4, stream 0).
    let mut h2 = tokio::net::TcpStream::connect(&host).await.unwrap();
    h2.set_nodelay(true).unwrap();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for part in [&preface[..1], &preface[1..9], &preface[9..]] {
        h2.write_all(part).await.unwrap();
        pause().await;
    }
    h2.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), h2.read_exact(&mut head))
        .await
        .expect("no answer to a preface sent in pieces")
        .unwrap();
    assert_eq!((head[3], &head[5..9]), (4, &[0u8, 0, 0, 0][..]), "{head:?}");
    // Benign neighbour: an HTTP/1.1 request whose first byte is the preface's first byte, sent
    // alone, is served as HTTP/1.1.
    let mut h1 = tokio::net::TcpStream::connect(&host).await.unwrap();
    h1.set_nodelay(true).unwrap();
    let req = format!(
        "POST /r/v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
    );
    for part in [&req[..1], &req[1..3], &req[3..]] {
        h1.write_all(part.as_bytes()).await.unwrap();
        pause().await;
    }
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), h1.read_to_end(&mut got))
        .await
        .expect("no answer to an HTTP/1.1 request sent in pieces")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("[REDACTED:"), "{text}");
    assert_eq!(kg.audit_records(1).len(), 1);
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_refused_with_413() {
    // Buffered (the default scan reads the body whole) and streamed (scan off) both stop it.
    for scan in ["", "request_scan = \"off\""] {
        let up = upstream(echo()).await;
        let kg = Keygate::start(&config(up.addr, scan), &env());
        let chunks =
            (0..20).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; 100]))));
        let body = StreamBody::new(futures_stream(chunks)).boxed();
        let resp = client()
            .request(post(&format!("{}/r/v1/chat/completions", kg.url), body))
            .await
            .unwrap();
        assert_eq!(resp.status(), 413, "scan {scan:?}");
        assert_eq!(body_json(resp).await["error"]["code"], "request_too_large");
        let recs = kg.audit_records(1);
        assert_eq!(recs[0]["status"], 413);
        assert_eq!(recs[0]["decision"], "deny");
    }
}

#[tokio::test]
async fn upstream_that_stalls_mid_body_is_cut_off_and_audited() {
    let stall: Handler = Arc::new(|_req| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"data: first\n\n"))))
                .await;
            tokio::time::sleep(Duration::from_secs(30)).await; // never sends the rest
            drop(tx);
        });
        let stream = futures_from_rx(rx);
        hyper::Response::new(StreamBody::new(stream).boxed())
    });
    let up = upstream(stall).await;
    let kg = Keygate::start(&config(up.addr, "timeout = \"300ms\""), &env());
    let resp = client()
        .request(post(&format!("{}/r/v1/slow", kg.url), full("{}")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: first\n\n");
    // The next poll ends in an error once the idle timeout passes, not after the upstream's 30 s.
    let next = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("keygate must cut the stalled stream");
    assert!(!matches!(next, Some(Ok(_))), "{next:?}");
    let recs = kg.audit_records(1);
    assert_eq!(recs[0]["reason"], "upstream_idle_timeout");
}

#[tokio::test]
async fn unwritable_audit_log_makes_keygate_refuse_with_503() {
    let up = upstream(echo()).await;
    let dir = tempfile::tempdir().unwrap();
    let kg = Keygate::start_with_audit(&config(up.addr, ""), &env(), dir, "/dev/full".into());
    let url = format!("{}/r/v1/chat/completions", kg.url);
    // keygate writes its start record before serving, so it knows at once.
    let mut refused = None;
    for _ in 0..100 {
        let resp = client().request(post(&url, full("{}"))).await.unwrap();
        if resp.status() == 503 {
            refused = Some(body_json(resp).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = refused.expect("keygate kept serving with a failing audit log");
    assert_eq!(v["error"]["code"], "audit_unavailable");
    assert!(
        up.seen.lock().unwrap().is_empty(),
        "nothing may be forwarded unaudited"
    );
}

fn futures_stream<I: Iterator + Send + 'static>(
    it: I,
) -> impl futures_util::Stream<Item = I::Item> {
    futures_util::stream::iter(it)
}

fn futures_from_rx<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// A GitHub token with a valid checksum (30 base62 characters and their CRC32 in 6 base62
/// digits), built at run time so the repository holds no literal credential.
fn github_token() -> String {
    const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let body = "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0";
    let mut n = crc32fast::hash(body.as_bytes());
    let mut check = [b'0'; 6];
    for slot in check.iter_mut().rev() {
        *slot = B62[(n % 62) as usize];
        n /= 62;
    }
    format!("ghp_{body}{}", String::from_utf8_lossy(&check))
}

#[tokio::test]
async fn request_carrying_a_credential_is_refused_before_anything_is_forwarded() {
    let up = upstream(echo()).await;
    let kg = Keygate::start(&config(up.addr, ""), &env());
    let url = format!("{}/r/v1/chat/completions", kg.url);
    // First a clean request, so keygate holds the key and the scan knows its value.
    let resp = client().request(post(&url, full("{}"))).await.unwrap();
    assert_eq!(resp.status(), 200);
    for body in [
        format!(
            r#"{{"messages":[{{"content":"my token is {}"}}]}}"#,
            github_token()
        ),
        format!(r#"{{"note":"{KEY}"}}"#),
    ] {
        let resp = client().request(post(&url, full(body))).await.unwrap();
        assert_eq!(resp.status(), 403);
        let v = body_json(resp).await;
        assert_eq!(v["error"]["code"], "secret_in_request");
        assert!(
            !v.to_string().contains(KEY) && !v.to_string().contains(&github_token()),
            "{v}"
        );
    }
    let mut h = post(&url, full("{}"));
    h.headers_mut()
        .insert("x-debug", github_token().parse().unwrap());
    assert_eq!(client().request(h).await.unwrap().status(), 403);
    assert_eq!(
        up.seen.lock().unwrap().len(),
        1,
        "only the clean request reached the upstream"
    );
    let recs = kg.audit_records(4);
    assert_eq!(
        recs.iter()
            .filter(|r| r["reason"] == "secret_in_request")
            .count(),
        3
    );
}

#[tokio::test]
async fn redact_mode_forwards_the_request_with_the_credential_replaced() {
    let up = upstream(echo()).await;
    let kg = Keygate::start(&config(up.addr, "request_scan = \"redact\""), &env());
    let url = format!("{}/r/v1/chat/completions", kg.url);
    // A chunked body: redaction works on the stream.
    let token = github_token();
    let chunks = vec![
        format!(r#"{{"a":"{}"#, &token[..10]),
        format!(r#"{}"}}"#, &token[10..]),
    ];
    let body = StreamBody::new(futures_stream(
        chunks
            .into_iter()
            .map(|c| Ok::<_, std::io::Error>(Frame::data(Bytes::from(c)))),
    ))
    .boxed();
    let resp = client().request(post(&url, body)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.seen.lock().unwrap().clone();
    let got = String::from_utf8_lossy(&seen[0].body).to_string();
    assert_eq!(got, r#"{"a":"[REDACTED:github_token]"}"#);
}

#[tokio::test]
async fn compressed_upstream_answer_is_not_passed_on_unredacted() {
    // An upstream that compresses although keygate asked for identity; the body is gzip of a
    // text holding the key, which the redactor could not see.
    let gz: Handler = Arc::new(|_req| {
        hyper::Response::builder()
            .header("content-encoding", "gzip")
            .body(full(format!("pretend-gzip({KEY})")))
            .unwrap()
    });
    let up = upstream(gz).await;
    let kg = Keygate::start(&config(up.addr, ""), &env());
    let resp = client()
        .request(post(
            &format!("{}/r/v1/chat/completions", kg.url),
            full("{}"),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let v = body_json(resp).await;
    assert_eq!(v["error"]["code"], "upstream_unredactable");
    assert!(!v.to_string().contains(KEY));
    assert_eq!(kg.audit_records(1)[0]["reason"], "upstream_unredactable");
}

#[tokio::test]
async fn credentials_in_the_url_header_names_or_a_compressed_body_are_refused() {
    let up = upstream(echo()).await;
    let kg = Keygate::start(
        &config(up.addr, "").replace("\"POST /v1/slow\"", "\"POST /v1/*\""),
        &env(),
    );
    let tok = github_token();
    let cases = [
        (
            format!("{}/r/v1/chat/completions?note={tok}", kg.url),
            None,
            None,
            403,
        ),
        (format!("{}/r/v1/{tok}", kg.url), None, None, 403),
        (
            format!("{}/r/v1/chat/completions", kg.url),
            Some(tok.clone()),
            None,
            403,
        ),
        (
            format!("{}/r/v1/chat/completions", kg.url),
            None,
            Some("gzip"),
            415,
        ),
    ];
    for (url, header_name, encoding, status) in cases {
        let mut req = post(&url, full("{}"));
        if let Some(name) = header_name {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "1".parse().unwrap(),
            );
        }
        if let Some(enc) = encoding {
            req.headers_mut()
                .insert("content-encoding", enc.parse().unwrap());
        }
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.status(), status, "{url}");
    }
    assert!(up.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn head_request_is_audited_as_allowed_with_its_length_kept() {
    let up = upstream(echo()).await;
    let kg = Keygate::start(
        &config(up.addr, "").replace("\"POST /v1/slow\"", "\"HEAD /v1/models\""),
        &env(),
    );
    let req = hyper::Request::head(format!("{}/r/v1/models", kg.url))
        .header("x-api-key", TOKEN)
        .body(full(""))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().contains_key("content-length"),
        "{:?}",
        resp.headers()
    );
    let rec = &kg.audit_records(1)[0];
    assert_eq!(
        (rec["decision"].as_str(), rec["reason"].as_str()),
        (Some("allow"), Some("allowed"))
    );
}

#[tokio::test]
async fn a_gemini_sdk_sending_its_token_in_x_goog_api_key_gets_the_key_injected_there() {
    let seen_key = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = seen_key.clone();
    let up = upstream(Arc::new(move |req: hyper::Request<bytes::Bytes>| {
        seen.lock().unwrap().push(
            req.headers()
                .get_all("x-goog-api-key")
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>(),
        );
        hyper::Response::new(full("{}"))
    }))
    .await;
    let kg = Keygate::start(
        &config(up.addr, "inject = \"header:x-goog-api-key\"")
            .replace("\"POST /v1/slow\"", "\"POST /v1beta/models/*\""),
        &env(),
    );
    let req = |token: &str| {
        hyper::Request::post(format!(
            "{}/r/v1beta/models/gemini-pro:generateContent",
            kg.url
        ))
        .header("x-goog-api-key", token)
        .body(full("{}"))
        .unwrap()
    };
    let resp = client().request(req(TOKEN)).await.unwrap();
    assert_eq!(resp.status(), 200);
    // A wrong token in the same header is refused as any wrong token is.
    let resp = client().request(req("kg_not_a_token")).await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(*seen_key.lock().unwrap(), vec![vec![KEY.to_string()]]);
}

#[tokio::test]
async fn upstream_gets_the_agents_content_length_for_a_whole_body_and_none_for_an_empty_one() {
    let up = upstream(Arc::new(|req| {
        let length = req
            .headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap().to_string());
        hyper::Response::new(full(
            serde_json::json!({"length": length, "len": req.body().len()}).to_string(),
        ))
    }))
    .await;
    let kg = Keygate::start(&config(up.addr, ""), &env());
    let url = format!("{}/r/v1/chat/completions", kg.url);
    let resp = client()
        .request(post(&url, full(r#"{"model":"m"}"#)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v = body_json(resp).await;
    assert_eq!(v["length"], "13", "{v}");
    assert_eq!(v["len"], 13, "{v}");
    // An empty body with the agent's `Content-Length: 0` goes on as hyper sends one: without it.
    let mut req = post(&url, full(""));
    req.headers_mut()
        .insert("content-length", http::HeaderValue::from_static("0"));
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v = body_json(resp).await;
    assert_eq!(v["length"], serde_json::Value::Null, "{v}");
    assert_eq!(v["len"], 0, "{v}");
}
