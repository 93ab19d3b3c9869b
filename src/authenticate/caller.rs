//! The headers a caller's credential may arrive in: a leaf, because config refuses them as extra
//! headers at load and `authenticate` strips them from every request.

/// Headers that may carry the caller's credential; all are removed before forwarding.
/// `x-backend-token` is the lab's backend companion's header; `x-goog-api-key` is where the
/// Gemini SDKs send their api key, so a keygate token set as `GEMINI_API_KEY` arrives there.
pub const CALLER_CREDENTIAL_HEADERS: [&str; 6] = [
    "x-broker-token",
    "x-backend-token",
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
];

/// [`CALLER_CREDENTIAL_HEADERS`] as header names, made at compile time: a lookup by a `&str`
/// parses and lower-case-checks the name again on every request.
pub static CALLER_CREDENTIAL_NAMES: [http::HeaderName; 6] = [
    http::HeaderName::from_static(CALLER_CREDENTIAL_HEADERS[0]),
    http::HeaderName::from_static(CALLER_CREDENTIAL_HEADERS[1]),
    http::header::AUTHORIZATION,
    http::HeaderName::from_static(CALLER_CREDENTIAL_HEADERS[3]),
    http::HeaderName::from_static(CALLER_CREDENTIAL_HEADERS[4]),
    http::HeaderName::from_static(CALLER_CREDENTIAL_HEADERS[5]),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_credential_names_are_the_listed_headers_in_order() {
        let names: Vec<&str> = CALLER_CREDENTIAL_NAMES.iter().map(|n| n.as_str()).collect();
        assert_eq!(names, CALLER_CREDENTIAL_HEADERS);
    }
}
