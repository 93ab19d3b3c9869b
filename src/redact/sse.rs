//! Server-sent events whose text arrives as deltas: a model that streams a held secret token by
//! token sends it in pieces, one per event, none of which the byte redactor can recognise. Here
//! the deltas of one text are joined and scanned as a stream of their own, and a secret found
//! there is redacted in the events that carry its pieces: the first piece becomes
//! `[REDACTED:<label>]`, the later ones become empty.
//!
//! Delta texts (after JSON unescaping), each joined per text it belongs to:
//! - OpenAI Chat Completions: `choices[i].delta.content` and
//!   `choices[i].delta.tool_calls[j].function.arguments`;
//! - OpenAI Responses: `delta` of every `response.*.delta` event (output text, reasoning,
//!   function-call arguments), per output and content index;
//! - Anthropic Messages: `content_block_delta`'s `delta.text`, `delta.partial_json`,
//!   `delta.thinking`, per block index.
//!
//! Events go out whole and in order, each as soon as it is final: an event is held back only
//! while its delta text could still be the start of a held secret (or of a detector's match), and
//! events behind a held one wait with it. An event is at most [`MAX_EVENT`] bytes here; a longer
//! one goes out in pieces, unjoined (the byte redactor still covers it). At most
//! [`MAX_HELD_EVENTS`] events wait; past that, the joined texts are scanned as if they had ended,
//! so a secret whose first pieces came before the cut and its rest after is redacted only in the
//! part each side holds (see README, residuals).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use serde_json::Value;

use super::engine::Label;
use super::Redactor;

/// The longest event assembled whole; the longest delta events of the three APIs are far
/// smaller, while their final events (the whole response again) can be larger.
pub(crate) const MAX_EVENT: usize = 64 * 1024;
/// The most events held back behind an unfinished delta text.
pub(crate) const MAX_HELD_EVENTS: usize = 256;

pub(crate) struct Events {
    redactor: Arc<Redactor>,
    /// Bytes of the event still arriving, and how far it was searched for its end.
    partial: Vec<u8>,
    searched: usize,
    held: VecDeque<Held>,
    texts: Vec<Text>,
}

struct Held {
    raw: Vec<u8>,
    /// Present when the event carries deltas: its parsed data and where it sits in `raw`.
    data: Option<(Value, Range<usize>)>,
    deltas: Vec<Delta>,
}

struct Delta {
    text: usize,
    pointer: String,
    start: u64,
    end: u64,
}

/// One joined delta text and the stream scan over it.
struct Text {
    key: String,
    pending: Vec<u8>,
    /// Offset in the joined text of `pending[0]`: everything before it is final.
    base: u64,
    /// The two bytes before `pending[0]`, nearest first (detectors' word boundary).
    prev: [Option<u8>; 2],
    /// Final findings, in joined-text offsets, not yet applied to every event they touch.
    spans: Vec<(u64, u64, Label)>,
}

impl Events {
    pub(crate) fn new(redactor: Arc<Redactor>) -> Self {
        Events {
            redactor,
            partial: Vec::new(),
            searched: 0,
            held: VecDeque::new(),
            texts: Vec::new(),
        }
    }

