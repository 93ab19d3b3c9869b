//! HTTP/1.1 message framing shared by keygate's own client (`forward::h1`, answers from an
//! upstream) and server (`listen::h1`, requests from an agent): one body decoder (a length, the
//! chunked coding with its extensions, trailers and limits, or the connection's close), the
//! `content-length` and list-token readings, and the chunk-size line both ends write.
//!
//! Two hand-rolled chunked decoders were two request-smuggling surfaces to audit; this is the
//! only one. It is hyper's (`proto/h1/decode.rs`), state for state and limit for limit, but it
//! runs over the bytes already in the connection's buffer instead of pulling them one at a time
//! (the common `\r\n`, hex digits, `\r\n` a run at a time, each run the same transitions
//! composed), and after a chunk's data it reads the framing that follows when it is already
//! there, so a body ends (and its connection is free) with its last data. Both ends are held to hyper by
//! differential proptests (`own_client_reads_answers_as_hyper_does`,
//! `serves_every_byte_sequence_as_hyper_s_http1_server_does`) and fuzzed (`h1_answer`,
//! `h1_server`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The most header fields in a head or in a body's trailers (hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;
/// The most bytes of all chunk extensions of one body (hyper's `CHUNKED_EXTENSIONS_LIMIT`).
pub(crate) const EXTENSIONS_LIMIT: u64 = 16 * 1024;
/// The most bytes of one body's trailer section (hyper's `TRAILER_LIMIT`).
pub(crate) const TRAILER_LIMIT: usize = 16 * 1024;

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `content-length`: this many bytes (0: no body).
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the peer closes the connection (an answer only).
    Close,
}

/// Why a body's framing is broken: hyper's messages, kept as a byte so a failed decoder says
/// the same again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Broken {
    SizeOverflow,
    MissingSizeDigit,
    InvalidSize,
    InvalidSizeLws,
    ExtensionNewline,
    ExtensionsOverLimit,
    SizeLf,
    BodyCr,
    BodyLf,
    TrailersCount,
    TrailerLf,
    EndLf,
    State,
    TrailersBytes,
    HeaderName,
    HeaderValue,
    PartialHeader,
    Trailer,
    Unreadable,
}

impl Broken {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Broken::SizeOverflow => "invalid chunk size: overflow",
            Broken::MissingSizeDigit => "Invalid chunk size line: missing size digit",
            Broken::InvalidSize => "Invalid chunk size line: Invalid Size",
            Broken::InvalidSizeLws => "Invalid chunk size linear white space",
            Broken::ExtensionNewline => "invalid chunk extension contains newline",
            Broken::ExtensionsOverLimit => "chunk extensions over limit",
            Broken::SizeLf => "Invalid chunk size LF",
            Broken::BodyCr => "Invalid chunk body CR",
            Broken::BodyLf => "Invalid chunk body LF",
            Broken::TrailersCount => "chunk trailers count overflow",
            Broken::TrailerLf => "Invalid trailer end LF",
            Broken::EndLf => "Invalid chunk end LF",
            Broken::State => "chunked state",
            Broken::TrailersBytes => "chunk trailers bytes over limit",
            Broken::HeaderName => "Invalid header name",
            Broken::HeaderValue => "Invalid header value",
            Broken::PartialHeader => "Partial header",
            Broken::Trailer => "invalid trailer",
            Broken::Unreadable => "the body could not be read",
        }
    }
}

/// Why a body could not be read. The messages are keygate's (hyper's wording): never the
/// peer's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// The framing is broken or over a limit.
    Invalid(Broken),
    /// The connection ended inside the body.
    Incomplete,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Invalid(what) => f.write_str(what.as_str()),
            BodyError::Incomplete => f.write_str("end of file before message length reached"),
        }
    }
}

impl std::error::Error for BodyError {}

