//! The spellings of a held secret that a response, a log line or a tool output may carry.
//!
//! A secret is looked for raw and in every encoding a program is likely to apply on its way
//! out: base64 (standard and URL-safe, padded or not), percent-encoding (upper- and lower-case
//! hex; RFC 3986, `encodeURIComponent` and encode-everything-but-alphanumerics sets), JSON string escaping, and hex (only
//! for secrets of 16 bytes or more, where a hex run cannot be an accident).
//!
//! Base64 needs care: a secret inside a longer blob, such as `Basic base64(user:secret)`, does
//! not start on a 3-byte boundary, so its encoding there differs from `base64(secret)`. For
//! each of the three alignments we keep the *stable middle*: the characters whose six bits come
//! from the secret alone. Whatever surrounds the secret, one of the three appears verbatim.
//! The one or two characters at either edge carry a few bits of the secret mixed with the
//! neighbours' and are not redacted; they reveal at most 4 bits each.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

/// Held secrets shorter than this are ignored: an 8-byte or shorter value (a PIN, a port, a
/// user name) matches everywhere, and no provider issues API keys that short.
pub const MIN_KNOWN_LEN: usize = 8;

/// Hex is only looked for when the secret is at least this long (16 bytes = 32 hex digits).
const MIN_HEX_LEN: usize = 16;

/// RFC 3986 unreserved characters stay as they are (Python's `quote(safe="")`, Go's
/// `QueryEscape` apart from the space).
pub const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// JavaScript's `encodeURIComponent` also keeps `!*'()`.
const JS_COMPONENT: &AsciiSet = &COMPONENT
    .remove(b'!')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Every pattern that must be redacted for `value`, deduplicated, the raw value first.