    /// Takes redacted bytes of the stream; returns the events that are final now.
    pub(crate) fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.partial.extend_from_slice(bytes);
        // Events are cut from the front; the consumed part is dropped once, at the end.
        let mut start = 0;
        while let Some(end) = self.event_end(start) {
            let raw = self.partial[start..end].to_vec();
            start = end;
            self.searched = end;
            self.event(raw, out);
        }
        self.partial.drain(..start);
        self.searched = self.searched.saturating_sub(start);
        if self.partial.len() > MAX_EVENT {
            self.flush_texts();
            self.drain(out);
            out.append(&mut self.held_raw());
            out.append(&mut self.partial);
            self.searched = 0;
        }
    }

    /// End of stream: the rest, as one last event, and every text as ended.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.partial.is_empty() {
            let raw = std::mem::take(&mut self.partial);
            self.event(raw, out);
        }
        self.flush_texts();
        self.drain(out);
    }

    /// The end (exclusive) of the first complete event from `start`: after a blank line
    /// (`\n\n`, `\n\r\n`).
    fn event_end(&mut self, start: usize) -> Option<usize> {
        let from = self.searched.max(start);
        let found = memchr::memchr_iter(b'\n', &self.partial[from..])
            .map(|i| from + i)
            .find_map(|i| match self.partial.get(i + 1..) {
                Some([b'\n', ..]) => Some(i + 2),
                Some([b'\r', b'\n', ..]) => Some(i + 3),
                _ => None,
            });
        if found.is_none() {
            // A `\n` or `\n\r` at the very end may still become a boundary.
            self.searched = self.partial.len().saturating_sub(2).max(start);
        }
        found
    }

    fn event(&mut self, raw: Vec<u8>, out: &mut Vec<u8>) {
        let mut held = Held {
            raw,
            data: None,
            deltas: Vec::new(),
        };
        // Only events that name a delta are parsed; the rest pass as they are.
        let range = data_line(&held.raw)
            .filter(|r| memchr::memmem::find(&held.raw[r.clone()], b"\"delta\"").is_some());
        if let Some(range) = range {
            if let Ok(value) = serde_json::from_slice::<Value>(&held.raw[range.clone()]) {
                for (key, pointer) in delta_fields(&value) {
                    let Some(text) = value.pointer(&pointer).and_then(Value::as_str) else {
                        continue;
                    };
                    let t = self.text(key);
                    let start = self.texts[t].base + self.texts[t].pending.len() as u64;
                    self.texts[t].pending.extend_from_slice(text.as_bytes());
                    held.deltas.push(Delta {
                        text: t,
                        pointer,
                        start,
                        end: start + text.len() as u64,
                    });
                    self.scan(t, false);
                }
                if !held.deltas.is_empty() {
                    held.data = Some((value, range));
                }
            }
        }
        self.held.push_back(held);
        if self.held.len() > MAX_HELD_EVENTS {
            self.flush_texts();
        }
        self.drain(out);
    }

    fn text(&mut self, key: String) -> usize {
        if let Some(i) = self.texts.iter().position(|t| t.key == key) {
            return i;
        }
        self.texts.push(Text {
            key,
            pending: Vec::new(),
            base: 0,
            prev: [None; 2],
            spans: Vec::new(),
        });
        self.texts.len() - 1
    }

    /// Scans text `t`'s pending bytes; what is final moves into `spans`.
    fn scan(&mut self, t: usize, eof: bool) {
        let scan = {
            let text = &self.texts[t];
            self.redactor.text.scan(&text.pending, text.prev, eof)
        };
        let text = &mut self.texts[t];
        for s in &scan.spans {
            text.spans.push((
                text.base + s.start as u64,
                text.base + s.end as u64,
                s.label,
            ));
        }
        if scan.safe > 0 {
            text.prev = [
                Some(text.pending[scan.safe - 1]),
                scan.safe
                    .checked_sub(2)
                    .map(|i| text.pending[i])
                    .or(text.prev[0]),
            ];
            text.pending.drain(..scan.safe);
            text.base += scan.safe as u64;
        }
    }

    /// Every text as ended: all of it becomes final.
    fn flush_texts(&mut self) {
        for t in 0..self.texts.len() {
            self.scan(t, true);
        }
    }

    /// Emits held events from the front while they are final.
    fn drain(&mut self, out: &mut Vec<u8>) {
        while let Some(front) = self.held.front() {
            let is_final = front
                .deltas
                .iter()
                .all(|d| d.end <= self.texts[d.text].base);
            if !is_final {
                return;
            }
            if let Some(held) = self.held.pop_front() {
                let bytes = self.render(held);
                out.extend_from_slice(&bytes);
            }
        }
    }

    /// The held events as they are, for a forced flush after everything final was drained.
    fn held_raw(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(held) = self.held.pop_front() {
            out.extend_from_slice(&self.render(held));
        }
        out
    }

    /// The event with the findings in its deltas applied; its own bytes when none touch it.
    fn render(&mut self, held: Held) -> Vec<u8> {
        let Held { raw, data, deltas } = held;
        let Some((mut value, range)) = data else {
            return raw;
        };
        let mut changed = false;
        for d in &deltas {
            let text = &self.texts[d.text];
            let touching: Vec<(u64, u64, Label)> = text
                .spans
                .iter()
                .filter(|(a, b, _)| *a < d.end && *b > d.start)
                .copied()
                .collect();
            if touching.is_empty() {
                continue;
            }
            let Some(slot) = value.pointer_mut(&d.pointer) else {
                continue;
            };
            let Some(piece) = slot.as_str() else {
                continue;
            };
            let piece = piece.as_bytes();
            let mut new = Vec::with_capacity(piece.len());
            let mut at = 0usize;
            for (a, b, label) in touching {
                let from = ((a.max(d.start) - d.start) as usize).min(piece.len());
                let to = ((b.min(d.end) - d.start) as usize).min(piece.len());
                new.extend_from_slice(&piece[at.min(from)..from]);
                if a >= d.start {
                    new.extend_from_slice(b"[REDACTED:");
                    new.extend_from_slice(self.redactor.text.label(label).as_bytes());
                    new.push(b']');
                }
                at = to;
            }
            new.extend_from_slice(&piece[at.min(piece.len())..]);
            *slot = Value::String(String::from_utf8_lossy(&new).into_owned());
            changed = true;
        }
        for d in &deltas {
            // Later deltas of this text start at or after `d.end`, so these spans are done.
            self.texts[d.text].spans.retain(|(_, b, _)| *b > d.end);
        }
        if !changed {
            return raw;
        }
        let mut out = Vec::with_capacity(raw.len());
        out.extend_from_slice(&raw[..range.start]);
        out.extend_from_slice(value.to_string().as_bytes());
        out.extend_from_slice(&raw[range.end..]);
        out
    }
}

