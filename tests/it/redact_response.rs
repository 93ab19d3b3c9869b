//! Secrets that an upstream puts where a body redactor does not look: the HTTP/1 status line's
//! reason phrase and response header names. Each attack has a benign neighbour that must pass
//! through unchanged.

use std::sync::Arc;

use hyper::ext::ReasonPhrase;

use crate::support::*;

/// Mixed case, as provider keys are: a header name reaches keygate lower-cased.
const KEY: &str = concat!("sk", "-test-Response-Key-0123456789abc");
/// Built at run time so the repository's own `keygate redact --check` finds no token literal.
const TOKEN: &str = concat!("kg", "_responsetoken0123456789abcdefXYZab");

fn config(upstream: std::net::SocketAddr) -> String {
    format!(
        r#"listen = ["127.0.0.1:0"]
audit_log = "AUDIT"

[secrets.k]
source = "env"
name = "IT_KEY"

[routes.r]
prefix = "/r"
upstream = "http://{upstream}"
secret = "k"
allow = ["GET /v1/models", "HEAD /v1/models"]

[agents.a]
token_env = "IT_TOKEN"
"#
    )
}

fn env() -> [(&'static str, &'static str); 2] {
    [("IT_KEY", KEY), ("IT_TOKEN", TOKEN)]
}

/// Answers 401 with `reason` as the status line's phrase, as some gateways do.
fn with_reason(reason: &'static str) -> Handler {
    Arc::new(move |_req| {
        let mut resp = hyper::Response::new(full("{}"));
        *resp.status_mut() = http::StatusCode::UNAUTHORIZED;
        let phrase = if reason == "KEY" {
            format!("Invalid API key {KEY}")
        } else {
            reason.to_string()
        };
        resp.extensions_mut()
            .insert(ReasonPhrase::try_from(phrase).unwrap());
        resp
    })
}

fn request(method: &str, url: &str) -> hyper::Request<support_body::B> {
    hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(full(""))
        .unwrap()
}

mod support_body {
    pub(crate) type B = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;
}

fn reason_of<B>(resp: &hyper::Response<B>) -> Option<String> {
    resp.extensions()
        .get::<ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
}

#[tokio::test]
async fn secret_in_the_upstream_reason_phrase_never_reaches_the_agent_also_for_head() {
    let up = upstream(with_reason("KEY")).await;
    let kg = Keygate::start(&config(up.addr), &env());
    for method in ["GET", "HEAD"] {
        let resp = client()
            .request(request(method, &format!("{}/r/v1/models", kg.url)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{method}");
        let reason = reason_of(&resp);
        assert!(
            !reason.as_deref().unwrap_or_default().contains(KEY),
            "{method}: the reason phrase carried the key: {reason:?}"
        );
    }
    // The upstream really sent it, so the check above is not passing because nothing was there.
    assert_eq!(up.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn ordinary_upstream_status_reaches_the_agent_with_its_code() {
    let up = upstream(with_reason("Unauthorized")).await;
    let kg = Keygate::start(&config(up.addr), &env());
    let resp = client()
        .request(request("GET", &format!("{}/r/v1/models", kg.url)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(reason_of(&resp), None, "canonical phrase for the code");
}

#[tokio::test]
async fn response_header_whose_name_holds_the_secret_is_dropped() {
    let up = upstream(Arc::new(|_req| {
        let mut resp = hyper::Response::new(full("{}"));
        let h = resp.headers_mut();
        h.insert(
            http::HeaderName::from_bytes(KEY.as_bytes()).unwrap(),
            http::HeaderValue::from_static("1"),
        );
        h.insert(
            http::HeaderName::from_bytes(format!("x-leak-{KEY}").as_bytes()).unwrap(),
            http::HeaderValue::from_static("1"),
        );
        // The benign neighbours: ordinary names, and one that merely mentions api keys.
        h.insert("x-request-cost", http::HeaderValue::from_static("3"));
        h.insert(
            "x-api-key-hint",
            http::HeaderValue::from_static("sk-...abc"),
        );
        resp
    }))
    .await;
    let kg = Keygate::start(&config(up.addr), &env());
    for method in ["GET", "HEAD"] {
        let resp = client()
            .request(request(method, &format!("{}/r/v1/models", kg.url)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let names: Vec<String> = resp.headers().keys().map(|k| k.to_string()).collect();
        let lower = KEY.to_ascii_lowercase();
        assert!(
            !names.iter().any(|n| n.contains(&lower)),
            "{method}: a header name carried the key: {names:?}"
        );
        assert_eq!(resp.headers()["x-request-cost"], "3", "{method}");
        assert_eq!(resp.headers()["x-api-key-hint"], "sk-...abc", "{method}");
    }
}
