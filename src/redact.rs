//! Stage `redact`: removes every held secret, and credentials that look like one, from bytes that
//! leave keygate. One engine for every surface (streamed response bodies, response headers,
//! `keygate redact`, the agent-tool hooks, the request exfiltration scan), so a secret is
//! replaced the same way everywhere: `[REDACTED:<key id or detector name>]`.
//!
//! What is looked for:
//! - *known values*: each held secret of at least [`MIN_KNOWN_LEN`] bytes, raw and in the
//!   encodings listed in `known.rs` (base64 at any alignment, percent-encoding, JSON escaping,
//!   hex), with one leftmost-longest Aho-Corasick automaton, run also over a JSON- and
//!   HTML-unescaped view of the buffer when it holds `\/`, `\u…` or `&…;` (`json_view.rs`), so
//!   every escape spelling matches;
//! - *detectors* (optional): credential formats keygate does not hold, named in
//!   [`detector_names`]; see `detectors.rs`.
//!
//! Streams give the same bytes as whole buffers: for any input and any chunking, the
//! concatenated output of [`StreamRedactor`] equals [`Redactor::redact`] of the whole input.
//! The stream holds back only bytes that could still change a verdict (see `engine.rs`):
//! at most the longest known spelling minus one, or, after a detector anchor, up to that
//! detector's window until a byte that ends it arrives. Token detectors end at the first
//! byte outside `[A-Za-z0-9_.+/=-]` (window ≤ 320 bytes, JWTs ≤ 10 KiB); keyword detectors
//! (`password = …`, `Authorization: …`) at the end of the line (≤ 210 bytes and ≤ 4 KiB);
//! a PEM private key block at its END line or [`HOLD_BACK_MAX`], after which the held part is
//! redacted whole.

pub mod body;
mod buckets;
pub mod cli;
mod detectors;
mod engine;
mod headers;
mod json_view;
mod known;
mod many;
mod search;
mod sse;

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;

pub use detectors::{Class, DetectorSet};
use engine::{Engine, Span};
pub use headers::{response_head, response_headers};
/// The percent-encode set keygate uses for query credentials; the redactor knows its spelling.
pub use known::COMPONENT as QUERY_COMPONENT;
pub use known::MIN_KNOWN_LEN;

/// The most a stream holds back because of a detector: a private key block waiting for its END
/// line. Known values add at most their longest spelling minus one.
pub const HOLD_BACK_MAX: usize = detectors::PEM_MAX;

/// An immutable, shareable redaction engine built from the values keygate holds.
///
/// Its `Debug` names what it looks for (key ids, whether detectors run), never the patterns: the
/// patterns are the secrets and their encodings.
pub struct Redactor {
    engine: Engine,
    /// For decoded text: the joined deltas of SSE events (`sse.rs`).
    text: Engine,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("known", &self.engine.labels())
            .field("detectors", &self.engine.has_detectors())
            .finish()
    }
}

/// Collects the held secrets and options of a [`Redactor`].
#[derive(Default)]
pub struct RedactorBuilder {
    known: Vec<(String, Vec<u8>)>,
    detectors: Option<DetectorSet>,
}

/// Where something would be redacted: byte offset, length and the label (key id or detector
/// name). Never the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Byte offset of the match in the scanned input.
    pub offset: usize,
    /// Length of the match in bytes.
    pub len: usize,
    /// The key id or detector name that matched.
    pub label: String,
}

impl RedactorBuilder {
    /// A held secret, labelled by its key id (e.g. `openai#3f2a9c1d`). Values shorter than
    /// [`MIN_KNOWN_LEN`] are ignored.
    pub fn known(mut self, label: &str, value: &[u8]) -> Self {
        if value.len() >= MIN_KNOWN_LEN {
            self.known.push((label.to_string(), value.to_vec()));
        }
        self
    }

    /// Turns the credential-format detectors on or off.
    pub fn detectors(mut self, on: bool) -> Self {
        self.detectors = on.then_some(DetectorSet::ALL);
        self
    }

    /// Runs only these detectors (the request scan splits strong from generic ones).
    pub fn detector_set(mut self, set: DetectorSet) -> Self {
        self.detectors = Some(set);
        self
    }

    /// Compiles the redactor; the known values and detectors are fixed from here on.
    pub fn build(self) -> Redactor {
        let set = self.detectors.unwrap_or(DetectorSet::NONE);
        Redactor {
            text: Engine::decoded(self.known.clone(), set),
            engine: Engine::new(self.known, set),
        }
    }
}

