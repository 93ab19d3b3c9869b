//! A JSON-unescaped view of a buffer, so that every JSON spelling of a held value is found
//! without enumerating spellings: `\/`, `\u002B`, `\u002b`, `\u00e9`, surrogate pairs, in any
//! mix. HTML character references (`&#45;`, `&#x2D;`, `&sol;`, `&amp;`…, with their `;`) are
//! decoded in the same pass: an HTML error page may echo a key that way.
//!
//! The buffer is cut into tokens from left to right: a backslash starts an escape (`\"`, `\\`,
//! `\/`, `\b`, `\f`, `\n`, `\r`, `\t`, `\uXXXX`, or a `\uD8xx\uDCxx` pair); every other byte is a
//! token of its own. The view rewrites each escape into the spelling `serde_json` writes (the
//! character itself, or `\"`, `\\`, `\n`…, `\u00xx` for other control characters; lone
//! surrogates stay as they are), and each HTML reference into its character, so one pattern
//! set, the raw value and its `serde_json`
//! spelling, matches them all. A match in the view maps back to whole escapes in the buffer.
//!
//! For the stream redactor a cut must fall between tokens: tokenizing from a token boundary
//! gives the same tokens as tokenizing from the start (`\\u0041` is `\\` then `u0041`, but from
//! its second byte it would read as `\u0041`). [`Escapes::boundary_at_or_before`] gives that cut.
//! An escape at the end of a stream prefix that more bytes could still complete is `incomplete`.

/// The escapes of one buffer.
pub(crate) struct Escapes {
    /// Multi-byte escape tokens, sorted: (start, end, rewritten spelling when it differs).
    tokens: Vec<(usize, usize, Option<Vec<u8>>)>,
    /// The start of an escape at the end of a prefix that the next bytes may complete.
    pub(crate) incomplete: Option<usize>,
    rewrites: bool,
}

/// The view itself: its bytes and, per rewritten escape, where it sits in both.
pub(crate) struct View {
    pub(crate) bytes: Vec<u8>,
    /// (view start, view len, buffer start, buffer len), sorted.
    segments: Vec<(usize, usize, usize, usize)>,
}

enum Token {
    Len(usize, Option<Vec<u8>>),
    Incomplete,
}

impl Escapes {
    /// `None` when `buf` holds no backslash or ampersand (the common case, one `memchr2`).
    pub(crate) fn of(buf: &[u8], eof: bool) -> Option<Escapes> {
        let first = memchr::memchr2(b'\\', b'&', buf)?;
        let mut esc = Escapes {
            tokens: Vec::new(),
            incomplete: None,
            rewrites: false,
        };
        let mut at = first;
        loop {
            match token_at(buf, at, eof) {
                Token::Incomplete => {
                    esc.incomplete = Some(at);
                    break;
                }
                Token::Len(n, rewrite) => {
                    if n > 1 {
                        esc.rewrites |= rewrite.is_some();
                        esc.tokens.push((at, at + n, rewrite));
                    }
                    at += n;
                }
            }
            match memchr::memchr2(b'\\', b'&', &buf[at..]) {
                Some(i) => at += i,
                None => break,
            }
        }
        Some(esc)
    }

    /// The largest token boundary at or before `pos`.
    pub(crate) fn boundary_at_or_before(&self, pos: usize) -> usize {
        let i = self.tokens.partition_point(|t| t.0 < pos);
        match i.checked_sub(1).map(|i| &self.tokens[i]) {
            Some(&(start, end, _)) if end > pos => start,
            _ => pos,
        }
    }