/// What the decoder made of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    /// A chunked body's trailer fields; the body ends after them.
    Trailers(HeaderMap),
    /// The body ended.
    Done,
    /// More bytes are needed.
    More,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `size` bytes are left.
    Length,
    Close,
    // The chunked coding, as hyper's `ChunkedState`.
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Body,
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
    /// The last chunk and the trailer section are read: the trailers (if any) are next.
    End,
    Done,
    /// A broken body: every later call says the same again.
    Failed(BodyError),
}

impl State {
    /// Whether the state reads framing bytes (not data, not an end).
    fn is_framing(self) -> bool {
        use State::*;
        matches!(
            self,
            Start
                | Size
                | SizeLws
                | Extension
                | SizeLf
                | BodyCr
                | BodyLf
                | Trailer
                | TrailerLf
                | EndCr
                | EndLf
        )
    }
}

/// Decodes a message body from the connection's read buffer, taking out what it used and
/// leaving what follows the body (the next message, or bytes that forbid reusing the
/// connection). As small as the client's answer body and the server's connection need it (24
/// bytes): what only a trailer section needs is boxed.
#[derive(Debug)]
pub(crate) struct Decoder {
    state: State,
    /// Chunk-extension bytes seen so far in the body (under `EXTENSIONS_LIMIT`).
    extensions: u32,
    /// Bytes left of the body (`Length`) or of the current chunk.
    size: u64,
    trailers: Option<Box<Trailers>>,
}

/// A trailer section as read so far (from its first field on), and its field count.
#[derive(Debug)]
struct Trailers {
    bytes: BytesMut,
    count: usize,
}

impl Decoder {
    pub(crate) fn new(framing: Framing) -> Decoder {
        let (state, size) = match framing {
            Framing::Length(0) => (State::Done, 0),
            Framing::Length(n) => (State::Length, n),
            Framing::Chunked => (State::Start, 0),
            Framing::Close => (State::Close, 0),
        };
        Decoder {
            state,
            extensions: 0,
            size,
            trailers: None,
        }
    }

    /// Whether the body ended (all of it read, trailers included).
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes still to come, when the framing says.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length => Some(self.size),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The connection failed under the body: it is not read further.
    pub(crate) fn fail(&mut self) {
        self.state = State::Failed(BodyError::Invalid(Broken::Unreadable));
    }

