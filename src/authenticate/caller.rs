//! The headers a caller's credential may arrive in: a leaf, because config refuses them as extra
//! headers at load and `authenticate` strips them from every request.

/// Headers that may carry the caller's credential; all are removed before forwarding.
pub const CALLER_CREDENTIAL_HEADERS: [&str; 4] =
    ["x-broker-token", "authorization", "x-api-key", "api-key"];
