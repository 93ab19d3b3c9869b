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