    /// The peer closed the connection: the end of a close-delimited body, an error for any other
    /// body not yet at its end.
    pub(crate) fn eof(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            State::Failed(e) => Err(e),
            _ => {
                self.state = State::Failed(BodyError::Incomplete);
                Err(BodyError::Incomplete)
            }
        }
    }

    /// Decodes what `buf` holds of the body.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::Done),
                State::Failed(e) => return Err(e),
                State::Length => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let data = take(buf, self.size);
                    self.size -= data.len() as u64;
                    if self.size == 0 {
                        self.state = State::Done;
                    }
                    return Ok(Decoded::Data(data));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::Body => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let data = take(buf, self.size);
                    self.size -= data.len() as u64;
                    if self.size == 0 {
                        self.state = State::BodyCr;
                        // The framing after the chunk is read now when it is here: an error in
                        // it is said by the next call, after this data.
                        if let Err(e) = self.framing(buf) {
                            self.state = State::Failed(e);
                        }
                    }
                    return Ok(Decoded::Data(data));
                }
                State::End => {
                    self.state = State::Done;
                    let Some(mut t) = self.trailers.take() else {
                        return Ok(Decoded::Done);
                    };
                    return match trailers(&mut t.bytes, t.count) {
                        Ok(map) => Ok(Decoded::Trailers(map)),
                        Err(e) => {
                            self.state = State::Failed(e);
                            Err(e)
                        }
                    };
                }
                _ => match self.framing(buf) {
                    Ok(true) => {}
                    Ok(false) => return Ok(Decoded::More),
                    Err(e) => {
                        self.state = State::Failed(e);
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Reads framing from `buf` until a chunk's data or the body's end; false when `buf` ran out
    /// first. A body without trailers is done at once. Not inlined: `decode`'s data paths stay
    /// small (a length-delimited body never comes here).
    #[inline(never)]
    fn framing(&mut self, buf: &mut BytesMut) -> Result<bool, BodyError> {
        let mut used = 0;
        let r = self.framing_in(buf, &mut used);
        buf.advance(used);
        let reached = r?;
        if reached && self.state == State::End && self.trailers.is_none() {
            self.state = State::Done;
        }
        Ok(reached)
    }

    fn framing_in(&mut self, bytes: &[u8], used: &mut usize) -> Result<bool, BodyError> {
        use State::*;
        let invalid = BodyError::Invalid;
        while self.state.is_framing() {
            // The common framing, `\r\n` after a chunk's data and a size line of hex digits and
            // `\r\n`, taken a run at a time: each step below is exactly the byte transitions of
            // the match that follows it, composed.
            let rest = bytes.get(*used..).unwrap_or_default();
            if matches!(self.state, BodyCr | EndCr)
                && self.trailers.is_none()
                && rest.starts_with(b"\r\n")
            {
                *used += 2;
                self.state = if self.state == BodyCr { Start } else { End };
                continue;
            }
            if matches!(self.state, Start | Size) {
                let digits = rest.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                if digits > 0 {
                    for &b in &rest[..digits] {
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(hex(b).unwrap_or_default()))
                            .ok_or(invalid(Broken::SizeOverflow))?;
                    }
                    *used += digits;
                    self.state = Size;
                    if rest[digits..].starts_with(b"\r\n") {
                        *used += 2;
                        self.state = if self.size == 0 { EndCr } else { Body };
                    }
                    continue;
                }
            }
            let Some(&b) = bytes.get(*used) else {
                return Ok(false);
            };
            *used += 1;
            self.state = match (self.state, b) {
                (Start | Size, b) if hex(b).is_some() => {
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(hex(b).unwrap_or_default()))
                        .ok_or(invalid(Broken::SizeOverflow))?;
                    Size
                }
                (Start, _) => return Err(invalid(Broken::MissingSizeDigit)),
                (Size | SizeLws, b'\t' | b' ') => SizeLws,
                (Size | SizeLws, b';') => Extension,
                (Size | SizeLws, b'\r') => SizeLf,
                (Size, _) => return Err(invalid(Broken::InvalidSize)),
                (SizeLws, _) => return Err(invalid(Broken::InvalidSizeLws)),
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err(invalid(Broken::ExtensionNewline)),
                (Extension, _) => {
                    self.extensions += 1;
                    if u64::from(self.extensions) >= EXTENSIONS_LIMIT {
                        return Err(invalid(Broken::ExtensionsOverLimit));
                    }
                    Extension
                }
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Body,
                (SizeLf, _) => return Err(invalid(Broken::SizeLf)),
                (BodyCr, b'\r') => BodyLf,
                (BodyCr, _) => return Err(invalid(Broken::BodyCr)),
                (BodyLf, b'\n') => Start,
                (BodyLf, _) => return Err(invalid(Broken::BodyLf)),
                (Trailer, b) => {
                    self.push_trailer(b)?;
                    if b == b'\r' {
                        TrailerLf
                    } else {
                        Trailer
                    }
                }
                (TrailerLf, b'\n') => {
                    let t = self.trailers_mut();
                    if t.count >= MAX_HEADERS {
                        return Err(invalid(Broken::TrailersCount));
                    }
                    t.count += 1;
                    self.push_trailer(b)?;
                    EndCr
                }
                (TrailerLf, _) => return Err(invalid(Broken::TrailerLf)),
                (EndCr, b'\r') => {
                    if self.trailers.is_some() {
                        self.push_trailer(b)?;
                    }
                    EndLf
                }
                (EndCr, b) => {
                    self.push_trailer(b)?;
                    Trailer
                }
                (EndLf, b'\n') => {
                    if self.trailers.is_some() {
                        self.push_trailer(b)?;
                    }
                    End
                }
                (EndLf, _) => return Err(invalid(Broken::EndLf)),
                // Not framing states: the loop does not run in them.
                (Length | Close | Body | End | Done | Failed(_), _) => {
                    return Err(invalid(Broken::State))
                }
            };
        }
        Ok(true)
    }

    /// The trailer section, begun at its first byte (64 bytes fit a single `expires` field).
    fn trailers_mut(&mut self) -> &mut Trailers {
        self.trailers.get_or_insert_with(|| {
            Box::new(Trailers {
                bytes: BytesMut::with_capacity(64),
                count: 0,
            })
        })
    }

    fn push_trailer(&mut self, b: u8) -> Result<(), BodyError> {
        let t = &mut self.trailers_mut().bytes;
        t.put_u8(b);
        if t.len() >= TRAILER_LIMIT {
            return Err(BodyError::Invalid(Broken::TrailersBytes));
        }
        Ok(())
    }
}