/// The value of the event's only `data:` field, when it looks like a JSON object.
fn data_line(raw: &[u8]) -> Option<Range<usize>> {
    let mut found = None;
    let mut at = 0;
    for line in raw.split(|b| *b == b'\n') {
        let start = at;
        at += line.len() + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(rest) = line.strip_prefix(b"data:") else {
            continue;
        };
        if found.is_some() {
            // Several data lines make one value joined by newlines: not an API delta.
            return None;
        }
        let skip = usize::from(rest.first() == Some(&b' '));
        found = Some(start + 5 + skip..start + line.len());
    }
    found.filter(|r| raw.get(r.start) == Some(&b'{'))
}

/// The delta strings of one event: (key of the text they belong to, JSON pointer).
fn delta_fields(v: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        for (i, choice) in choices.iter().enumerate() {
            let index = choice
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(i as u64);
            let Some(delta) = choice.get("delta") else {
                continue;
            };
            if delta.get("content").is_some_and(Value::is_string) {
                out.push((
                    format!("chat/{index}"),
                    format!("/choices/{i}/delta/content"),
                ));
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for (j, call) in calls.iter().enumerate() {
                    let ti = call
                        .get("index")
                        .and_then(Value::as_u64)
                        .unwrap_or(j as u64);
                    if call
                        .pointer("/function/arguments")
                        .is_some_and(Value::is_string)
                    {
                        out.push((
                            format!("chat/{index}/tool/{ti}"),
                            format!("/choices/{i}/delta/tool_calls/{j}/function/arguments"),
                        ));
                    }
                }
            }
        }
    } else if kind.starts_with("response.") && kind.ends_with(".delta") {
        if v.get("delta").is_some_and(Value::is_string) {
            let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            out.push((
                format!(
                    "{kind}/{}/{}/{}",
                    n("output_index"),
                    n("content_index"),
                    n("summary_index")
                ),
                "/delta".to_string(),
            ));
        }
    } else if kind == "content_block_delta" {
        let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
        for field in ["text", "partial_json", "thinking"] {
            if v.get("delta")
                .and_then(|d| d.get(field))
                .is_some_and(Value::is_string)
            {
                out.push((format!("block/{index}/{field}"), format!("/delta/{field}")));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::super::Redactor;
    use super::*;

    /// Starts like no word of the filler text, so ordinary deltas are never held.
    const HELD: &str = "Q7xSseSecret/0123456789+abcdefZ";

    fn sse_headers() -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h
    }

    fn redactor() -> Arc<Redactor> {
        Arc::new(Redactor::builder().known("k#s", HELD.as_bytes()).build())
    }

    fn chat(delta: &str) -> String {
        let v = json!({"id": "c1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": null}]});
        format!("data: {v}\n\n")
    }

    fn responses(delta: &str) -> String {
        let v = json!({"type": "response.output_text.delta", "sequence_number": 3,
            "item_id": "m1", "output_index": 0, "content_index": 0, "delta": delta});
        format!("event: response.output_text.delta\ndata: {v}\n\n")
    }

    fn anthropic(delta: &str) -> String {
        let v = json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": delta}});
        format!("event: content_block_delta\r\ndata: {v}\r\n\r\n")
    }

    fn tool_args(delta: &str) -> String {
        let v = json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": delta}});
        format!("event: content_block_delta\ndata: {v}\n\n")
    }

    /// The deltas of an SSE body joined, per format, as a client would.
    fn joined(body: &[u8]) -> String {
        let text = String::from_utf8_lossy(body);
        let mut out = String::new();
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            for (_, pointer) in delta_fields(&v) {
                out.push_str(
                    v.pointer(&pointer)
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                );
            }
        }
        out
    }

    fn pieces(s: &str, n: usize) -> Vec<String> {
        s.chars()
            .collect::<Vec<_>>()
            .chunks(n)
            .map(|c| c.iter().collect())
            .collect()
    }

    #[test]
    fn secret_streamed_token_by_token_is_redacted_in_every_format() {
        let formats: [fn(&str) -> String; 4] = [chat, responses, anthropic, tool_args];
        for event in formats {
            let mut s = redactor().response_stream(&sse_headers());
            let mut out = Vec::new();
            let first = event("The key is ");
            // Nothing in it can start the secret: it goes out at once.
            assert_eq!(&s.push(first.as_bytes())[..], first.as_bytes());
            for piece in pieces(HELD, 3) {
                out.extend_from_slice(&s.push(event(&piece).as_bytes()));
            }
            let last = event(", use it.");
            out.extend_from_slice(&s.push(last.as_bytes()));
            out.extend_from_slice(&s.finish());
            assert_eq!(joined(&out), "[REDACTED:k#s], use it.");
            assert!(!String::from_utf8_lossy(&out).contains(&HELD[..4]));
        }
    }

    #[test]
    fn only_events_that_could_start_the_secret_are_held() {
        let mut s = redactor().response_stream(&sse_headers());
        let plain = chat("Hello");
        assert_eq!(&s.push(plain.as_bytes())[..], plain.as_bytes());
        // "Q7" may begin the secret: held, and the ping behind it waits with it.
        assert!(s.push(chat(" Q7").as_bytes()).is_empty());
        assert!(s.push(b": ping\n\n").is_empty());
        // "Q7" followed by something else: everything held goes out unchanged, in order.
        let out = s.push(chat("0 apples").as_bytes());
        let want = format!("{}: ping\n\n{}", chat(" Q7"), chat("0 apples"));
        assert_eq!(String::from_utf8_lossy(&out), want);
        assert!(s.finish().is_empty());
    }

    #[test]
    fn texts_of_different_choices_and_blocks_are_not_joined() {
        let mut s = redactor().response_stream(&sse_headers());
        let (a, b) = HELD.split_at(10);
        let one = json!({"choices": [{"index": 0, "delta": {"content": a}}]});
        let two = json!({"choices": [{"index": 1, "delta": {"content": b}}]});
        let input = format!("data: {one}\n\ndata: {two}\n\n");
        let mut out = s.push(input.as_bytes()).to_vec();
        out.extend_from_slice(&s.finish());
        assert_eq!(String::from_utf8_lossy(&out), input);
    }

    #[test]
    fn a_non_sse_body_is_not_parsed_as_events() {
        let r = redactor();
        let input = chat(&HELD[..10]) + &chat(&HELD[10..]);
        let mut s = Arc::clone(&r).response_stream(&http::HeaderMap::new());
        let mut out = s.push(input.as_bytes()).to_vec();
        out.extend_from_slice(&s.finish());
        assert_eq!(out, input.as_bytes());
    }

    #[test]
    fn an_oversized_event_goes_out_without_waiting_for_its_end() {
        let mut s = redactor().response_stream(&sse_headers());
        let big = format!("data: {}", "x".repeat(MAX_EVENT + 10));
        let out = s.push(big.as_bytes());
        assert_eq!(out.len(), big.len());
        let rest = chat("after");
        let mut out = s.push(format!("\n\n{rest}").as_bytes()).to_vec();
        out.extend_from_slice(&s.finish());
        assert_eq!(String::from_utf8_lossy(&out), format!("\n\n{rest}"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// However the events are cut into chunks, the output is the same as for the body in
        /// one piece, and no joined text holds the secret.
        #[test]
        fn sse_output_is_the_same_for_any_chunking_and_never_joins_to_the_secret(
            sizes in proptest::collection::vec(1usize..8, 1..12),
            format in 0usize..4,
            cuts in proptest::collection::vec(0usize..4096, 0..16),
            prefix in "[ a-z]{0,6}",
        ) {
            let event: fn(&str) -> String = [chat, responses, anthropic, tool_args][format];
            let mut body = event(&prefix);
            let chars: Vec<char> = HELD.chars().collect();
            let mut at = 0;
            for n in sizes.iter().cycle() {
                if at >= chars.len() {
                    break;
                }
                let end = (at + n).min(chars.len());
                body.push_str(&event(&chars[at..end].iter().collect::<String>()));
                at = end;
            }
            body.push_str(&event(" done"));
            body.push_str("data: [DONE]\n\n");
            let r = redactor();
            let mut whole = Arc::clone(&r).response_stream(&sse_headers());
            let mut expected = whole.push(body.as_bytes()).to_vec();
            expected.extend_from_slice(&whole.finish());
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
            cuts.sort_unstable();
            let mut s = Arc::clone(&r).response_stream(&sse_headers());
            let mut out = Vec::new();
            let mut from = 0;
            for c in cuts.into_iter().chain([body.len()]) {
                out.extend_from_slice(&s.push(&body.as_bytes()[from..c]));
                from = c;
            }
            out.extend_from_slice(&s.finish());
            prop_assert_eq!(&out, &expected);
            let text = joined(&out);
            prop_assert!(!text.contains(HELD), "{}", text);
            prop_assert_eq!(text, format!("{prefix}[REDACTED:k#s] done"));
        }
    }
}