    /// The view of `buf[..limit]` (limit: where an incomplete escape starts, if any), when it
    /// differs from `buf`: an escape is spelled differently, or one is cut off (what precedes
    /// it may be the start of a value whose next character is that escape).
    pub(crate) fn view(&self, buf: &[u8]) -> Option<View> {
        if !self.rewrites && self.incomplete.is_none() {
            return None;
        }
        let limit = self.incomplete.unwrap_or(buf.len());
        let mut bytes = Vec::with_capacity(limit);
        let mut segments = Vec::new();
        let mut at = 0;
        for (start, end, rewrite) in &self.tokens {
            let Some(rewrite) = rewrite else {
                continue;
            };
            bytes.extend_from_slice(&buf[at..*start]);
            segments.push((bytes.len(), rewrite.len(), *start, end - start));
            bytes.extend_from_slice(rewrite);
            at = *end;
        }
        bytes.extend_from_slice(&buf[at..limit]);
        Some(View { bytes, segments })
    }
}

impl View {
    /// The buffer offset where view byte `j` (or the end, `j == len`) begins: a rewritten
    /// escape's first byte.
    pub(crate) fn start_of(&self, j: usize) -> usize {
        let i = self.segments.partition_point(|s| s.0 <= j);
        match i.checked_sub(1).map(|i| self.segments[i]) {
            None => j,
            Some((v, vl, o, _)) if j < v + vl => o,
            Some((v, vl, o, ol)) => o + ol + (j - v - vl),
        }
    }

    /// The buffer offset where a match ending (exclusive) at view offset `j` ends: after the
    /// whole escape holding its last byte.
    pub(crate) fn end_of(&self, j: usize) -> usize {
        if j == 0 {
            return 0;
        }
        let last = j - 1;
        let i = self.segments.partition_point(|s| s.0 <= last);
        match i.checked_sub(1).map(|i| self.segments[i]) {
            Some((v, vl, o, ol)) if last < v + vl => o + ol,
            _ => self.start_of(last) + 1,
        }
    }
}

fn hex4(buf: &[u8], at: usize, eof: bool) -> Result<u32, Token> {
    let mut cp = 0u32;
    for k in 0..4 {
        match buf.get(at + k) {
            None if eof => return Err(Token::Len(1, None)),
            None => return Err(Token::Incomplete),
            Some(b) => match (*b as char).to_digit(16) {
                Some(d) => cp = cp * 16 + d,
                None => return Err(Token::Len(1, None)),
            },
        }
    }
    Ok(cp)
}

fn token_at(buf: &[u8], at: usize, eof: bool) -> Token {
    if buf[at] == b'&' {
        return html_reference(buf, at, eof);
    }
    let Some(&next) = buf.get(at + 1) else {
        return if eof {
            Token::Len(1, None)
        } else {
            Token::Incomplete
        };
    };
    match next {
        b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => Token::Len(2, None),
        b'/' => Token::Len(2, Some(b"/".to_vec())),
        b'u' => {
            let cp = match hex4(buf, at + 2, eof) {
                Ok(cp) => cp,
                Err(t) => return t,
            };
            if (0xD800..0xDC00).contains(&cp) {
                return surrogate_pair(buf, at, cp, eof);
            }
            match char::from_u32(cp) {
                Some(c) => Token::Len(6, canonical(c, &buf[at..at + 6])),
                // A lone low surrogate is no character: left as it is.
                None => Token::Len(6, None),
            }
        }
        _ => Token::Len(1, None),
    }
}

fn surrogate_pair(buf: &[u8], at: usize, high: u32, eof: bool) -> Token {
    let low_at = at + 6;
    // `\uDC00`..`\uDFFF` after the high half; each byte may still be missing.
    let rest = &buf[low_at.min(buf.len())..buf.len().min(low_at + 6)];
    let fits = |k: usize, b: u8| match k {
        0 => b == b'\\',
        1 => b == b'u',
        2 => b == b'd' || b == b'D',
        3 => matches!(b, b'c'..=b'f' | b'C'..=b'F'),
        _ => b.is_ascii_hexdigit(),
    };
    if !rest.iter().enumerate().all(|(k, &b)| fits(k, b)) {
        return Token::Len(6, None);
    }
    if rest.len() < 6 {
        return if eof {
            Token::Len(6, None)
        } else {
            Token::Incomplete
        };
    }
    let Ok(low) = hex4(buf, low_at + 2, true) else {
        return Token::Len(6, None);
    };
    let cp = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
    match char::from_u32(cp) {
        Some(c) => Token::Len(12, canonical(c, &buf[at..at + 12])),
        None => Token::Len(12, None),
    }
}

