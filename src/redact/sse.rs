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

use std::borrow::Cow;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::{Arc, LazyLock};

use memchr::memmem::Finder;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::engine::Label;
use super::Redactor;

/// The longest event assembled whole; the longest delta events of the three APIs are far
/// smaller, while their final events (the whole response again) can be larger.
pub(crate) const MAX_EVENT: usize = 64 * 1024;
/// The most events held back behind an unfinished delta text.
pub(crate) const MAX_HELD_EVENTS: usize = 256;

/// Built once: `memmem::find` would build its searcher again for every event.
static DELTA: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"delta\""));

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
    /// Present when the event carries deltas: where its JSON data sits in `raw`. It is parsed
    /// into a tree again only when a finding changes one of its deltas.
    data: Option<Range<usize>>,
    deltas: Vec<Delta>,
}

struct Delta {
    text: usize,
    slot: Slot,
    start: u64,
    end: u64,
}

/// One joined delta text and the stream scan over it.
struct Text {
    key: Key<'static>,
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
        let range = data_line(&held.raw).filter(|r| DELTA.find(&held.raw[r.clone()]).is_some());
        if let Some(range) = range {
            for (key, slot, text) in deltas(&held.raw[range.clone()]) {
                let t = self.text(key);
                let start = self.texts[t].base + self.texts[t].pending.len() as u64;
                self.texts[t].pending.extend_from_slice(text.as_bytes());
                held.deltas.push(Delta {
                    text: t,
                    slot,
                    start,
                    end: start + text.len() as u64,
                });
                self.scan(t, false);
            }
            if !held.deltas.is_empty() {
                held.data = Some(range);
            }
        }
        self.held.push_back(held);
        if self.held.len() > MAX_HELD_EVENTS {
            self.flush_texts();
        }
        self.drain(out);
    }

    fn text(&mut self, key: Key<'_>) -> usize {
        if let Some(i) = self.texts.iter().position(|t| t.key == key) {
            return i;
        }
        self.texts.push(Text {
            key: key.into_owned(),
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
        let Some(range) = data else {
            return raw;
        };
        // Parsed only when a finding touches one of the deltas: the rare case.
        let mut value: Option<Value> = None;
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
            if value.is_none() {
                value = serde_json::from_slice::<Value>(&raw[range.clone()]).ok();
            }
            let Some(slot) = value
                .as_mut()
                .and_then(|v| v.pointer_mut(&d.slot.pointer()))
            else {
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
        let (true, Some(value)) = (changed, value) else {
            return raw;
        };
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

/// Which joined text a delta belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Key<'a> {
    /// OpenAI Chat Completions: a choice's content, by choice index.
    Chat(u64),
    /// OpenAI Chat Completions: a tool call's arguments, by choice and call index.
    Tool(u64, u64),
    /// OpenAI Responses: by event type and output, content and summary index.
    Response(Cow<'a, str>, [u64; 3]),
    /// Anthropic Messages: by content block index and delta field.
    Block(u64, &'static str),
}

impl Key<'_> {
    fn into_owned(self) -> Key<'static> {
        match self {
            Key::Chat(i) => Key::Chat(i),
            Key::Tool(i, j) => Key::Tool(i, j),
            Key::Response(kind, n) => Key::Response(Cow::Owned(kind.into_owned()), n),
            Key::Block(i, f) => Key::Block(i, f),
        }
    }
}

/// Where a delta text sits in its event's JSON, to change it there when a finding touches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// `/choices/{i}/delta/content`
    Content(usize),
    /// `/choices/{i}/delta/tool_calls/{j}/function/arguments`
    Arguments(usize, usize),
    /// `/delta`
    Delta,
    /// `/delta/{field}`
    Block(&'static str),
}

impl Slot {
    fn pointer(self) -> String {
        match self {
            Slot::Content(i) => format!("/choices/{i}/delta/content"),
            Slot::Arguments(i, j) => {
                format!("/choices/{i}/delta/tool_calls/{j}/function/arguments")
            }
            Slot::Delta => "/delta".to_string(),
            Slot::Block(field) => format!("/delta/{field}"),
        }
    }
}

/// The delta texts of one event's JSON data: which text each belongs to, where it sits, and the
/// text (unescaped). Only the fields the three APIs use are read, straight from the bytes and
/// borrowed where no escape had to be undone; data of another shape has none.
fn deltas(data: &[u8]) -> Vec<(Key<'_>, Slot, Cow<'_, str>)> {
    let Ok(d) = serde_json::from_slice::<Data<'_>>(data) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(choices) = d.choices.0 {
        for (i, choice) in choices.into_iter().enumerate() {
            let Some(choice) = choice.0 else {
                continue;
            };
            let index = choice.index.0.unwrap_or(i as u64);
            let Some(delta) = choice.delta.0 else {
                continue;
            };
            if let Some(Str(content)) = delta.content.0 {
                out.push((Key::Chat(index), Slot::Content(i), content));
            }
            for (j, call) in delta.tool_calls.0.into_iter().flatten().enumerate() {
                let Some(call) = call.0 else {
                    continue;
                };
                let ti = call.index.0.unwrap_or(j as u64);
                if let Some(Str(args)) = call.function.0.and_then(|f| f.arguments.0) {
                    out.push((Key::Tool(index, ti), Slot::Arguments(i, j), args));
                }
            }
        }
        return out;
    }
    let kind = d.kind.0.map(|k| k.0).unwrap_or_default();
    match d.delta.0 {
        Some(TopDelta::Text(text)) if kind.starts_with("response.") && kind.ends_with(".delta") => {
            let n = [d.output_index, d.content_index, d.summary_index].map(|n| n.0.unwrap_or(0));
            out.push((Key::Response(kind, n), Slot::Delta, text));
        }
        Some(TopDelta::Block(block)) if kind == "content_block_delta" => {
            let index = d.index.0.unwrap_or(0);
            for (field, text) in [
                ("text", block.text),
                ("partial_json", block.partial_json),
                ("thinking", block.thinking),
            ] {
                if let Some(Str(text)) = text.0 {
                    out.push((Key::Block(index, field), Slot::Block(field), text));
                }
            }
        }
        _ => {}
    }
    out
}

/// The fields of an event's data that can carry deltas (all three APIs in one shape; serde skips
/// the rest without building anything). Every field is [`Lenient`], as a tree lookup would be: a
/// field of another shape is skipped and the event's other deltas still count.
#[derive(Deserialize)]
struct Data<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Lenient<Str<'a>>,
    #[serde(borrow, default)]
    choices: Lenient<Vec<Lenient<Choice<'a>>>>,
    #[serde(borrow, default)]
    delta: Lenient<TopDelta<'a>>,
    #[serde(default)]
    index: Lenient<u64>,
    #[serde(default)]
    output_index: Lenient<u64>,
    #[serde(default)]
    content_index: Lenient<u64>,
    #[serde(default)]
    summary_index: Lenient<u64>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: Lenient<u64>,
    #[serde(borrow, default)]
    delta: Lenient<ChatDelta<'a>>,
}

#[derive(Deserialize)]
struct ChatDelta<'a> {
    #[serde(borrow, default)]
    content: Lenient<Str<'a>>,
    #[serde(borrow, default)]
    tool_calls: Lenient<Vec<Lenient<Call<'a>>>>,
}

