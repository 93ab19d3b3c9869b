//! Stage `scan`: the request exfiltration scan. An agent's request must not carry a secret
//! keygate holds or anything shaped like a credential: keygate attaches credentials itself, so
//! one in a request is a leak in progress (a prompt-injected agent sending a key elsewhere).
//!
//! Input: the request head (and body, when the route refuses rather than redacts). Output:
//! nothing, a redacted head, or a 403 `secret_in_request` naming what was found by label.
//! The URL cannot be redacted without changing what was authorized, so a finding there is
//! refused in every mode. A compressed body would hide what it carries: 415.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::HeaderValue;
use http::request::Parts;

use crate::config::RequestScan;
use crate::error::{Code, Rejection};
use crate::redact::Redactor;

/// Scans the URL and headers. Returns whether a header was redacted (`request_scan = "redact"`).
pub fn head(scanner: &Redactor, mode: RequestScan, head: &mut Parts) -> Result<bool, Rejection> {
    if let Some(pq) = head.uri.path_and_query() {
        refuse_findings(scanner, pq.as_str().as_bytes(), "URL")?;
    }
    let redacted = headers(scanner, mode, &mut head.headers)?;
    // A compressed body would hide what it carries from the scan.
    crate::guard::check_content_encoding(&head.headers)?;
    Ok(redacted)
}

/// Scans a whole body: refuses a finding, or returns the body redacted.
pub fn body(
    scanner: &Redactor,
    mode: RequestScan,
    body: Bytes,
) -> Result<(Bytes, bool), Rejection> {
    if mode == RequestScan::Refuse {
        refuse_findings(scanner, &body, "body")?;
        return Ok((body, false));
    }
    match scanner.redact(&body) {
        Cow::Owned(clean) => Ok((Bytes::from(clean), true)),
        Cow::Borrowed(_) => Ok((body, false)),
    }
}

/// Refuses when the scanner finds anything, naming what was found (labels, never values).
fn refuse_findings(scanner: &Redactor, bytes: &[u8], place: &str) -> Result<(), Rejection> {
    let found = scanner.find(bytes);
    if found.is_empty() {
        return Ok(());
    }
    let mut labels: Vec<&str> = found.iter().map(|f| f.label.as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    Err(Rejection::new(
        Code::SecretInRequest,
        format!(
            "the request {place} holds a credential ({}); keygate attaches credentials itself, so remove it from the request",
            labels.join(", ")
        ),
    ))
}

/// Scans header names and values; returns whether any value was redacted.
fn headers(
    scanner: &Redactor,
    mode: RequestScan,
    headers: &mut http::HeaderMap,
) -> Result<bool, Rejection> {
    let mut redacted = false;
    for name in headers.keys() {
        refuse_findings(scanner, name.as_str().as_bytes(), "header name")?;
    }
    for (name, value) in headers.iter_mut() {
        if mode == RequestScan::Refuse {
            refuse_findings(scanner, value.as_bytes(), &format!("header {name}"))?;
        } else if let Cow::Owned(clean) = scanner.redact(value.as_bytes()) {
            *value = HeaderValue::from_bytes(&clean)
                .unwrap_or_else(|_| HeaderValue::from_static("[REDACTED]"));
            redacted = true;
        }
    }
    Ok(redacted)
}
