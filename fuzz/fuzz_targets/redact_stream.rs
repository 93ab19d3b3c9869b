//! Streamed redaction must equal whole-buffer redaction for any input and any chunking, and
//! must never panic. The first bytes of the fuzz input choose the chunk sizes.
#![no_main]

use std::sync::{Arc, OnceLock};

use keygate::redact::Redactor;
use libfuzzer_sys::fuzz_target;

fn redactor() -> Arc<Redactor> {
    static R: OnceLock<Arc<Redactor>> = OnceLock::new();
    Arc::clone(R.get_or_init(|| {
        Arc::new(
            Redactor::builder()
                .known("held#1", b"fuzz-held-secret-value/+=")
                .known("held#2", b"0123456789abcdef0123")
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
    let r = redactor();
    let whole = r.redact(input).into_owned();
    let mut stream = Arc::clone(&r).stream();
    let mut out = Vec::new();
    let mut at = 0;
    for (i, &s) in sizes.iter().enumerate() {
        let end = (at + usize::from(s)).min(input.len());
        // Both entry points, in turn: `push_bytes` may answer with a slice of its chunk.
        if i % 2 == 0 {
            out.extend_from_slice(&stream.push(&input[at..end]));
        } else {
            let chunk = bytes::Bytes::copy_from_slice(&input[at..end]);
            out.extend_from_slice(&stream.push_bytes(&chunk));
        }
        at = end;
    }
    out.extend_from_slice(&stream.push(&input[at..]));
    out.extend_from_slice(&stream.finish());
    assert_eq!(out, whole);
});