/// Up to `n` bytes from the front of `buf`.
#[inline]
fn take(buf: &mut BytesMut, n: u64) -> Bytes {
    let n = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
    buf.split_to(n).freeze()
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b + 10 - b'a')),
        b'A'..=b'F' => Some(u64::from(b + 10 - b'A')),
        _ => None,
    }
}

/// hyper's `decode_trailers`: the section's `count` fields, each a valid name and value.
fn trailers(buf: &mut BytesMut, count: usize) -> Result<HeaderMap, BodyError> {
    let mut out = HeaderMap::new();
    let mut headers = vec![httparse::EMPTY_HEADER; count];
    match httparse::parse_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete((_, headers))) => {
            for h in headers {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| BodyError::Invalid(Broken::HeaderName))?;
                let value = HeaderValue::from_bytes(h.value)
                    .map_err(|_| BodyError::Invalid(Broken::HeaderValue))?;
                out.append(name, value);
            }
            Ok(out)
        }
        Ok(httparse::Status::Partial) => Err(BodyError::Invalid(Broken::PartialHeader)),
        Err(_) => Err(BodyError::Invalid(Broken::Trailer)),
    }
}

/// A decimal length: one or more digits, nothing else (hyper's `from_digits`: no sign, no
/// space), within `u64`.
pub(crate) fn from_digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// Every value and list member of the `content-length` fields, which must all be the same
/// decimal number (hyper's `content_length_parse_all_values`). `None`: none, or not one number.
pub(crate) fn content_length<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Option<u64> {
    let mut found = None;
    for v in values {
        for part in v.as_bytes().split(|b| *b == b',') {
            let n = from_digits(part.trim_ascii())?;
            if found.is_some_and(|f| f != n) {
                return None;
            }
            found = Some(n);
        }
    }
    found
}

