//! Token usage: what a request may cost before it is forwarded, and what the upstream says it
//! cost on the way back.
//!
//! - [`plan_request`] reads a budgeted request's JSON body for the most it can cost (its
//!   `max_tokens` and an estimate of its input) and, for an OpenAI chat completions stream, asks
//!   the upstream to report usage (`stream_options.include_usage`), which it does not by default.
//! - [`Meter`] observes the response body: it finds the usage the upstream reports
//!   ([`UsageScan`]) for the audit record and settles the request's [`Reservation`] when the
//!   body ends.
//! - [`StripUsageChunk`] removes the usage-only chunk keygate asked for from what the client
//!   sees, when the client did not ask for it.

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use memchr::memmem::Finder;
use serde_json::Value;

use super::budget::Reservation;

mod facts;

/// Output tokens booked for a request whose body names no `max_tokens` (nor `budget_reserve` is
/// configured): about one long answer.
pub const DEFAULT_RESERVE: u64 = 4096;

/// Bytes of text per token, the usual rule of thumb for English and code; used only to book
/// input tokens, which the upstream's report replaces.
const BYTES_PER_TOKEN: u64 = 4;

/// What a budgeted request may cost, and how its body changes so the upstream reports usage.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RequestPlan {
    /// Tokens to reserve: the output the body allows plus its estimated input.
    pub reserve: u64,
    /// The body to forward instead, when keygate added `stream_options.include_usage`.
    pub body: Option<Bytes>,
    /// The client did not ask for the usage-only chunk keygate asked for: it is removed from
    /// what the client sees.
    pub strip_usage_chunk: bool,
}

/// Reads a budgeted request's body. `path` is the request path; `default_output` is the output
/// booked when the body names no maximum. A body that is not a JSON object books only that.
pub fn plan_request(path: &str, body: &[u8], default_output: u64) -> RequestPlan {
    if body.is_empty() {
        return RequestPlan::default();
    }
    let Some(facts) = facts::Facts::read(body) else {
        return RequestPlan {
            reserve: default_output,
            ..RequestPlan::default()
        };
    };
    let max_output = facts
        .max
        .iter()
        .flatten()
        .max()
        .copied()
        .unwrap_or(default_output);
    // `n` choices each generate up to the maximum (OpenAI chat allows up to 128).
    let choices = facts.n.unwrap_or(1).clamp(1, 128);
    let input = facts.text.div_ceil(BYTES_PER_TOKEN);
    let mut plan = RequestPlan {
        reserve: max_output.saturating_mul(choices).saturating_add(input),
        ..RequestPlan::default()
    };
    let streams = facts.stream == Some(true);
    if streams && path.ends_with("/chat/completions") && facts.include_usage != Some(true) {
        // `Facts::read` found one JSON object without `stream_options`: the member goes in
        // front, with no tree of the body (whose parse grew with the conversation and sat
        // before the stream's first byte). Only options to edit are parsed into a tree.
        plan.body = if facts.stream_options {
            match serde_json::from_slice::<Value>(body) {
                Ok(Value::Object(obj)) => Some(set_include_usage(body, obj)),
                _ => None,
            }
        } else {
            insert_usage_member(body)
        };
        plan.strip_usage_chunk = plan.body.is_some();
    }
    plan
}

/// The body with `"stream_options":{"include_usage":true}` inserted as its first member, its
/// bytes otherwise forwarded as sent; `None` if it does not start with `{` (after blanks), which
/// a body `Facts::read` accepted always does.
fn insert_usage_member(body: &[u8]) -> Option<Bytes> {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let rest = &body[open + 1..];
    let empty = rest
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'}');
    let mut out = BytesMut::with_capacity(body.len() + MEMBER.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(MEMBER);
    if !empty {
        out.extend_from_slice(b",");
    }
    out.extend_from_slice(rest);
    Some(out.freeze())
}

