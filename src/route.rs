//! Stage `route`: which upstream a request goes to.
//!
//! Input: the request's raw path (and, later, the upstream host for the forward-proxy listener).
//! Output: a [`Routed`] naming the route and the path relative to it, or a refusal.
//!
//! Paths are matched on their decoded form, but only after every ambiguous spelling has been
//! refused: `%2e`, `%2f`, `%5c`, `%25`, `%00`, `\`, `//`, `.`/`..` segments, `;`, control bytes,
//! and percent-encoded unreserved characters (non-canonical). keygate never "fixes up" a path:
//! what the allowlist saw is byte for byte what the upstream gets, so the upstream cannot read a
//! path differently from the way keygate authorized it.

use crate::config::Route;
use crate::error::{Code, Rejection};

/// A request matched to a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The route's index in the config.
    pub route: usize,
    /// Decoded path relative to the route prefix, always starting with `/`; allow rules match it.
    pub path: String,
    /// The raw (still encoded) relative path, forwarded as is after the upstream's base path.
    pub raw_path: String,
}

/// Picks the route with the longest prefix that matches (routes are sorted longest first).
pub fn select(routes: &[Route], raw_path: &str) -> Result<Routed, Rejection> {
    let decoded = check_path(raw_path)
        .map_err(|why| Rejection::new(Code::InvalidPath, format!("path refused: {why}")))?;
    for (i, r) in routes.iter().enumerate() {
        let Some(rel) = strip_prefix(&decoded, &r.prefix) else {
            continue;
        };
        // The prefix is plain ASCII with no encodable characters (checked at config load) and the
        // raw path has no non-canonical encodings, so the raw path starts with the same bytes.
        let Some(raw_rel) = strip_prefix(raw_path, &r.prefix) else {
            // Unreachable with prefixes config accepts; refuse rather than forward a path that
            // differs from the one authorized.
            return Err(Rejection::new(
                Code::InvalidPath,
                "path refused: non-canonical route prefix",
            ));
        };
        return Ok(Routed {
            route: i,
            path: rel.to_string(),
            raw_path: raw_rel.to_string(),
        });
    }
    Err(Rejection::new(
        Code::RouteNotFound,
        format!("no route serves {decoded}"),
    ))
}

fn strip_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix == "/" {
        return Some(path);
    }
    let rest = path.strip_prefix(prefix)?;
    if rest.is_empty() {
        Some("/")
    } else if rest.starts_with('/') {
        Some(rest)
    } else {
        None
    }
}

/// Checks a raw request path and returns its decoded form, or why it is refused.
pub fn check_path(raw: &str) -> Result<String, &'static str> {
    if !raw.starts_with('/') {
        return Err("must start with /");
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\\' => return Err("backslash"),
            b';' => return Err("semicolon (path parameters)"),
            b'#' => return Err("fragment"),
            0..=0x20 | 0x7f.. => return Err("control, space or non-ASCII byte"),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .ok_or("truncated percent-encoding")?;
                let v = decode_hex(hex).ok_or("bad percent-encoding")?;
                match v {
                    b'.' | b'/' | b'\\' | b'%' | b';' => {
                        return Err("encoded dot, slash, backslash, percent or semicolon")
                    }
                    0..=0x1f | 0x7f => return Err("encoded control byte"),
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => {
                        return Err("needlessly encoded character (non-canonical)")
                    }
                    _ => out.push(v),
                }
                i += 3;
                continue;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    let decoded = String::from_utf8(out).map_err(|_| "encoded bytes are not UTF-8")?;
    for seg in decoded[1..].split('/') {
        if seg == "." || seg == ".." {
            return Err("dot segment");
        }
    }
    if decoded.contains("//") {
        return Err("empty segment (//)");
    }
    Ok(decoded)
}

fn decode_hex(h: &[u8]) -> Option<u8> {
    let d = |c: u8| (c as char).to_digit(16);
    Some((d(h[0])? * 16 + d(h[1])?) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ambiguous_spellings_are_refused() {
        for p in [
            "/v1/../admin",
            "/v1/./chat",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2e/admin",
            "/v1%2fchat",
            "/v1//chat",
            "/v1\\chat",
            "/v1/chat;x=1",
            "/v1/%252e",
            "/v1/%00",
            "/v1/%63hat",
            "/v1/%zz",
            "/v1/%2",
            "v1/chat",
            "/v1/..",
        ] {
            assert!(check_path(p).is_err(), "{p} should be refused");
        }
    }

    #[test]
    fn plain_and_encoded_reserved_paths_pass() {
        assert_eq!(
            check_path("/v1/chat/completions").unwrap(),
            "/v1/chat/completions"
        );
        assert_eq!(check_path("/v1/files/a%20b").unwrap(), "/v1/files/a b");
        assert_eq!(check_path("/").unwrap(), "/");
        assert_eq!(check_path("/v1/x.y/..z").unwrap(), "/v1/x.y/..z");
    }

    proptest! {
        // Whatever the bytes, an accepted path has no dot segment and no empty segment once
        // decoded, and decoding introduced no slash: the upstream splits it as keygate did.
        #[test]
        fn accepted_paths_decode_to_the_same_segments(raw in "/[a-zA-Z0-9./%;\\\\_~-]{0,40}") {
            if let Ok(dec) = check_path(&raw) {
                prop_assert_eq!(dec.matches('/').count(), raw.matches('/').count());
                prop_assert!(!dec.split('/').skip(1).any(|s| s == "." || s == ".."));
                prop_assert!(!dec.contains("//"));
                prop_assert!(!dec.contains('\\') && !dec.contains(';'));
            }
        }

        #[test]
        fn check_path_never_panics(raw in any::<String>()) {
            let _ = check_path(&raw);
        }
    }
}
