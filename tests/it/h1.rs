//! keygate's own HTTP/1.1 server (`listen/h1.rs`) through the real binary: pipelined requests,
//! an early refusal whose body was not read, and the requests it hands to hyper (HTTP/1.0,
//! `Expect`, `Upgrade`), answered as `connections.http1 = "hyper"` answers them.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "sk-test-h1-key-0123456789abcdef";
/// Built at run time so the repository's own `keygate redact --check` finds no token literal.
const TOKEN: &str = concat!("kg", "_h1testtoken0123456789abcdefXYZ");

fn config(upstream: std::net::SocketAddr, http1: &str) -> String {
    format!(
        r#"listen = ["127.0.0.1:0"]
audit_log = "AUDIT"

[connections]
http1 = "{http1}"

[secrets.k]
source = "env"
name = "H1_KEY"

[routes.r]
prefix = "/r"
upstream = "http://{upstream}"
secret = "k"
allow = ["POST /v1/chat/completions", "GET /v1/models"]

[agents.a]
token_env = "H1_TOKEN"
"#
    )
}

/// An upstream that answers each request with its body.
async fn echo_upstream() -> Upstream {
    upstream(Arc::new(|req: hyper::Request<bytes::Bytes>| {
        hyper::Response::new(full(req.into_body()))
    }))
    .await
}

fn start(up: &Upstream, http1: &str) -> Keygate {
    Keygate::start(
        &config(up.addr, http1),
        &[("H1_KEY", KEY), ("H1_TOKEN", TOKEN)],
    )
}

fn post(host: &str, token: &str, body: &str, extra: &str) -> String {
    format!(
        "POST /r/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
}

async fn connect(kg: &Keygate) -> (TcpStream, String) {
    let host = kg.url.trim_start_matches("http://").to_string();
    (TcpStream::connect(&host).await.unwrap(), host)
}

/// Reads until keygate closes the connection (bounded).
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until `out` holds `needle` (bounded).
async fn read_until(s: &mut TcpStream, out: &mut Vec<u8>, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(out).contains(needle) {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
}

#[tokio::test]
async fn h1_pipelined_requests_on_one_connection_are_answered_in_order_and_each_audited() {
    let up = echo_upstream().await;
    let kg = start(&up, "keygate");
    let (mut s, host) = connect(&kg).await;
    let mut all = String::new();
    for n in 1..=3 {
        let last = if n == 3 { "Connection: close\r\n" } else { "" };
        all.push_str(&post(&host, TOKEN, &format!(r#"{{"n":{n}}}"#), last));
    }
    s.write_all(all.as_bytes()).await.unwrap();
    let got = read_to_close(&mut s).await;

    assert_eq!(got.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{got}");
    let at = |n: u32| got.find(&format!(r#"{{"n":{n}}}"#)).unwrap_or(usize::MAX);
    assert!(at(1) < at(2) && at(2) < at(3) && at(3) < got.len(), "{got}");
    let seen: Vec<_> = up
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.body.clone())
        .collect();
    assert_eq!(seen, [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]);
    let records = kg.audit_records(3);
    assert_eq!(records.len(), 3);
    assert!(
        records.iter().all(|r| r["decision"] == "allow"),
        "{records:?}"
    );
}

#[tokio::test]
async fn h1_refused_request_with_an_unread_body_closes_and_its_body_is_never_parsed_as_a_request() {
    let up = echo_upstream().await;
    let kg = start(&up, "keygate");
    let (mut s, host) = connect(&kg).await;
    // A wrong token, and a body (not all sent) that holds a whole request with the right one.
    let smuggled = post(&host, TOKEN, "{}", "");
    let wrong = format!("kg_{}", "w".repeat(30));
    let head = format!(
        "POST /r/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {wrong}\r\nContent-Length: {}\r\n\r\n",
        smuggled.len() + 100
    );
    s.write_all(format!("{head}{smuggled}").as_bytes())
        .await
        .unwrap();
    let got = read_to_close(&mut s).await;

    assert!(got.starts_with("HTTP/1.1 401 "), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("connection: close\r\n"),
        "{got}"
    );
    assert_eq!(got.matches("HTTP/1.1 ").count(), 1, "{got}");
    // The benign neighbour, on a new connection: the only request that reaches the upstream.
    let (mut s, _) = connect(&kg).await;
    s.write_all(post(&host, TOKEN, r#"{"benign":1}"#, "Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_to_close(&mut s)
        .await
        .starts_with("HTTP/1.1 200 OK\r\n"));
    let seen: Vec<_> = up
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.body.clone())
        .collect();
    assert_eq!(
        seen,
        [r#"{"benign":1}"#],
        "the body reached the upstream as a request"
    );
    let records = kg.audit_records(2);
    let decisions: Vec<_> = records.iter().map(|r| r["decision"].clone()).collect();
    assert_eq!(decisions, ["deny", "allow"], "{records:?}");
}

/// What a raw exchange answers, with `date` and request ids blanked.
async fn exchange(kg: &Keygate, send: &[&str]) -> String {
    let (mut s, _) = connect(kg).await;
    let mut out = Vec::new();
    for (i, part) in send.iter().enumerate() {
        s.write_all(part.as_bytes()).await.unwrap();
        if i + 1 < send.len() {
            // Each part but the last waits for an answer (`100 Continue`, or a whole answer).
            read_until(&mut s, &mut out, "\r\n\r\n").await;
        }
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    out.extend(rest);
    let text = String::from_utf8_lossy(&out).into_owned();
    let date = regex::Regex::new("(?i)(date: )[^\r]*|req_[0-9a-f]+").unwrap();
    date.replace_all(&text, "${1}-").into_owned()
}

#[tokio::test]
async fn h1_http10_expect_and_upgrade_requests_are_answered_as_hyper_answers_them() {
    let up = echo_upstream().await;
    let own = start(&up, "keygate");
    let hyper = start(&up, "hyper");
    let host = own.url.trim_start_matches("http://").to_string();
    let h10 = post(&host, TOKEN, r#"{"v":"1.0"}"#, "Connection: close\r\n")
        .replacen("HTTP/1.1", "HTTP/1.0", 1);
    let expect = post(&host, TOKEN, "", "Expect: 100-continue\r\n").replace(
        "Content-Length: 0",
        &format!("Content-Length: {}", r#"{"v":"expect"}"#.len()),
    );
    let then = post(&host, TOKEN, r#"{"v":"after"}"#, "Connection: close\r\n");
    let upgrade = format!(
        "GET /r/v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n"
    );
    let cases: [(&str, Vec<String>); 3] = [
        ("http/1.0", vec![h10]),
        ("expect", vec![expect, format!(r#"{{"v":"expect"}}{then}"#)]),
        ("upgrade", vec![upgrade]),
    ];
    for (name, send) in cases {
        let send: Vec<&str> = send.iter().map(String::as_str).collect();
        let a = exchange(&own, &send).await;
        let b = exchange(&hyper, &send).await;
        assert_eq!(a, b, "{name}");
        assert!(!a.is_empty(), "{name}: no answer");
        if name == "expect" {
            assert!(
                a.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"),
                "{a}"
            );
            assert!(a.contains(r#"{"v":"after"}"#), "{a}");
        }
        if name == "http/1.0" {
            assert!(a.starts_with("HTTP/1.0 200 OK\r\n"), "{a}");
        }
    }
}