#[derive(Deserialize)]
struct Call<'a> {
    #[serde(default)]
    index: Lenient<u64>,
    #[serde(borrow, default)]
    function: Lenient<Function<'a>>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow, default)]
    arguments: Lenient<Str<'a>>,
}

#[derive(Deserialize)]
struct BlockDelta<'a> {
    #[serde(borrow, default)]
    text: Lenient<Str<'a>>,
    #[serde(borrow, default)]
    partial_json: Lenient<Str<'a>>,
    #[serde(borrow, default)]
    thinking: Lenient<Str<'a>>,
}

/// A JSON string, borrowed when it has no escapes to undo.
struct Str<'a>(Cow<'a, str>);

/// The top-level `delta`: a string (OpenAI Responses) or an object (Anthropic).
enum TopDelta<'a> {
    Text(Cow<'a, str>),
    Block(BlockDelta<'a>),
}

/// A value read when it has the JSON shape wanted and skipped (`None`) when not.
struct Lenient<T>(Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Lenient(None)
    }
}

/// How a [`Lenient`] value is made from each JSON shape; `None` for the shapes it is not.
trait Shape<'de>: Sized {
    fn from_str(_: Cow<'de, str>) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

impl<'de: 'a, 'a> Shape<'de> for Str<'a> {
    fn from_str(s: Cow<'de, str>) -> Option<Self> {
        Some(Str(s))
    }
}