pub(crate) fn spellings(value: &[u8]) -> Vec<Vec<u8>> {
    if value.len() < MIN_KNOWN_LEN {
        return Vec::new();
    }
    let mut out = vec![value.to_vec()];
    for engine in [&STANDARD, &URL_SAFE] {
        out.push(engine.encode(value).into_bytes());
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        out.push(engine.encode(value).into_bytes());
        for shift in 0..3 {
            out.push(stable_middle(engine, value, shift));
        }
    }
    // NON_ALPHANUMERIC is what a strict encoder (and older keygate) produces: `-` as `%2D`.
    for set in [COMPONENT, JS_COMPONENT, NON_ALPHANUMERIC] {
        let upper = percent_encoding::percent_encode(value, set).to_string();
        out.push(lower_percent_hex(&upper));
        out.push(upper.into_bytes());
    }
    if let Ok(text) = std::str::from_utf8(value) {
        if let Ok(json) = serde_json::to_string(text) {
            out.push(json.as_bytes()[1..json.len() - 1].to_vec());
        }
    }
    if value.len() >= MIN_HEX_LEN {
        let lower = hex::encode(value);
        out.push(lower.to_ascii_uppercase().into_bytes());
        out.push(lower.into_bytes());
    }
    out.retain(|p| p.len() >= MIN_KNOWN_LEN);
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// The base64 characters of `value` that do not depend on its neighbours when it starts
/// `shift` bytes after a 3-byte boundary.
fn stable_middle(engine: &impl base64::Engine, value: &[u8], shift: usize) -> Vec<u8> {
    let mut shifted = vec![0u8; shift];
    shifted.extend_from_slice(value);
    let encoded = engine.encode(&shifted).into_bytes();
    // Character k carries bits [6k, 6k + 6); the secret owns bits [8 * shift, 8 * len).
    let first = (8 * shift).div_ceil(6);
    let end = (8 * shifted.len()) / 6;
    if first >= end {
        return Vec::new();
    }
    encoded[first..end].to_vec()
}

fn lower_percent_hex(upper: &str) -> Vec<u8> {
    let mut out = upper.as_bytes().to_vec();
    let mut i = 0;
    while i < out.len() {
        if out[i] == b'%' {
            for b in out.iter_mut().skip(i + 1).take(2) {
                *b = b.to_ascii_lowercase();
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    out
}

/// Answers "could these trailing bytes still grow into a pattern?" for the stream redactor.
///
/// Patterns are kept sorted, so every pattern that starts with `t` sits in one run beginning
/// at the first pattern `>= t`.
#[derive(Default)]
pub(crate) struct Prefixes {
    sorted: Vec<Vec<u8>>,
    first_byte: Vec<bool>,
    /// A bit per hash of the first 4 bytes of every pattern longer than 4: with hundreds of
    /// patterns (and hold-backs of hundreds of bytes) the sorted lookup at every trailing offset
    /// cost more than the search itself; this rules out almost every offset first.
    quad: Vec<u64>,
    longest: usize,
    /// Every byte some pattern holds somewhere.
    any_byte: Vec<bool>,
}

fn quad_slot(b: &[u8]) -> usize {
    let w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    (w.wrapping_mul(0x9E37_79B1) >> 16) as usize
}

impl Prefixes {
    pub(crate) fn new(patterns: impl IntoIterator<Item = Vec<u8>>) -> Self {
        let mut sorted: Vec<Vec<u8>> = patterns.into_iter().filter(|p| !p.is_empty()).collect();
        sorted.sort();
        sorted.dedup();
        let mut first_byte = vec![false; 256];
        let mut any_byte = vec![false; 256];
        for p in &sorted {
            first_byte[usize::from(p[0])] = true;
            for &b in p {
                any_byte[usize::from(b)] = true;
            }
        }
        let mut quad = vec![0u64; 1 << 10];
        for p in sorted.iter().filter(|p| p.len() > 4) {
            let s = quad_slot(p);
            quad[s / 64] |= 1 << (s % 64);
        }
        let longest = sorted.iter().map(Vec::len).max().unwrap_or(0);
        Prefixes {
            sorted,
            first_byte,
            quad,
            longest,
            any_byte,
        }
    }

    /// The earliest offset whose suffix of `buf` is a proper prefix of some pattern, or
    /// `buf.len()` when none is: bytes before it can never be part of a longer match.
    pub(crate) fn tail_start(&self, buf: &[u8]) -> usize {
        let mut from = buf.len().saturating_sub(self.longest.saturating_sub(1));
        // A tail that could still grow into a pattern holds only bytes patterns hold, so it
        // starts after the last byte none holds: a chunk that ends in one (an SSE event's
        // blank line, a JSON answer's closing brace) has no tail to test.
        if let Some(k) = buf[from..]
            .iter()
            .rposition(|&b| !self.any_byte[usize::from(b)])
        {
            from += k + 1;
        }
        (from..buf.len())
            .find(|&i| {
                // The first byte first: one load rules out most offsets of ordinary text.
                // A tail of 4 bytes or more can only grow into a pattern longer than 4.
                self.first_byte[usize::from(buf[i])]
                    && (buf.len() - i < 4 || {
                        let s = quad_slot(&buf[i..]);
                        self.quad[s / 64] & (1 << (s % 64)) != 0
                    })
                    && self.continues(&buf[i..])
            })
            .unwrap_or(buf.len())
    }

    fn continues(&self, tail: &[u8]) -> bool {
        let i = self.sorted.partition_point(|p| p.as_slice() < tail);
        self.sorted[i..]
            .iter()
            .take(2)
            .any(|p| p.len() > tail.len() && p.starts_with(tail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_middle_appears_inside_basic_auth_at_every_alignment() {
        let secret = b"s3cr3t-Value-0123456789";
        for user in ["u", "us", "use", "user"] {
            let mut creds = user.as_bytes().to_vec();
            creds.push(b':');
            creds.extend_from_slice(secret);
            let blob = STANDARD.encode(&creds);
            let found = spellings(secret)
                .iter()
                .any(|p| blob.as_bytes().windows(p.len()).any(|w| w == p.as_slice()));
            assert!(found, "no spelling inside base64 of {user}:secret");
        }
    }

    #[test]
    fn short_values_yield_no_patterns_and_short_ones_no_hex() {
        assert!(spellings(b"1234567").is_empty());
        let eight = spellings(b"abcdefgh");
        assert!(!eight.contains(&hex::encode(b"abcdefgh").into_bytes()));
        let sixteen = spellings(b"abcdefghijklmnop");
        assert!(sixteen.contains(&hex::encode(b"abcdefghijklmnop").into_bytes()));
    }

    #[test]
    fn percent_encoding_comes_in_both_hex_cases() {
        let p = spellings(b"pa ss/word+1234");
        assert!(p.contains(&b"pa%20ss%2Fword%2B1234".to_vec()));
        assert!(p.contains(&b"pa%20ss%2fword%2b1234".to_vec()));
    }

    proptest::proptest! {
        /// The 4-byte filter rules out only offsets whose tail no pattern continues.
        #[test]
        fn tail_start_is_the_earliest_tail_some_pattern_continues(
            patterns in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(&b"abZ9"[..]), 1..12), 1..30),
            buf in proptest::collection::vec(proptest::sample::select(&b"abZ9 "[..]), 0..40),
        ) {
            let set = Prefixes::new(patterns.clone());
            let want = (0..buf.len())
                .find(|&i| {
                    patterns
                        .iter()
                        .any(|p| p.len() > buf.len() - i && p.starts_with(&buf[i..]))
                })
                .unwrap_or(buf.len());
            proptest::prop_assert_eq!(set.tail_start(&buf), want);
        }
    }

    #[test]
    fn tail_start_finds_the_longest_suffix_that_can_still_grow() {
        let set = Prefixes::new([b"secretvalue".to_vec(), b"other".to_vec()]);
        assert_eq!(set.tail_start(b"xx secr"), 3);
        assert_eq!(set.tail_start(b"xx secretvalue"), 14);
        assert_eq!(set.tail_start(b"xx oth"), 3);
        assert_eq!(set.tail_start(b"xx"), 2);
    }
}
