//! Stage `scan`: the request exfiltration scan. A prompt-injected agent may try to send a key it
//! found to the model provider (or to any route); every request is searched before it is
//! forwarded.
//!
//! Two kinds of finding, because coding agents send code all day:
//! - *strong*: a secret keygate holds (any spelling) or a high-confidence credential format
//!   (provider prefixes, checksummed GitHub tokens, private key blocks). `request_scan =
//!   "refuse"` (the default) refuses these (403 `secret_in_request`); `"redact"` replaces them.
//! - *generic*: keyword assignments (`password = …`), `Authorization:` values, JWTs, `ghp_`
//!   without a valid checksum. Only reported, as labels in the audit record's `scan_findings`,
//!   unless the route opts in to `request_scan = "refuse-strict"`.
//!
//! A finding is named by its label (a key id or a detector name), never by its value.
//!
//! A compressed body would hide what it carries: 415 `request_encoding_not_scannable`.
//!
//! Bounded work: the engine is linear (see `redact/detectors.rs`), and a body of
//! [`BLOCKING_FROM`] bytes or more is scanned on the blocking pool so that a large body never
//! holds a runtime worker.

use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderValue;

use crate::audit::Pending;
use crate::config::RequestScan;
use crate::error::{Code, Rejection};
use crate::redact::{Class, DetectorSet, Redactor};

/// Bodies this large are scanned with `spawn_blocking`.
pub const BLOCKING_FROM: usize = 64 * 1024;

/// The labels found in `bytes`: strong (held values and strong detectors, from `strong`) and
/// generic, each sorted and deduplicated. One pass for both.
pub fn labels(strong: &Redactor, bytes: &[u8]) -> (Vec<String>, Vec<String>) {
    let (s, g) = strong.find_with(bytes, DetectorSet::class(Class::Generic));
    let collect = |found: Vec<crate::redact::Finding>| {
        let mut l: Vec<String> = found.into_iter().map(|f| f.label).collect();
        l.sort_unstable();
        l.dedup();
        l
    };
    (collect(s), collect(g))
}

/// Decides on what one place of the request holds, and records it. `place` is formatted only
/// into a refusal: naming each header must not cost every request an allocation per header.
fn judge(
    mode: RequestScan,
    (strong, weak): (Vec<String>, Vec<String>),
    place: std::fmt::Arguments<'_>,
    pending: &mut Pending,
) -> Result<(), Rejection> {
    if strong.is_empty() && weak.is_empty() {
        // Almost every place of almost every request: nothing to record or refuse.
        return Ok(());
    }
    let record = pending.record();
    for l in strong.iter().chain(&weak) {
        if !record.scan_findings.contains(l) {
            record.scan_findings.push(l.clone());
        }
    }
    let refused: Vec<&str> = if mode == RequestScan::RefuseStrict {
        strong.iter().chain(&weak).map(String::as_str).collect()
    } else {
        strong.iter().map(String::as_str).collect()
    };
    if refused.is_empty() {
        return Ok(());
    }
    let mut refused = refused;
    refused.sort_unstable();
    refused.dedup();
    Err(Rejection::new(
        Code::SecretInRequest,
        format!(
            "the request {place} holds a credential ({}); keygate attaches credentials itself, so remove it from the request",
            refused.join(", ")
        ),
    ))
}

/// The URL and the headers. The URL cannot be redacted without changing what was authorized,
/// so a strong finding there is refused in every mode. Returns whether a header was redacted.
pub fn head(
    scanner: &Redactor,
    mode: RequestScan,
    head: &mut http::request::Parts,
    pending: &mut Pending,
) -> Result<bool, Rejection> {
    let refusing = mode.refuses();
    let url_mode = if refusing { mode } else { RequestScan::Refuse };
    if let Some(pq) = head.uri.path_and_query() {
        judge(
            url_mode,
            labels(scanner, pq.as_str().as_bytes()),
            format_args!("URL"),
            pending,
        )?;
    }
    // Header names are lower-cased on the wire, which hides case-sensitive checksums and
    // formats; a name never carries a keyword assignment, so every finding there is refused.
    for name in head.headers.keys() {
        judge(
            RequestScan::RefuseStrict,
            labels(scanner, name.as_str().as_bytes()),
            format_args!("header name"),
            pending,
        )?;
    }
    let mut redacted = false;
    for (name, value) in head.headers.iter_mut() {
        if refusing {
            judge(
                mode,
                labels(scanner, value.as_bytes()),
                format_args!("header {name}"),
                pending,
            )?;
        } else if let std::borrow::Cow::Owned(clean) = scanner.redact(value.as_bytes()) {
            *value = HeaderValue::from_bytes(&clean)
                .unwrap_or_else(|_| HeaderValue::from_static("[REDACTED]"));
            redacted = true;
        } else {
            judge(
                RequestScan::Redact,
                (Vec::new(), labels(scanner, value.as_bytes()).1),
                format_args!("header"),
                pending,
            )?;
        }
    }
    // A compressed body would hide what it carries from the scan.
    crate::guard::check_content_encoding(&head.headers)?;
    Ok(redacted)
}

/// The header values `placeholder::lift` took off the request before [`head`] ran, with their
/// placeholders blanked. They go upstream as they are (or with the credential in place of the
/// placeholder), so they cannot be redacted: a strong finding is refused in every mode.
pub fn lifted(
    scanner: &Redactor,
    mode: RequestScan,
    values: &[(&http::HeaderName, Vec<u8>)],
    pending: &mut Pending,
) -> Result<(), Rejection> {
    let mode = if mode.refuses() {
        mode
    } else {
        RequestScan::Refuse
    };
    for (name, value) in values {
        judge(
            mode,
            labels(scanner, value),
            format_args!("header {name}"),
            pending,
        )?;
    }
    Ok(())
}

/// A body read whole: refused, or returned redacted (`true` when something was replaced).
pub async fn body(
    scanner: &Arc<Redactor>,
    mode: RequestScan,
    bytes: Bytes,
    pending: &mut Pending,
) -> Result<(Bytes, bool), Rejection> {
    let refusing = mode.refuses();
    let work = {
        let scanner = scanner.clone();
        let bytes = bytes.clone();
        move || {
            let found = labels(&scanner, &bytes);
            let clean = if refusing {
                None
            } else {
                match scanner.redact(&bytes) {
                    std::borrow::Cow::Owned(c) => Some(Bytes::from(c)),
                    std::borrow::Cow::Borrowed(_) => None,
                }
            };
            (found, clean)
        }
    };
    let (found, clean) = if bytes.len() >= BLOCKING_FROM {
        tokio::task::spawn_blocking(work).await.map_err(|_| {
            Rejection::new(
                Code::RequestScanFailed,
                "the request body could not be scanned for credentials",
            )
        })?
    } else {
        work()
    };
    if refusing {
        judge(mode, found, format_args!("body"), pending)?;
        return Ok((bytes, false));
    }
    // Redacting: strong findings are replaced, generic ones only reported.
    judge(
        RequestScan::Redact,
        (Vec::new(), found.1),
        format_args!("body"),
        pending,
    )?;
    let mut strong = found.0;
    if !strong.is_empty() {
        let record = pending.record();
        for l in strong.drain(..) {
            if !record.scan_findings.contains(&l) {
                record.scan_findings.push(l);
            }
        }
    }
    Ok(match clean {
        Some(c) => (c, true),
        None => (bytes, false),
    })
}