impl<'de> Shape<'de> for u64 {
    fn from_u64(n: u64) -> Option<Self> {
        Some(n)
    }
}

impl<'de: 'a, 'a> Shape<'de> for TopDelta<'a> {
    fn from_str(s: Cow<'de, str>) -> Option<Self> {
        Some(TopDelta::Text(s))
    }
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        BlockDelta::deserialize(de::value::MapAccessDeserializer::new(map))
            .map(|b| Some(TopDelta::Block(b)))
    }
}

impl<'de, T: Deserialize<'de>> Shape<'de> for Vec<T> {
    fn from_seq<A: SeqAccess<'de>>(seq: A) -> Result<Option<Self>, A::Error> {
        Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Some)
    }
}

macro_rules! object_shape {
    ($($t:ident),*) => {$(
        impl<'de: 'a, 'a> Shape<'de> for $t<'a> {
            fn from_map<A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
                $t::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
            }
        }
    )*};
}
object_shape!(Choice, ChatDelta, Call, Function);

impl<'de, T: Shape<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Shape<'de>> Visitor<'de> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Lenient(T::from_str(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Lenient(T::from_str(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Lenient(T::from_str(Cow::Owned(v))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Lenient(T::from_u64(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Lenient(u64::try_from(v).ok().and_then(T::from_u64)))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::from_map(map).map(Lenient)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                T::from_seq(seq).map(Lenient)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
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
            for (_, _, text) in deltas(data.as_bytes()) {
                out.push_str(&text);
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

    /// The tree lookup the typed reading replaced: the oracle for what counts as a delta.
    fn tree_deltas(data: &str) -> Vec<(String, String, String)> {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return Vec::new();
        };
        let s = |v: &Value| v.as_str().map(str::to_string);
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
                if let Some(t) = delta.get("content").and_then(s) {
                    out.push((
                        format!("chat/{index}"),
                        format!("/choices/{i}/delta/content"),
                        t,
                    ));
                }
                for (j, call) in delta
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let ti = call
                        .get("index")
                        .and_then(Value::as_u64)
                        .unwrap_or(j as u64);
                    if let Some(t) = call.pointer("/function/arguments").and_then(s) {
                        out.push((
                            format!("chat/{index}/tool/{ti}"),
                            format!("/choices/{i}/delta/tool_calls/{j}/function/arguments"),
                            t,
                        ));
                    }
                }
            }
        } else if kind.starts_with("response.") && kind.ends_with(".delta") {
            if let Some(t) = v.get("delta").and_then(s) {
                let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
                let key = format!(
                    "{kind}/{}/{}/{}",
                    n("output_index"),
                    n("content_index"),
                    n("summary_index")
                );
                out.push((key, "/delta".to_string(), t));
            }
        } else if kind == "content_block_delta" {
            let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
            for field in ["text", "partial_json", "thinking"] {
                if let Some(t) = v.get("delta").and_then(|d| d.get(field)).and_then(s) {
                    out.push((
                        format!("block/{index}/{field}"),
                        format!("/delta/{field}"),
                        t,
                    ));
                }
            }
        }
        out
    }

    fn typed_deltas(data: &str) -> Vec<(String, String, String)> {
        deltas(data.as_bytes())
            .into_iter()
            .map(|(key, slot, text)| {
                let key = match key {
                    Key::Chat(i) => format!("chat/{i}"),
                    Key::Tool(i, j) => format!("chat/{i}/tool/{j}"),
                    Key::Response(kind, [a, b, c]) => format!("{kind}/{a}/{b}/{c}"),
                    Key::Block(i, field) => format!("block/{i}/{field}"),
                };
                (key, slot.pointer(), text.into_owned())
            })
            .collect()
    }

    /// Any JSON value, or one of the shape a delta field wants, so that both the expected and
    /// the odd shapes of every field are tried.
    fn field(wanted: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            any::<u8>().prop_map(|n| Some(json!(n))),
            Just(Some(json!(-1))),
            Just(Some(json!(1.5))),
            Just(Some(json!(true))),
            "[a-z\"\\\\\n\u{e9}]{0,6}".prop_map(|t| Some(json!(t))),
            Just(Some(json!([1, {"a": "b"}]))),
            Just(Some(json!({"x": [1, 2]}))),
            wanted.prop_map(Some),
        ]
        .boxed()
    }

    fn object(fields: Vec<(&'static str, BoxedStrategy<Option<Value>>)>) -> BoxedStrategy<Value> {
        let (names, strategies): (Vec<_>, Vec<_>) = fields.into_iter().unzip();
        strategies
            .prop_map(move |values| {
                let mut m = serde_json::Map::new();
                for (name, v) in names.iter().zip(values) {
                    if let Some(v) = v {
                        m.insert((*name).to_string(), v);
                    }
                }
                Value::Object(m)
            })
            .boxed()
    }

    fn text() -> BoxedStrategy<Value> {
        "[a-zQ7 \"\\\\/\n\u{e9}\u{1f600}]{0,8}"
            .prop_map(Value::from)
            .boxed()
    }

    fn index() -> BoxedStrategy<Value> {
        (0u64..3).prop_map(Value::from).boxed()
    }

    fn event_data() -> BoxedStrategy<Value> {
        let call = object(vec![
            ("index", field(index())),
            (
                "function",
                field(object(vec![("arguments", field(text()))])),
            ),
        ]);
        let chat_delta = object(vec![
            ("content", field(text())),
            (
                "tool_calls",
                field(
                    proptest::collection::vec(call, 0..3)
                        .prop_map(Value::from)
                        .boxed(),
                ),
            ),
        ]);
        let choice = object(vec![
            ("index", field(index())),
            ("delta", field(chat_delta)),
        ]);
        let block = object(vec![
            ("type", field(Just(json!("text_delta")).boxed())),
            ("text", field(text())),
            ("partial_json", field(text())),
            ("thinking", field(text())),
        ]);
        let kind = prop_oneof![
            Just(json!("content_block_delta")),
            Just(json!("response.output_text.delta")),
            Just(json!("response.reasoning_summary_text.delta")),
            Just(json!("response.completed")),
            Just(json!("message_delta")),
        ]
        .boxed();
        object(vec![
            ("type", field(kind)),
            (
                "choices",
                field(
                    proptest::collection::vec(choice, 0..3)
                        .prop_map(Value::from)
                        .boxed(),
                ),
            ),
            ("delta", field(prop_oneof![text(), block].boxed())),
            ("index", field(index())),
            ("output_index", field(index())),
            ("content_index", field(index())),
            ("summary_index", field(index())),
        ])
    }

    #[test]
    fn a_field_of_another_shape_does_not_hide_the_events_other_deltas() {
        let data = json!({"choices": [
            {"index": 0, "delta": {"content": 5}},
            {"index": 1.5, "delta": "odd"},
            {"index": 2, "delta": {"content": "kept", "tool_calls": [7, {"function": {"arguments": "a"}}]}},
        ]})
        .to_string();
        let found = typed_deltas(&data);
        assert_eq!(found, tree_deltas(&data));
        assert_eq!(
            found,
            vec![
                (
                    "chat/2".into(),
                    "/choices/2/delta/content".into(),
                    "kept".into()
                ),
                (
                    "chat/2/tool/1".into(),
                    "/choices/2/delta/tool_calls/1/function/arguments".into(),
                    "a".into()
                ),
            ]
        );
    }

    #[test]
    fn a_secret_split_across_escaped_deltas_is_redacted() {
        // The middle piece arrives JSON-escaped (`\u0053` is `S`): the text joined is unescaped.
        let (a, rest) = HELD.split_at(4);
        let (b, c) = rest.split_at(5);
        let escaped: String = b
            .chars()
            .map(|ch| format!("\\u{:04x}", ch as u32))
            .collect();
        let middle = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{escaped}\"}}}}]}}\n\n"
        );
        let mut s = redactor().response_stream(&sse_headers());
        let mut out = s.push(chat(a).as_bytes()).to_vec();
        out.extend_from_slice(&s.push(middle.as_bytes()));
        out.extend_from_slice(&s.push(chat(c).as_bytes()));
        out.extend_from_slice(&s.finish());
        assert_eq!(joined(&out), "[REDACTED:k#s]");
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

        /// The typed reading finds exactly the deltas a JSON tree lookup finds, whatever shape
        /// each field has.
        #[test]
        fn typed_reading_finds_the_deltas_a_tree_lookup_finds(data in event_data()) {
            let data = data.to_string();
            prop_assert_eq!(typed_deltas(&data), tree_deltas(&data));
        }

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