impl Redactor {
    /// A builder with no known values and no detectors.
    pub fn builder() -> RedactorBuilder {
        RedactorBuilder::default()
    }

    /// The same held values with other detectors. The known-value searchers are shared, not
    /// rebuilt: the response redactor and the request scanner hold the same values, so a
    /// rotation builds them once.
    pub fn with_detector_set(&self, set: DetectorSet) -> Redactor {
        Redactor {
            engine: self.engine.with_detectors(set),
            text: self.text.with_detectors(set),
        }
    }

    /// Nothing to look for: callers may skip the work.
    pub fn is_empty(&self) -> bool {
        self.engine.is_empty()
    }

    /// What `redact` would replace, in order, without the values.
    pub fn find(&self, input: &[u8]) -> Vec<Finding> {
        if self.is_empty() {
            return Vec::new();
        }
        self.engine
            .scan(input, [None; 2], true)
            .spans
            .iter()
            .map(|s| Finding {
                offset: s.start,
                len: s.end - s.start,
                label: self.engine.label(s.label).to_string(),
            })
            .collect()
    }

    /// [`Redactor::find`], and apart from it what the detectors in `extra` find, in one pass
    /// (the request scan: strong findings from this redactor, generic ones from `extra`).
    pub fn find_with(&self, input: &[u8], extra: DetectorSet) -> (Vec<Finding>, Vec<Finding>) {
        let (own, other) = self.engine.find_with(input, extra);
        if own.is_empty() && other.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let findings = |spans: Vec<Span>| -> Vec<Finding> {
            spans
                .iter()
                .map(|s| Finding {
                    offset: s.start,
                    len: s.end - s.start,
                    label: self.engine.label(s.label).to_string(),
                })
                .collect()
        };
        (findings(own), findings(other))
    }

    /// `input` with every finding replaced by `[REDACTED:<label>]`; borrowed when nothing
    /// matched.
    pub fn redact<'a>(&self, input: &'a [u8]) -> Cow<'a, [u8]> {
        if self.is_empty() {
            return Cow::Borrowed(input);
        }
        let spans = self.engine.scan(input, [None; 2], true).spans;
        if spans.is_empty() {
            return Cow::Borrowed(input);
        }
        let mut out = Vec::with_capacity(input.len());
        self.render(input, &spans, &mut out);
        Cow::Owned(out)
    }

    /// A redactor for one body that arrives in chunks.
    pub fn stream(self: Arc<Self>) -> StreamRedactor {
        StreamRedactor {
            scanner: Scanner::new(self),
            sse: None,
        }
    }

    /// Whether `name` (a header name) holds a held secret in any case or spelling, or anything
    /// a detector finds.
    pub fn holds_in_name(&self, name: &[u8]) -> bool {
        !self.is_empty() && (self.engine.holds_ignoring_case(name) || !self.find(name).is_empty())
    }

    /// A redactor for a response body with these headers: an SSE stream (`text/event-stream`)
    /// also has the text deltas of its events joined and scanned (see `sse.rs`).
    pub fn response_stream(self: Arc<Self>, headers: &http::HeaderMap) -> StreamRedactor {
        let is_sse = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"));
        let mut s = Arc::clone(&self).stream();
        if is_sse {
            s.sse = Some(sse::Events::new(self));
        }
        s
    }

    /// The most a stream of this redactor holds back, in bytes.
    pub fn hold_back_bound(&self) -> usize {
        HOLD_BACK_MAX.max(self.engine.longest_known().saturating_sub(1))
    }

    fn render(&self, input: &[u8], spans: &[Span], out: &mut Vec<u8>) {
        // Sized once, exactly: a stream's output can be longer than its chunk (held bytes
        // before it), and a replacement longer or shorter than what it replaces.
        let (added, removed) = spans.iter().fold((0, 0), |(a, r), s| {
            let label = self.engine.label(s.label).len();
            (a + b"[REDACTED:]".len() + label, r + (s.end - s.start))
        });
        out.reserve((input.len() + added).saturating_sub(removed));
        let mut at = 0;
        for s in spans {
            out.extend_from_slice(&input[at..s.start]);
            out.extend_from_slice(b"[REDACTED:");
            out.extend_from_slice(self.engine.label(s.label).as_bytes());
            out.push(b']');
            at = s.end;
        }
        out.extend_from_slice(&input[at..]);
    }
}

/// The detector names, which are also their redaction labels.
pub fn detector_names() -> Vec<&'static str> {
    detectors::names()
}