/// The body with the client's `stream_options` given `include_usage: true`, re-serialized
/// (member order may change, meaning does not).
fn set_include_usage(body: &[u8], mut obj: serde_json::Map<String, Value>) -> Bytes {
    let options = obj
        .entry("stream_options")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if !options.is_object() {
        *options = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(o) = options {
        o.insert("include_usage".into(), Value::Bool(true));
    }
    // A map of JSON values serializes without fail; keep the client's body if it somehow did not.
    serde_json::to_vec(&obj).map_or_else(|_| Bytes::copy_from_slice(body), Bytes::from)
}

#[cfg(test)]
/// Bytes of text in a request: every string value except inline media (base64 `data`,
/// `file_data`, `data:` URLs), which would make an image look like a novel.
fn text_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) if s.starts_with("data:") => 0,
        Value::String(s) => s.len() as u64,
        Value::Array(a) => a.iter().map(text_bytes).sum(),
        Value::Object(o) => object_text_bytes(o),
        _ => 0,
    }
}

#[cfg(test)]
fn object_text_bytes(o: &serde_json::Map<String, Value>) -> u64 {
    o.iter()
        .filter(|(k, _)| !matches!(k.as_str(), "data" | "file_data" | "b64_json"))
        .map(|(_, v)| text_bytes(v))
        .sum()
}

/// Usage accounting for one response body, and the settling of its reservation.
pub struct Meter {
    scan: Option<UsageScan>,
    reservation: Option<Reservation>,
    success: bool,
}

impl Meter {
    /// `reservation` is the request's booking (budgeted agents only).
    pub fn new(status: StatusCode, headers: &HeaderMap, reservation: Option<Reservation>) -> Meter {
        // Usage is only looked for in API answers: a downloaded file that happens to hold
        // `"total_tokens":` must not be charged or audited as usage.
        let api_answer = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim())
            .is_some_and(|m| {
                m.eq_ignore_ascii_case("application/json")
                    || m.eq_ignore_ascii_case("text/event-stream")
            });
        Meter {
            scan: api_answer.then(UsageScan::default),
            reservation,
            success: status.is_success(),
        }
    }

    /// The next bytes of the upstream's body, as they arrived.
    pub fn feed(&mut self, data: &[u8]) {
        if let Some(scan) = &mut self.scan {
            scan.feed(data);
        }
    }

    /// Settles the reservation and returns the tokens the upstream reported, if it did.
    /// `completed`: the upstream's body ended normally (rather than the client leaving, the
    /// upstream failing or stalling).
    ///
    /// A completed answer is charged what it reported; an upstream error what it reported or
    /// nothing (it generated nothing); anything else, including a stream dropped before its
    /// usage event, the whole reservation (or the reported usage, if more).
    pub fn settle(mut self, completed: bool) -> Option<u64> {
        let reported = self.scan.as_ref().and_then(UsageScan::total);
        if let Some(r) = self.reservation.take() {
            match reported {
                _ if !self.success => r.settle(reported.unwrap_or(0)),
                Some(t) if completed => r.settle(t),
                Some(t) => {
                    let all = r.amount().max(t);
                    r.settle(all);
                }
                None => drop(r), // charged in full
            }
        }
        reported
    }
}

/// What the three usage keys (`"total_tokens":`, `"input_tokens":`, `"output_tokens":`) end
/// with: one search finds them all, and the bytes before each find say which it is.
static TOKENS_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"_tokens\":"));
/// The keys' first parts, by slot (total, input, output).
const KEY_HEADS: [&[u8]; 3] = [b"\"total", b"\"input", b"\"output"];

/// Bytes kept from the end of one chunk and taken from the start of the next, so a key and its
/// number cut across two chunks are still read whole.
const SEAM: usize = 64;

/// Finds the token usage an upstream reports (`total_tokens`, or `input_tokens` +
/// `output_tokens`), in JSON or SSE, without parsing the body: the largest value seen of each.
/// Inside a JSON string the quotes are escaped, so text a model writes cannot pose as usage.
#[derive(Default)]
pub struct UsageScan {
    total: u64,
    input: u64,
    output: u64,
    seen: bool,
    tail: Vec<u8>,
}