/// Named references for the characters a key or its encodings may hold.
const NAMED: &[(&[u8], char)] = &[
    (b"amp", '&'),
    (b"lt", '<'),
    (b"gt", '>'),
    (b"quot", '"'),
    (b"apos", '\''),
    (b"sol", '/'),
    (b"plus", '+'),
    (b"equals", '='),
    (b"period", '.'),
    (b"lowbar", '_'),
    (b"colon", ':'),
    (b"num", '#'),
    (b"excl", '!'),
    (b"percnt", '%'),
    (b"dollar", '$'),
    (b"ast", '*'),
    (b"commat", '@'),
    (b"tilde", '~'),
];

/// The longest reference looked for: `&#x10FFFF;` and `&#1114111;` are 10 bytes.
const MAX_REFERENCE: usize = 10;

/// `&#DDD;`, `&#xHHH;` or `&name;` at `at`; a lone `&` otherwise.
fn html_reference(buf: &[u8], at: usize, eof: bool) -> Token {
    let end = buf.len().min(at + MAX_REFERENCE);
    let semi = memchr::memchr(b';', &buf[at..end]).map(|i| at + i);
    let Some(semi) = semi else {
        // Cut off by the end of a prefix while it still looks like a reference: wait for more.
        let body = &buf[at + 1..end];
        let plausible = body.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'#');
        return if !eof && end == buf.len() && plausible {
            Token::Incomplete
        } else {
            Token::Len(1, None)
        };
    };
    let body = &buf[at + 1..semi];
    let c = match body {
        [b'#', b'x' | b'X', hex @ ..] if !hex.is_empty() => std::str::from_utf8(hex)
            .ok()
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32),
        [b'#', dec @ ..] if !dec.is_empty() => std::str::from_utf8(dec)
            .ok()
            .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u32>().ok())
            .and_then(char::from_u32),
        name => NAMED.iter().find(|(n, _)| *n == name).map(|(_, c)| *c),
    };
    match c {
        Some(c) => Token::Len(semi + 1 - at, Some(c.to_string().into_bytes())),
        None => Token::Len(1, None),
    }
}