/// Redacts a body that arrives in chunks, holding back only what could still change.
pub struct StreamRedactor {
    scanner: Scanner,
    /// For an SSE response: joins the text deltas of its events (after byte redaction).
    sse: Option<sse::Events>,
}

impl StreamRedactor {
    /// The bytes that are safe to emit now.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        let engine = Arc::clone(&self.scanner.engine);
        let mut out = self
            .scanner
            .push_owned(chunk, |bytes, spans, out| engine.render(bytes, spans, out));
        if let Some(sse) = &mut self.sse {
            let mut events = Vec::with_capacity(out.len());
            sse.push(&out, &mut events);
            out = events;
        }
        Bytes::from(out)
    }

    /// [`StreamRedactor::push`] of a shared buffer: when nothing is held from earlier chunks
    /// and nothing in this one is replaced, the bytes to emit are a slice of `chunk`, not a
    /// copy (the usual case for a response body).
    pub fn push_bytes(&mut self, chunk: &Bytes) -> Bytes {
        if self.sse.is_some() || !self.scanner.pending.is_empty() {
            return self.push(chunk);
        }
        self.push_slice(chunk, false)
    }

    /// [`StreamRedactor::push_bytes`] of a body's last chunk (its source says no more will
    /// come): scanned as the end of the stream, so nothing is held back for a next chunk and
    /// [`StreamRedactor::finish`] has nothing left to emit. What it emits is what
    /// `push_bytes` and `finish` would emit together (the stream's output is its input's
    /// `redact`, however it is cut), in one frame; a length-delimited answer arrives whole in
    /// one chunk, and its last bytes are then not rescanned at its end.
    pub fn push_last(&mut self, chunk: &Bytes) -> Bytes {
        if self.sse.is_some() || !self.scanner.pending.is_empty() {
            // Held bytes or SSE events: the ordinary way, with `finish` to follow.
            return self.push(chunk);
        }
        self.push_slice(chunk, true)
    }

    /// `push_bytes` with nothing held and no SSE events: `chunk` scanned in place (`eof`: as
    /// the stream's end).
    fn push_slice(&mut self, chunk: &Bytes, eof: bool) -> Bytes {
        let engine = Arc::clone(&self.scanner.engine);
        // With nothing held, what the scanner emits is a prefix of `chunk`, in order: until
        // the first span, `plain` bytes of it unchanged.
        let mut plain = 0;
        let mut out: Option<Vec<u8>> = None;
        self.scanner
            .push(chunk, eof, |bytes, spans| match &mut out {
                None if spans.is_empty() => plain += bytes.len(),
                None => {
                    let mut v = Vec::with_capacity(chunk.len());
                    v.extend_from_slice(&chunk[..plain]);
                    engine.render(bytes, spans, &mut v);
                    out = Some(v);
                }
                Some(v) => engine.render(bytes, spans, v),
            });
        match out {
            None => chunk.slice(..plain),
            Some(v) => Bytes::from(v),
        }
    }

    /// The rest, at end of stream.
    pub fn finish(mut self) -> Bytes {
        if self.sse.is_none() && self.scanner.pending.is_empty() {
            // Nothing held: the final scan would be of no bytes.
            return Bytes::new();
        }
        let mut out = Vec::new();
        let engine = Arc::clone(&self.scanner.engine);
        self.scanner.push(&[], true, |bytes, spans| {
            engine.render(bytes, spans, &mut out)
        });
        if let Some(sse) = &mut self.sse {
            let mut events = Vec::with_capacity(out.len());
            sse.push(&out, &mut events);
            sse.finish(&mut events);
            out = events;
        }
        Bytes::from(out)
    }
}

/// Chunked scanning shared by [`StreamRedactor`] and `keygate redact --check`: hands each
/// finalized run of bytes, with its spans, to a callback.
pub(crate) struct Scanner {
    engine: Arc<Redactor>,
    pending: Vec<u8>,
    /// The two bytes before `pending[0]` (nearest first), for detectors' word-boundary check.
    prev: [Option<u8>; 2],
    /// What the last scan's pending verdict waits for; until it arrives a rescan would emit
    /// nothing, so chunks are only appended (a held window is scanned once, not per chunk).
    wake: Option<detectors::Wake>,
    /// Bytes appended to `pending` since it was last scanned.
    since: usize,
}

/// Held bytes from which a rescan waits for an eighth as many new ones: dense anchors whose
/// windows overlap can hold a long run back, and rescanning it per small chunk would be
/// quadratic. Only delays output that is held anyway; never changes it.
const BATCH_FROM: usize = 4096;

