//! The response head on its way back to the agent: what an upstream writes outside the body.
//!
//! - Extensions are dropped. hyper keeps an HTTP/1 status line's non-canonical reason phrase
//!   (`401 Invalid API key <key>`) in the `ReasonPhrase` extension and writes it back out; the
//!   answer is rebuilt from the status code alone.
//! - A header whose *name* holds a held secret is dropped: a name cannot be redacted in place
//!   (the marker is not a valid name) and no ordinary header is named after a key. Names arrive
//!   lower-cased, so they are compared without regard to ASCII case.
//! - Header values are redacted like a body; a value that cannot carry the marker becomes
//!   `[REDACTED]`.

use http::header::HeaderValue;
use http::HeaderMap;

use super::Redactor;

/// Cleans a response head in place; see the module doc.
pub fn response_head(redactor: &Redactor, parts: &mut http::response::Parts) {
    parts.extensions.clear();
    response_headers(redactor, &mut parts.headers);
}

/// Drops headers whose names hold a secret and redacts every value.
pub fn response_headers(redactor: &Redactor, headers: &mut HeaderMap) {
    if redactor.is_empty() {
        return;
    }
    let leaking: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| redactor.holds_in_name(name.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in leaking {
        headers.remove(&name);
    }
    for v in headers.values_mut() {
        if let std::borrow::Cow::Owned(clean) = redactor.redact(v.as_bytes()) {
            *v = HeaderValue::from_bytes(&clean)
                .unwrap_or_else(|_| HeaderValue::from_static("[REDACTED]"));
        }
    }
}
