//! The SSE-aware response redactor (it joins the text deltas of OpenAI and Anthropic streams)
//! must never panic on any event stream, in any chunking, and must never let a held value out
//! whole. The first bytes of the input choose the chunk sizes.
#![no_main]

use std::sync::{Arc, OnceLock};

use keygate::redact::Redactor;
use libfuzzer_sys::fuzz_target;

const HELD: &[u8] = b"fuzz-held-secret-value/+=";

fn redactor() -> Arc<Redactor> {
    static R: OnceLock<Arc<Redactor>> = OnceLock::new();
    Arc::clone(R.get_or_init(|| {
        Arc::new(
            Redactor::builder()
                .known("held#1", HELD)
                .detectors(true)
                .build(),
        )
    }))
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let cuts = usize::from(n % 8);
    if rest.len() < cuts {
        return;
    }
    let (sizes, input) = rest.split_at(cuts);
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    let mut stream = redactor().response_stream(&headers);
    let mut out = Vec::new();
    let mut at = 0;
    for &s in sizes {
        let end = (at + usize::from(s)).min(input.len());
        out.extend_from_slice(&stream.push(&input[at..end]));
        at = end;
    }
    out.extend_from_slice(&stream.push(&input[at..]));
    out.extend_from_slice(&stream.finish());
    assert!(
        !out.windows(HELD.len()).any(|w| w == HELD),
        "a held value went out whole"
    );
});