impl Scanner {
    pub(crate) fn new(engine: Arc<Redactor>) -> Self {
        Scanner {
            engine,
            pending: Vec::new(),
            prev: [None; 2],
            wake: None,
            since: 0,
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8], eof: bool, mut emit: impl FnMut(&[u8], &[Span])) {
        if self.engine.is_empty() {
            emit(&self.pending, &[]);
            self.pending.clear();
            emit(chunk, &[]);
            return;
        }
        if self.held_whole(chunk, eof) {
            return;
        }
        // The common case, nothing held back: scan the chunk in place and copy only its tail.
        let held = !self.pending.is_empty();
        if held {
            self.pending.extend_from_slice(chunk);
        }
        let buf: &[u8] = if held { &self.pending } else { chunk };
        let scan = self.engine.engine.scan(buf, self.prev, eof);
        advance(&mut self.prev, &mut self.wake, buf, &scan);
        emit(&buf[..scan.safe], &scan.spans);
        if held {
            self.pending.drain(..scan.safe);
        } else {
            self.pending.extend_from_slice(&chunk[scan.safe..]);
        }
    }

    /// [`Scanner::push`] (not at the end) into a buffer of its own, for output that must be
    /// owned anyway: when bytes are held from earlier chunks they and `chunk` are joined once,
    /// and that joined buffer, cut at `safe`, is the output when nothing in it is replaced (a
    /// copy fewer than joining, then rendering).
    pub(crate) fn push_owned(
        &mut self,
        chunk: &[u8],
        render: impl FnOnce(&[u8], &[Span], &mut Vec<u8>),
    ) -> Vec<u8> {
        if self.engine.is_empty() {
            let mut out = std::mem::take(&mut self.pending);
            out.extend_from_slice(chunk);
            return out;
        }
        if self.held_whole(chunk, false) {
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.pending.is_empty() {
            let scan = self.engine.engine.scan(chunk, self.prev, false);
            advance(&mut self.prev, &mut self.wake, chunk, &scan);
            render(&chunk[..scan.safe], &scan.spans, &mut out);
            self.pending.extend_from_slice(&chunk[scan.safe..]);
            return out;
        }
        self.pending.extend_from_slice(chunk);
        let scan = self.engine.engine.scan(&self.pending, self.prev, false);
        advance(&mut self.prev, &mut self.wake, &self.pending, &scan);
        // Handing over the joined buffer pays when most of it leaves (a pending verdict can
        // hold nearly all of it back: then only the emitted part is copied).
        if scan.spans.is_empty() && scan.safe >= self.pending.len() / 2 {
            // Room for a next chunk as large as this one, so that joining it does not grow.
            let mut rest = Vec::with_capacity(self.pending.len() - scan.safe + chunk.len());
            rest.extend_from_slice(&self.pending[scan.safe..]);
            out = std::mem::replace(&mut self.pending, rest);
            out.truncate(scan.safe);
        } else {
            render(&self.pending[..scan.safe], &scan.spans, &mut out);
            self.pending.drain(..scan.safe);
        }
        out
    }

    /// Appends `chunk` without a scan when a rescan could not emit anything yet (see `wake`
    /// and `BATCH_FROM`); true if it did.
    fn held_whole(&mut self, chunk: &[u8], eof: bool) -> bool {
        if !eof && !self.pending.is_empty() {
            let asleep = self
                .wake
                .is_some_and(|w| !w.woken_by(chunk) && self.pending.len() + chunk.len() < w.bound);
            let batching = self.pending.len() >= BATCH_FROM
                && (self.since + chunk.len()) * 8 < self.pending.len();
            if asleep || batching {
                self.pending.extend_from_slice(chunk);
                self.since += chunk.len();
                return true;
            }
        }
        self.since = 0;
        false
    }
}

/// A scan of `buf` (the held bytes and the new ones) emits `buf[..scan.safe]`: what the next
/// scan needs to know of what went before.
fn advance(
    prev: &mut [Option<u8>; 2],
    wake: &mut Option<detectors::Wake>,
    buf: &[u8],
    scan: &engine::Scan,
) {
    // The pending anchor is where the held bytes will start: its bound becomes relative.
    *wake = scan.wake.map(|w| detectors::Wake {
        on: w.on,
        bound: w.bound.saturating_sub(scan.safe),
    });
    if scan.safe > 0 {
        *prev = [
            Some(buf[scan.safe - 1]),
            scan.safe.checked_sub(2).map(|i| buf[i]).or(prev[0]),
        ];
    }
}

#[cfg(test)]
mod tests;