impl UsageScan {
    /// Scans the next chunk of the answer body, in the order it is sent.
    pub fn feed(&mut self, data: &[u8]) {
        // Each chunk is scanned in place, and the seam with the previous one separately; the
        // seam overlaps both, which is harmless because only the largest value counts.
        let mut seam = std::mem::take(&mut self.tail);
        if !seam.is_empty() {
            seam.extend_from_slice(&data[..data.len().min(SEAM)]);
            self.scan(&seam);
        }
        self.scan(data);
        // The buffer is reused: this runs for every chunk of every API answer.
        seam.clear();
        seam.extend_from_slice(&data[data.len().saturating_sub(SEAM)..]);
        self.tail = seam;
    }

    /// Every usage key in `buf`, found in one pass (a pass per key cost three): no key's
    /// occurrences overlap one another, nor those of `_tokens":`, so each key's every
    /// occurrence is one of the shared ending's, told apart by the bytes before it.
    fn scan(&mut self, buf: &[u8]) {
        let tail = TOKENS_KEY.needle().len();
        for at in TOKENS_KEY.find_iter(buf) {
            let Some(slot) = KEY_HEADS.iter().position(|h| buf[..at].ends_with(h)) else {
                continue;
            };
            self.read_number(slot, &buf[at + tail..]);
        }
    }

    /// The number right after a usage key (spaces allowed), into its slot.
    fn read_number(&mut self, slot: usize, after: &[u8]) {
        let mut digits = after
            .iter()
            .skip_while(|b| **b == b' ')
            .take_while(|b| b.is_ascii_digit())
            .peekable();
        if digits.peek().is_none() {
            return; // `null`, or the number is in the next chunk
        }
        let n = digits.fold(0u64, |n, d| {
            n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
        });
        self.seen = true;
        let s = match slot {
            0 => &mut self.total,
            1 => &mut self.input,
            _ => &mut self.output,
        };
        *s = (*s).max(n);
    }

    /// Tokens the answer reported so far, or `None` if it reported no usage.
    pub fn total(&self) -> Option<u64> {
        self.seen
            .then(|| self.total.max(self.input.saturating_add(self.output)))
    }
}

/// A response body without the usage-only chunk of an OpenAI chat completions stream, for a
/// client that did not ask for it (keygate did). Wraps the body on its way to the client, after
/// the [`Meter`] has seen the usage.
pub struct StripUsageChunk<B> {
    inner: B,
    filter: UsageChunkFilter,
    done: bool,
}

impl<B> StripUsageChunk<B> {
    /// Wraps a response body; every other chunk passes through untouched.
    pub fn new(inner: B) -> Self {
        StripUsageChunk {
            inner,
            filter: UsageChunkFilter::default(),
            done: false,
        }
    }
}

impl<B> HttpBody for StripUsageChunk<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.filter.push(data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.done = true;
                    let rest = this.filter.finish();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        // Removing the chunk changes the length.
        SizeHint::default()
    }
}

/// An event held back waiting for its end may not grow past this; beyond it the filter gives
/// up on the event (no usage-only chunk is that large) and passes its bytes on.
const MAX_HELD_EVENT: usize = 256 * 1024;

/// Removes the usage-only chunk (`"choices": []`, `"usage": {…}`) from an OpenAI chat
/// completions stream. Complete events pass on as they arrive; only an incomplete event's bytes
/// are held until its blank line.
#[derive(Default)]
struct UsageChunkFilter {
    held: BytesMut,
}

impl UsageChunkFilter {
    fn push(&mut self, data: Bytes) -> Bytes {
        // The common chunk (whole events, none held before it) passes without a copy: bytes are
        // copied only around a removed event and for an incomplete event's tail.
        let buf = if self.held.is_empty() {
            data
        } else {
            self.held.extend_from_slice(&data);
            self.held.split().freeze()
        };
        let mut cut: Option<BytesMut> = None;
        let (mut start, mut kept_from) = (0, 0);
        while let Some(end) = event_end(&buf[start..]).map(|n| start + n) {
            if is_usage_only(&buf[start..end]) {
                cut.get_or_insert_with(BytesMut::new)
                    .extend_from_slice(&buf[kept_from..start]);
                kept_from = end;
            }
            start = end;
        }
        let out = match cut {
            None => buf.slice(..start),
            Some(mut out) => {
                out.extend_from_slice(&buf[kept_from..start]);
                out.freeze()
            }
        };
        if buf.len() - start > MAX_HELD_EVENT {
            return [&out[..], &buf[start..]].concat().into();
        }
        self.held.extend_from_slice(&buf[start..]);
        out
    }

