//! The request-path checker: a leaf that `route` uses on every request and `config` and the
//! allow-rule parser use at load, so none of them needs the others.

/// Checks a raw request path and returns its decoded form, or why it is refused.
pub fn check_path(raw: &str) -> Result<String, &'static str> {
    let decoded = decode(raw)?;
    // Byte splits, not `str::split`/`contains`: their searchers' set-up cost more than these
    // short paths (every request's path passes here).
    let d = decoded.as_bytes();
    if d[1..]
        .split(|&b| b == b'/')
        .any(|seg| seg == b"." || seg == b"..")
    {
        return Err("dot segment");
    }
    if d.windows(2).any(|w| w == b"//") {
        return Err("empty segment (//)");
    }
    Ok(decoded)
}

/// Percent-decodes a path that starts with `/`, refusing every ambiguous spelling.
fn decode(raw: &str) -> Result<String, &'static str> {
    if !raw.starts_with('/') {
        return Err("must start with /");
    }
    let bytes = raw.as_bytes();
    if bytes.iter().all(|&b| PLAIN[usize::from(b)]) {
        // Nothing to decode or refuse (almost every path): the same bytes, which are ASCII.
        return Ok(raw.to_owned());
    }
    decode_each(bytes)
}

/// `decode` byte by byte: the definition, and the way for paths with anything to decode or
/// refuse.
fn decode_each(bytes: &[u8]) -> Result<String, &'static str> {
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
    String::from_utf8(out).map_err(|_| "encoded bytes are not UTF-8")
}

/// The bytes `decode` passes on as they are: not `%`, `\\`, `;`, `#`, a control, space or
/// non-ASCII byte.
static PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x21;
    while b < 0x7f {
        t[b] = !matches!(b as u8, b'%' | b'\\' | b';' | b'#');
        b += 1;
    }
    t
};

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

        /// The plain-path shortcut answers as decoding byte by byte does, for any text.
        #[test]
        fn plain_paths_decode_as_byte_by_byte(
            raw in "/([ -~]|[\\x00-\\x1f]|\\x7f|é){0,30}"
        ) {
            prop_assert_eq!(decode(&raw), decode_each(raw.as_bytes()));
        }

        #[test]
        fn check_path_answers_as_the_string_search_did(
            raw in "/[a-z./%;2eEfF_-]{0,24}"
        ) {
            prop_assert_eq!(check_path(&raw), string_search_check(&raw));
        }
    }

    /// `check_path`'s segment checks as they were, with `str::split` and `contains`.
    fn string_search_check(raw: &str) -> Result<String, &'static str> {
        let decoded = decode(raw)?;
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
}
