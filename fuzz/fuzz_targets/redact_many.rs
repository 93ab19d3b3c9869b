//! With many held secrets (past aho-corasick's SIMD limit, so the skip search of
//! `redact/many.rs` runs), streamed redaction must equal whole-buffer redaction for any input
//! and chunking, and no held value may survive in the output. The held values share a small
//! alphabet and long prefixes, and some are prefixes of others, so inputs near them are cheap
//! for the fuzzer to find. The first bytes of the fuzz input choose the chunk sizes.
#![no_main]

use std::sync::{Arc, OnceLock};

use keygate::redact::Redactor;
use libfuzzer_sys::fuzz_target;

/// 50 values over `qwxz-`: a 48-byte stem cut at different lengths and mutated in one place.
fn held() -> &'static [Vec<u8>] {
    static H: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    H.get_or_init(|| {
        let stem: Vec<u8> = (0..48u32)
            .map(|i| b"qwxz-"[((i * 7 + i / 3) % 5) as usize])
            .collect();
        (0..50usize)
            .map(|i| {
                let mut v = stem[..8 + (i * 13) % 41].to_vec();
                if i % 3 != 0 {
                    let at = (i * 5) % v.len();
                    v[at] = b"qwxz-"[i % 5];
                }
                v
            })
            .collect()
    })
}

fn redactor() -> Arc<Redactor> {
    static R: OnceLock<Arc<Redactor>> = OnceLock::new();
    Arc::clone(R.get_or_init(|| {
        let mut b = Redactor::builder().detectors(true);
        for (i, v) in held().iter().enumerate() {
            b = b.known(&format!("m#{i}"), v);
        }
        Arc::new(b.build())
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
    for v in held() {
        assert!(
            !whole.windows(v.len()).any(|w| w == v.as_slice()),
            "a held value survived redaction"
        );
    }
    let mut stream = Arc::clone(&r).stream();
    let mut out = Vec::new();
    let mut at = 0;
    for &s in sizes {
        let end = (at + usize::from(s)).min(input.len());
        out.extend_from_slice(&stream.push(&input[at..end]));
        at = end;
    }
    out.extend_from_slice(&stream.push(&input[at..]));
    out.extend_from_slice(&stream.finish());
    assert_eq!(out, whole);
});