    fn finish(&mut self) -> Bytes {
        let rest = self.held.split().freeze();
        if is_usage_only(&rest) {
            Bytes::new()
        } else {
            rest
        }
    }
}

/// Searchers built once: `memmem::find` would build one again for every chunk.
static LF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
static CRLF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n\r\n"));
static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));

/// The length of the first complete SSE event in `buf`, its terminating blank line included.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = LF.find(buf).map(|i| i + 2);
    let crlf = CRLF.find(buf).map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether an SSE event is the chunk OpenAI sends for `include_usage`: no choices, a usage
/// object.
fn is_usage_only(event: &[u8]) -> bool {
    if USAGE.find(event).is_none() {
        return false;
    }
    let Ok(text) = std::str::from_utf8(event) else {
        return false;
    };
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    let Ok(v) = serde_json::from_str::<Value>(&data.join("\n")) else {
        return false;
    };
    v.get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && v.get("usage").is_some_and(Value::is_object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorize::budget::TokenBudget;
    use std::time::Duration;

    /// `UsageScan::scan` as it was: a search per key.
    fn scan_by_key(s: &mut UsageScan, buf: &[u8]) {
        let keys: [&[u8]; 3] = [
            b"\"total_tokens\":",
            b"\"input_tokens\":",
            b"\"output_tokens\":",
        ];
        for (slot, key) in keys.iter().enumerate() {
            for at in memchr::memmem::find_iter(buf, key) {
                s.read_number(slot, &buf[at + key.len()..]);
            }
        }
    }

    proptest::proptest! {
        /// One pass for the three keys reads what a search per key read.
        #[test]
        fn one_pass_reads_the_usage_a_search_per_key_read(
            picks in proptest::collection::vec(0usize..14, 0..40)
        ) {
            const PIECES: [&[u8]; 14] = [
                b"\"total_tokens\":", b"\"input_tokens\":", b"\"output_tokens\":",
                b"_tokens\":", b"\"", b"total", b"output", b"input", b" ", b"12", b"7",
                b"null", b"x", b"\"prompt_tokens\":",
            ];
            let buf: Vec<u8> = picks.iter().flat_map(|&p| PIECES[p].iter().copied()).collect();
            let mut one = UsageScan::default();
            one.scan(&buf);
            let mut each = UsageScan::default();
            scan_by_key(&mut each, &buf);
            proptest::prop_assert_eq!(
                (one.total, one.input, one.output, one.seen),
                (each.total, each.input, each.output, each.seen)
            );
        }
    }

    #[test]
    fn usage_is_found_across_chunks_in_json_and_sse() {
        let mut s = UsageScan::default();
        s.feed(b"data: {\"usage\":{\"prompt_tokens\":5,\"total_to");
        s.feed(b"kens\": 42}}\n\n");
        assert_eq!(s.total(), Some(42));
        let mut a = UsageScan::default();
        a.feed(br#"event: message_start\ndata: {"usage":{"input_tokens":10,"output_tokens":1}}"#);
        a.feed(br#"event: message_delta\ndata: {"usage":{"output_tokens":15}}"#);
        assert_eq!(a.total(), Some(25));
    }

    #[test]
    fn a_number_cut_between_chunks_is_read_whole() {
        let mut s = UsageScan::default();
        let mut first = vec![b' '; 1000];
        first.extend_from_slice(b"{\"total_tokens\": 12");
        s.feed(&first);
        s.feed(b"345}");
        assert_eq!(s.total(), Some(12345));
    }

    #[test]
    fn usage_written_by_the_model_is_not_usage() {
        let mut s = UsageScan::default();
        s.feed(br#"{"content":"say \"total_tokens\": 99999","usage":null}"#);
        assert_eq!(s.total(), None);
    }

    #[test]
    fn zero_reported_usage_is_reported() {
        let mut s = UsageScan::default();
        s.feed(br#"{"usage":{"total_tokens":0}}"#);
        assert_eq!(s.total(), Some(0));
    }

    #[test]
    fn reserve_is_max_tokens_plus_estimated_input() {
        let body =
            br#"{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"12345678"}]}"#;
        let p = plan_request("/v1/messages", body, 4096);
        // "m", "user", "12345678": 13 bytes -> 4 tokens.
        assert_eq!(p.reserve, 104);
        assert_eq!(p.body, None);
        let p = plan_request("/v1/responses", br#"{"max_output_tokens":7}"#, 4096);
        assert_eq!(p.reserve, 7);
        let p = plan_request(
            "/v1/chat/completions",
            br#"{"max_completion_tokens":10,"n":3}"#,
            4096,
        );
        assert_eq!(p.reserve, 30);
    }

    #[test]
    fn body_facts_read_without_a_tree_match_the_parsed_body() {
        let bodies: &[&[u8]] = &[
            br#"{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"12\n\u00e9"}]}"#,
            br#"{"max_output_tokens":7,"max_tokens":-1,"max_completion_tokens":2.0,"n":"3"}"#,
            br#"{"n":200,"stream":true,"stream_options":{"include_usage":true,"x":["a",{"data":"zz"}]}}"#,
            br#"{"stream":"yes","stream_options":[1],"input":[null,true,1e3,"data:x","abc"]}"#,
            br#"{"a":{"b":{"file_data":"xxxx","b64_json":"yy","c":"data","include_usage":false}}}"#,
            br#"  {"stream_options":{"include_usage":false},"stream":false}  "#,
        ];
        for body in bodies {
            let obj = match serde_json::from_slice::<Value>(body).unwrap() {
                Value::Object(o) => o,
                _ => unreachable!(),
            };
            let f = facts::Facts::read(body).unwrap();
            let keys = ["max_tokens", "max_output_tokens", "max_completion_tokens"];
            for (i, k) in keys.iter().enumerate() {
                assert_eq!(f.max[i], obj.get(*k).and_then(Value::as_u64), "{k}");
            }
            assert_eq!(f.n, obj.get("n").and_then(Value::as_u64));
            assert_eq!(f.stream, obj.get("stream").and_then(Value::as_bool));
            assert_eq!(f.stream_options, obj.contains_key("stream_options"));
            let usage = obj
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool);
            assert_eq!(f.include_usage, usage);
            assert_eq!(f.text, object_text_bytes(&obj));
        }
        for not_an_object in [&b"[1]"[..], b"\"s\"", b"3", b"{} {}", b"{\"a\":", b"nope"] {
            assert_eq!(facts::Facts::read(not_an_object), None);
        }
    }

    #[test]
    fn without_a_maximum_the_default_is_booked() {
        assert_eq!(plan_request("/x", br#"{"input":""}"#, 500).reserve, 500);
        assert_eq!(plan_request("/x", b"not json", 500).reserve, 500);
        assert_eq!(plan_request("/x", b"", 500).reserve, 0);
    }

    #[test]
    fn inline_images_do_not_count_as_input_text() {
        let big = "A".repeat(40_000);
        let body = format!(
            r#"{{"max_tokens":10,"messages":[{{"content":[{{"type":"image","source":{{"type":"base64","data":"{big}"}}}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{big}"}}}}]}}]}}"#
        );
        let p = plan_request("/v1/messages", body.as_bytes(), 4096);
        assert!(p.reserve < 20, "{}", p.reserve);
    }

    #[test]
    fn chat_stream_is_asked_for_usage_keeping_the_clients_bytes() {
        let body = br#"  {"model":"gpt","stream":true,"max_tokens":5}"#;
        let p = plan_request("/v1/chat/completions", body, 4096);
        assert!(p.strip_usage_chunk);
        let sent = p.body.unwrap();
        assert_eq!(
            &sent[..],
            br#"  {"stream_options":{"include_usage":true},"model":"gpt","stream":true,"max_tokens":5}"#
        );
    }

    #[test]
    fn chat_stream_with_stream_options_gets_include_usage_set() {
        let body = br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#;
        let p = plan_request("/v1/chat/completions", body, 4096);
        let v: Value = serde_json::from_slice(&p.body.unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1);
        assert!(p.strip_usage_chunk);
    }

    #[test]
    fn a_client_that_asked_for_usage_gets_its_body_and_chunk_untouched() {
        let body = br#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        let p = plan_request("/v1/chat/completions", body, 4096);
        assert_eq!(p.body, None);
        assert!(!p.strip_usage_chunk);
        // Not a stream, or not chat completions: nothing to ask for.
        assert_eq!(
            plan_request("/v1/chat/completions", br#"{"stream":false}"#, 1).body,
            None
        );
        assert_eq!(
            plan_request("/v1/responses", br#"{"stream":true}"#, 1).body,
            None
        );
    }

    const USAGE_CHUNK: &[u8] = b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":5,\"total_tokens\":14}}\n\n";

    #[test]
    fn the_usage_only_chunk_is_removed_and_the_rest_passes_as_it_comes() {
        let mut f = UsageChunkFilter::default();
        let content = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        assert_eq!(&f.push(Bytes::from_static(content))[..], content);
        // A chunk ending mid-event: the complete part passes, the rest is held.
        let mut split = content.to_vec();
        split.extend_from_slice(&USAGE_CHUNK[..20]);
        assert_eq!(&f.push(Bytes::from(split))[..], content);
        assert_eq!(&f.push(Bytes::from_static(&USAGE_CHUNK[20..]))[..], b"");
        assert_eq!(
            &f.push(Bytes::from_static(b"data: [DONE]\n\n"))[..],
            b"data: [DONE]\n\n"
        );
        assert_eq!(&f.finish()[..], b"");
    }

    /// The filter as it was before complete chunks passed uncopied: the oracle.
    #[derive(Default)]
    struct CopyingFilter {
        held: BytesMut,
    }

    impl CopyingFilter {
        fn push(&mut self, data: Bytes) -> Bytes {
            self.held.extend_from_slice(&data);
            let mut out = BytesMut::new();
            while let Some(end) = event_end(&self.held) {
                let event = self.held.split_to(end);
                if !is_usage_only(&event) {
                    out.extend_from_slice(&event);
                }
            }
            if self.held.len() > MAX_HELD_EVENT {
                out.extend_from_slice(&self.held.split());
            }
            out.freeze()
        }
    }

    proptest::proptest! {
        /// However a stream of events (usage chunks, ordinary ones, stray blank lines, either line
        /// ending) is cut into chunks, each chunk comes out as the copying filter gave it.
        #[test]
        fn the_uncopied_filter_gives_what_the_copying_one_gave(
            parts in proptest::collection::vec(0usize..6, 0..12),
            cuts in proptest::collection::vec(0usize..2048, 0..10),
        ) {
            let pieces: [&[u8]; 6] = [
                USAGE_CHUNK,
                b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
                b"data: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\r\n\r\n",
                b"\n",
                b"data: [DONE]\n\n",
                b": ping\r\n\r\n",
            ];
            let body: Vec<u8> = parts.iter().flat_map(|&i| pieces[i].iter().copied()).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
            cuts.sort_unstable();
            let (mut new, mut old) = (UsageChunkFilter::default(), CopyingFilter::default());
            let mut from = 0;
            for c in cuts.into_iter().chain([body.len()]) {
                let chunk = Bytes::copy_from_slice(&body[from..c]);
                proptest::prop_assert_eq!(new.push(chunk.clone()), old.push(chunk));
                from = c;
            }
            proptest::prop_assert_eq!(new.finish(), {
                let rest = old.held.split().freeze();
                if is_usage_only(&rest) { Bytes::new() } else { rest }
            });
        }
    }

    #[test]
    fn a_filter_never_holds_more_than_its_bound() {
        let mut f = UsageChunkFilter::default();
        let out = f.push(Bytes::from(vec![b'x'; MAX_HELD_EVENT + 1]));
        assert_eq!(out.len(), MAX_HELD_EVENT + 1);
    }

    fn sse_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "text/event-stream; charset=utf-8".parse().unwrap(),
        );
        h
    }

    #[test]
    fn a_completed_answer_settles_to_its_reported_usage() {
        let b = TokenBudget::new(150, Duration::from_secs(3600));
        let mut m = Meter::new(StatusCode::OK, &sse_headers(), b.try_reserve(100).ok());
        m.feed(USAGE_CHUNK);
        assert_eq!(m.settle(true), Some(14));
        assert!(b.try_reserve(136).is_ok());
    }

    #[test]
    fn a_stream_dropped_before_its_usage_is_charged_the_whole_reservation() {
        let b = TokenBudget::new(150, Duration::from_secs(3600));
        let mut m = Meter::new(StatusCode::OK, &sse_headers(), b.try_reserve(100).ok());
        m.feed(b"data: {\"choices\":[{}]}\n\n");
        assert_eq!(m.settle(false), None);
        assert!(b.try_reserve(51).is_err());
        assert!(b.try_reserve(50).is_ok());
    }

    #[test]
    fn an_upstream_error_costs_nothing() {
        let b = TokenBudget::new(150, Duration::from_secs(3600));
        let m = Meter::new(
            StatusCode::TOO_MANY_REQUESTS,
            &sse_headers(),
            b.try_reserve(100).ok(),
        );
        assert_eq!(m.settle(true), None);
        assert!(b.try_reserve(150).is_ok());
    }

    #[test]
    fn usage_in_a_downloaded_file_is_not_usage() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/jsonl".parse().unwrap());
        let mut m = Meter::new(StatusCode::OK, &h, None);
        m.feed(b"{\"total_tokens\": 5}\n");
        assert_eq!(m.settle(true), None);
    }

    /// A body that yields the given chunks, one frame each.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl HttpBody for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn the_stripped_body_is_the_stream_without_its_usage_chunk() {
        use http_body_util::BodyExt;
        let content: &[u8] = b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n";
        let done: &[u8] = b"data: [DONE]\n\n";
        let chunks = [&content[..10], &content[10..], USAGE_CHUNK, done];
        let body = Chunks(chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect());
        let out = StripUsageChunk::new(body)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&out[..], [content, done].concat());
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[ -~]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// The member keygate inserts without parsing a tree gives exactly the object the
        /// client sent plus `stream_options.include_usage`, whatever the object holds and
        /// however it is spaced; a client's own `stream_options` keeps its other members.
        #[test]
        fn a_stream_asked_for_usage_is_the_clients_object_plus_include_usage(
            members in proptest::collection::btree_map("[a-z_]{1,8}", json_value(), 0..6),
            options in proptest::option::of(proptest::collection::btree_map("[a-y_]{1,8}", json_value(), 0..3)),
            pretty in proptest::prelude::any::<bool>(),
            lead in "[ \t\r\n]{0,3}",
        ) {
            let mut sent: serde_json::Map<String, Value> = members.into_iter().collect();
            sent.insert("stream".into(), Value::Bool(true));
            sent.remove("stream_options");
            if let Some(o) = &options {
                sent.insert("stream_options".into(), Value::Object(o.clone().into_iter().collect()));
            }
            let text = if pretty {
                serde_json::to_string_pretty(&sent).unwrap()
            } else {
                serde_json::to_string(&sent).unwrap()
            };
            let body = format!("{lead}{text}");
            let p = plan_request("/v1/chat/completions", body.as_bytes(), 16);
            proptest::prop_assert!(p.strip_usage_chunk);
            let got: Value = serde_json::from_slice(&p.body.unwrap()).unwrap();
            let mut want = sent.clone();
            let mut o: serde_json::Map<String, Value> = options.map(|o| o.into_iter().collect()).unwrap_or_default();
            o.insert("include_usage".to_string(), Value::Bool(true));
            want.insert("stream_options".into(), Value::Object(o));
            proptest::prop_assert_eq!(got, Value::Object(want));
        }
    }
}