/// How `serde_json` writes `c`, when that differs from `original`.
fn canonical(c: char, original: &[u8]) -> Option<Vec<u8>> {
    let out: Vec<u8> = match c {
        '"' => b"\\\"".to_vec(),
        '\\' => b"\\\\".to_vec(),
        '\u{8}' => b"\\b".to_vec(),
        '\u{c}' => b"\\f".to_vec(),
        '\n' => b"\\n".to_vec(),
        '\r' => b"\\r".to_vec(),
        '\t' => b"\\t".to_vec(),
        c if (c as u32) < 0x20 => format!("\\u{:04x}", c as u32).into_bytes(),
        c => c.to_string().into_bytes(),
    };
    (out != original).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(s: &str) -> String {
        let e = Escapes::of(s.as_bytes(), true).expect("has escapes");
        match e.view(s.as_bytes()) {
            Some(v) => String::from_utf8(v.bytes).expect("utf-8"),
            None => s.to_string(),
        }
    }

    #[test]
    fn every_escape_spelling_becomes_the_serde_json_one() {
        assert_eq!(view(r"a\/b"), "a/b");
        assert_eq!(view(r"\u002B\u002b"), "++");
        assert_eq!(view(r"caf\u00e9 caf\u00E9"), "café café");
        assert_eq!(view(r"\ud83d\ude00"), "\u{1F600}");
        assert_eq!(view(r"\u0022 \u005c \u000a \u0001"), r#"\" \\ \n \u0001"#);
        // Already canonical, lone surrogates and broken escapes stay.
        assert_eq!(
            view(r#"\" \\ \n \ud83d x \q \u12"#),
            r#"\" \\ \n \ud83d x \q \u12"#
        );
        // An escaped backslash is not the start of another escape.
        assert_eq!(view(r"\\u0041\/"), r"\\u0041/");
    }

    #[test]
    fn view_offsets_map_to_whole_escapes() {
        let s = br"xy\u0041z\/w";
        let e = Escapes::of(s, true).expect("escapes");
        let v = e.view(s).expect("rewrites");
        assert_eq!(v.bytes, b"xyAz/w");
        assert_eq!(v.start_of(2), 2);
        assert_eq!(v.end_of(3), 8);
        assert_eq!(v.start_of(3), 8);
        assert_eq!(v.start_of(4), 9);
        assert_eq!(v.end_of(5), 11);
        assert_eq!(v.start_of(6), 12);
    }

    #[test]
    fn html_character_references_become_their_characters() {
        assert_eq!(view("sk&#45;a&#x2d;b&#X2F;c&sol;d&amp;e"), "sk-a-b/c/d&e");
        // Unknown names, no `;`, too long, or not a character: left as they are.
        assert_eq!(
            view("a&nbsp;b &#45 c &#xD800; & d&#99999999;"),
            "a&nbsp;b &#45 c &#xD800; & d&#99999999;"
        );
        let e = Escapes::of(b"x &#4", false).expect("escapes");
        assert_eq!(e.incomplete, Some(2));
        let e = Escapes::of(b"x & y", false).expect("escapes");
        assert_eq!(e.incomplete, None);
    }

    #[test]
    fn an_escape_cut_by_the_end_of_a_prefix_is_incomplete() {
        for prefix in [
            r"ab\",
            r"ab\u",
            r"ab\u00",
            r"ab\ud83d",
            r"ab\ud83d\u",
            r"ab\ud83d\uDE0",
        ] {
            let e = Escapes::of(prefix.as_bytes(), false).expect("escapes");
            assert_eq!(e.incomplete, Some(2), "{prefix}");
        }
        let e = Escapes::of(br"ab\ud83dxy", false).expect("escapes");
        assert_eq!(e.incomplete, None);
        assert_eq!(e.boundary_at_or_before(4), 2);
        assert_eq!(e.boundary_at_or_before(8), 8);
    }

    proptest::proptest! {
        /// The engine relies on this (`Engine::collect`): no escape is rewritten longer than it
        /// is spelled, so a view is never longer than its buffer, and a whole buffer shorter
        /// than every held spelling has no match in its view either.
        #[test]
        fn a_view_is_never_longer_than_its_buffer(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "a", "\\/", "\\u0001", "\\u001f", "\\u0022", "\\u005c", "\\u00e9", "\\u20ac",
                    "\\ud83d\\ude00", "\\ud83d", "\\n", "\\\\", "&#1;", "&#x1;", "&#9;", "&#34;",
                    "&#128;", "&#x80;", "&#2048;", "&#x10000;", "&#65536;", "&amp;", "&lt;", "&quot;",
                    "&#0001;", "&", "\\", "\\u", ";", "#",
                ]),
                0..12),
        ) {
            let buf = pieces.concat();
            if let Some(e) = Escapes::of(buf.as_bytes(), true) {
                if let Some(v) = e.view(buf.as_bytes()) {
                    proptest::prop_assert!(v.bytes.len() <= buf.len(), "{buf:?}");
                }
                proptest::prop_assert_eq!(e.incomplete, None);
                proptest::prop_assert!(e.tokens.iter().all(|t| t.1 <= buf.len()));
            }
        }
    }
}
