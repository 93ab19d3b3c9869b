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

/// Strong and generic labels, each sorted and deduplicated.
pub type Labels = (Vec<String>, Vec<String>);

/// The labels found in `bytes`: strong (held values and strong detectors, from `strong`) and
/// generic, each sorted and deduplicated. One pass for both.
pub fn labels(strong: &Redactor, bytes: &[u8]) -> Labels {
    let (s, g) = strong.find_with(bytes, DetectorSet::class(Class::Generic));
    if s.is_empty() && g.is_empty() {
        // Almost every header and path: nothing to collect, sort or deduplicate.
        return (Vec::new(), Vec::new());
    }
    let collect = |found: Vec<crate::redact::Finding>| {
        let mut l: Vec<String> = found.into_iter().map(|f| f.label).collect();
        l.sort_unstable();
        l.dedup();
        l
    };
    (collect(s), collect(g))
}

/// The request target's labels (see [`labels`]), found once for both of its readers: the audit
/// record's path (`Record::set_target` redacts what the strong set finds) and [`head`]'s
/// judgement of the URL. Scanning the URL twice cost every request a second engine pass.
pub struct Target {
    /// The path and query scanned, and what it holds.
    scanned: Option<(http::uri::PathAndQuery, Labels)>,
}

impl Target {
    /// Scans `uri`'s path and query with the request scan's engine.
    pub fn of(scanner: &Redactor, uri: &http::Uri) -> Target {
        Target {
            scanned: uri
                .path_and_query()
                .map(|pq| (pq.clone(), labels(scanner, pq.as_str().as_bytes()))),
        }
    }

    /// Whether the strong set finds nothing in `uri`'s path, which is then recorded as it is:
    /// known only when the path is the whole target scanned (no query), since a finding's
    /// verdict reads the bytes around it. A strong finding in the whole buffer is exactly a
    /// non-empty `Redactor::redact` of it (`Engine::find_with` equals `scan` per set).
    pub fn path_clean(&self, uri: &http::Uri) -> bool {
        self.scanned
            .as_ref()
            .is_some_and(|(pq, (strong, _))| strong.is_empty() && pq.as_str() == uri.path())
    }

    /// The labels of `pq`, if it is the target scanned.
    fn labels_of(&self, pq: &http::uri::PathAndQuery) -> Option<Labels> {
        match &self.scanned {
            Some((scanned, found)) if scanned == pq => Some(found.clone()),
            _ => None,
        }
    }
}

/// Decides on what one place of the request holds, and records it. `place` is formatted only
/// into a refusal: naming each header must not cost every request an allocation per header.
#[inline(always)]
fn judge(
    mode: RequestScan,
    found: Labels,
    place: std::fmt::Arguments<'_>,
    pending: &mut Pending,
) -> Result<(), Rejection> {
    if found.0.is_empty() && found.1.is_empty() {
        // Almost every place of almost every request: nothing to record or refuse (checked
        // here, inlined, so that it costs no call and no move of the labels).
        return Ok(());
    }
    judge_found(mode, found, place, pending)
}

/// [`judge`] of a place where something was found.
#[inline(never)]
fn judge_found(
    mode: RequestScan,
    (strong, weak): Labels,
    place: std::fmt::Arguments<'_>,
    pending: &mut Pending,
) -> Result<(), Rejection> {
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
    target: &Target,
    pending: &mut Pending,
) -> Result<bool, Rejection> {
    let refusing = mode.refuses();
    let url_mode = if refusing { mode } else { RequestScan::Refuse };
    if let Some(pq) = head.uri.path_and_query() {
        let found = target
            .labels_of(pq)
            .unwrap_or_else(|| labels(scanner, pq.as_str().as_bytes()));
        judge(url_mode, found, format_args!("URL"), pending)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Record;
    use proptest::prelude::*;

    fn scanner() -> Redactor {
        Redactor::builder()
            .known("held#1", format!("held-{}", "x7Q".repeat(10)).as_bytes())
            .detector_set(DetectorSet::class(Class::Strong))
            .build()
    }

    /// URL pieces that make findings, near-findings and the bytes around them.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("/".to_string()),
            Just("?".to_string()),
            Just("&".to_string()),
            Just("=".to_string()),
            Just("v1".to_string()),
            Just("%2F".to_string()),
            Just(format!("held-{}", "x7Q".repeat(10))),
            Just(format!("held-{}", "x7Q".repeat(9))),
            Just(format!("sk-proj-{}", "Ab3dE".repeat(9))),
            Just(format!("AKIA{}", "QZ7R".repeat(4))),
            Just(format!("gh{}_{}", "p", "a1B2c3D4e5".repeat(4))),
            Just("password=".to_string()),
            "[a-zA-Z0-9_.-]{1,12}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn a_url_scanned_once_records_and_judges_as_two_scans(
            pieces in prop::collection::vec(piece(), 0..8)
        ) {
            let scanner = scanner();
            let uri: http::Uri = match format!("/{}", pieces.concat()).parse() {
                Ok(u) => u,
                Err(_) => return Ok(()),
            };
            let target = Target::of(&scanner, &uri);
            // The audit record's path: as `set_target` alone makes it.
            let mut once = Record::default();
            once.fill_target(&uri, &scanner, target.path_clean(&uri));
            let mut twice = Record::default();
            twice.set_target(&uri, &scanner);
            prop_assert_eq!(
                serde_json::to_string(&once).unwrap(),
                serde_json::to_string(&twice).unwrap()
            );
            // Clean exactly when the path is the whole target and nothing strong is in it.
            let whole = uri.path_and_query().map(|p| p.as_str()) == Some(uri.path());
            let untouched = matches!(
                scanner.redact(uri.path().as_bytes()),
                std::borrow::Cow::Borrowed(_)
            );
            prop_assert_eq!(target.path_clean(&uri), whole && untouched);
            // The scan stage's verdict: what a scan of the URL of its own finds.
            let pq = uri.path_and_query().unwrap();
            prop_assert_eq!(
                target.labels_of(pq),
                Some(labels(&scanner, pq.as_str().as_bytes()))
            );
            let other: http::uri::PathAndQuery = "/elsewhere".parse().unwrap();
            prop_assert_eq!(target.labels_of(&other).is_none(), pq != &other);
        }
    }
}