/// Whether the list in `value` names `token` (`connection: keep-alive, close`), case aside. A
/// value that is not visible ASCII names nothing (hyper reads it with `to_str`).
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    is_visible_ascii(value)
        && value
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether the last coding a `transfer-encoding` value lists is `chunked` (hyper's
/// `is_chunked_`, which reads the value with `to_str`).
pub(crate) fn ends_in_chunked(value: &[u8]) -> bool {
    is_visible_ascii(value)
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// What `HeaderValue::to_str` accepts.
fn is_visible_ascii(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (32..127).contains(&b))
}

/// One header field line, `name: value` and CRLF, as both ends write them.
pub(crate) fn put_field(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

/// What ends a chunk's data.
pub(crate) const CHUNK_END: &[u8] = b"\r\n";
/// The last chunk and an empty trailer section: the end of a chunked body.
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// A chunk's CRLF, then the last chunk: a chunked body's last frame's tail.
pub(crate) const CHUNK_END_LAST: &[u8] = b"\r\n0\r\n\r\n";

/// A chunk-size line for `n` bytes (hex, as hyper writes it, and CRLF), written at the end of
/// `buf`.
pub(crate) fn chunk_size_line(mut n: usize, buf: &mut [u8; 18]) -> &[u8] {
    let mut at = buf.len() - 2;
    buf[at] = b'\r';
    buf[at + 1] = b'\n';
    loop {
        at -= 1;
        buf[at] = b"0123456789ABCDEF"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `data` fed in pieces cut at `cuts`, then the connection's end: data, trailers,
    /// and how it ended (with what was left after the body).
    fn decode(
        framing: Framing,
        data: &[u8],
        cuts: &[usize],
    ) -> (Vec<u8>, Option<HeaderMap>, String) {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut trailers = None;
        let mut at = cuts.iter().copied().chain([data.len()]);
        let mut from = 0;
        loop {
            match d.decode(&mut buf) {
                Ok(Decoded::Data(b)) => out.extend_from_slice(&b),
                Ok(Decoded::Trailers(t)) => trailers = Some(t),
                Ok(Decoded::Done) => {
                    buf.extend_from_slice(&data[from..]);
                    return (out, trailers, format!("end, left {buf:?}"));
                }
                Ok(Decoded::More) => match at.next() {
                    Some(to) => {
                        buf.extend_from_slice(&data[from..to]);
                        from = to;
                    }
                    None => {
                        if let Err(e) = d.eof() {
                            return (out, trailers, format!("error {e}"));
                        }
                    }
                },
                Err(e) => return (out, trailers, format!("error {e}")),
            }
        }
    }

    #[test]
    fn a_chunked_body_decodes_the_same_at_every_split_and_ends_with_its_last_data() {
        let body = b"5;name=\"v\"\r\nhello\r\n1A ; x\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 1\r\n\r\nNEXT";
        let whole = decode(Framing::Chunked, body, &[]);
        assert_eq!(whole.0, b"helloabcdefghijklmnopqrstuvwxyz");
        assert_eq!(whole.1.as_ref().and_then(|t| t.get("x-sum")).unwrap(), "1");
        assert_eq!(whole.2, "end, left b\"NEXT\"");
        for cut in 0..body.len() {
            assert_eq!(decode(Framing::Chunked, body, &[cut]), whole, "{cut}");
        }
        // The framing after the last data is read with it: the body is done at once.
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(&b"2\r\nab\r\n0\r\n\r\n"[..]);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"ab")))
        );
        assert!(d.is_done() && buf.is_empty());
        // Benign neighbour: the same body without its end is not done.
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(&b"2\r\nab\r\n0\r\n"[..]);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"ab")))
        );
        assert!(!d.is_done());
        assert_eq!(d.decode(&mut buf), Ok(Decoded::More));
    }

    #[test]
    fn a_framing_error_after_data_comes_after_that_data_and_stays() {
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(&b"2\r\nabXX"[..]);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"ab")))
        );
        assert!(d.decode(&mut buf).is_err());
        buf.extend_from_slice(b"\r\n0\r\n\r\n");
        assert!(d.decode(&mut buf).is_err(), "sticky");
        // Found by the h1_server fuzz target: the error is the same (and says why) however the
        // bytes are cut, read ahead after the data or found on the next call.
        let body = b"2\r\nabXX\r\n0\r\n\r\n";
        let whole = decode(Framing::Chunked, body, &[]);
        assert_eq!(whole.2, "error Invalid chunk body CR");
        for cut in 0..body.len() {
            assert_eq!(decode(Framing::Chunked, body, &[cut]), whole, "{cut}");
        }
    }

    #[test]
    fn broken_or_oversize_chunk_framing_is_an_error() {
        let long_ext = format!(
            "1;{}\r\na\r\n0\r\n\r\n",
            "e".repeat(EXTENSIONS_LIMIT as usize)
        );
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "t".repeat(TRAILER_LIMIT));
        let many_trailers = format!("0\r\n{}\r\n", "x: 1\r\n".repeat(MAX_HEADERS + 1));
        for bad in [
            "x\r\n".to_string(),
            "\r\n".into(),
            "1\nab".into(),
            "1\r\nab\r\n".into(),
            "1;a\nb\r\n".into(),
            "1 2\r\n".into(),
            "10000000000000000\r\n".into(),
            "3\r\nab".into(),
            "0\r\nnot a field\r\n\r\n".into(),
            long_ext,
            long_trailer,
            many_trailers,
        ] {
            let (data, _, end) = decode(Framing::Chunked, bad.as_bytes(), &[]);
            assert!(end.starts_with("error"), "{bad:?}: {end}");
            // Data before the break is passed on (as hyper does); nothing after it.
            assert!(data.len() <= 2, "{bad:?}");
        }
        // Benign neighbours: the limits are limits, not bans.
        let ext = format!(
            "1;{}\r\na\r\n0\r\n\r\n",
            "e".repeat(EXTENSIONS_LIMIT as usize - 2)
        );
        assert!(decode(Framing::Chunked, ext.as_bytes(), &[])
            .2
            .starts_with("end"));
        let fields = format!("0\r\n{}\r\n", "x: 1\r\n".repeat(MAX_HEADERS));
        let (_, t, end) = decode(Framing::Chunked, fields.as_bytes(), &[]);
        assert!(end.starts_with("end") && t.is_some_and(|t| t.len() == MAX_HEADERS));
    }

    #[test]
    fn a_length_body_stops_at_its_length_and_a_close_body_at_the_end() {
        assert_eq!(
            decode(Framing::Length(5), b"helloGET", &[2]),
            (b"hello".to_vec(), None, "end, left b\"GET\"".into())
        );
        assert!(decode(Framing::Length(5), b"hel", &[])
            .2
            .starts_with("error"));
        assert_eq!(
            decode(Framing::Close, b"until close", &[3]),
            (b"until close".to_vec(), None, "end, left b\"\"".into())
        );
        assert!(Decoder::new(Framing::Length(0)).is_done());
    }

    #[test]
    fn content_length_is_one_decimal_number_in_every_value() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(content_length(&[v("5")]), Some(5));
        assert_eq!(content_length(&[v("5"), v("5, 5")]), Some(5));
        for bad in [
            &[v("5"), v("6")][..],
            &[v("+5")],
            &[v("-5")],
            &[v("")],
            &[v("5,")],
            &[v("0x5")],
            &[v("18446744073709551616")],
        ] {
            assert_eq!(content_length(bad), None, "{bad:?}");
        }
        assert_eq!(content_length(&[]), None);
    }

    #[test]
    fn the_decoder_stays_as_small_as_the_answer_body_holding_it_needs() {
        assert!(std::mem::size_of::<Decoder>() <= 24);
    }

    #[test]
    fn chunk_size_lines_are_hex_and_crlf() {
        let mut b = [0u8; 18];
        assert_eq!(chunk_size_line(0, &mut b), b"0\r\n");
        assert_eq!(chunk_size_line(0x1a3, &mut b), b"1A3\r\n");
        assert_eq!(chunk_size_line(usize::MAX, &mut b), b"FFFFFFFFFFFFFFFF\r\n");
        assert!(has_token(b"keep-alive, Close", b"close") && !has_token(b"closed", b"close"));
        assert!(ends_in_chunked(b"gzip, Chunked") && !ends_in_chunked(b"chunked, gzip"));
        // As hyper reads them: a value that is not visible ASCII names nothing.
        assert!(!has_token(b"close, \xe9", b"close") && !ends_in_chunked(b"\xe9, chunked"));
    }
}
