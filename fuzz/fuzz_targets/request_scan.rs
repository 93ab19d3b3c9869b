//! The request exfiltration scan reads every byte an agent sends: any input must give findings
//! inside the input, without a panic, and the same findings whole as the redactor acts on.
#![no_main]

use std::sync::OnceLock;

use keygate::redact::Redactor;
use libfuzzer_sys::fuzz_target;

fn scanner() -> &'static Redactor {
    static R: OnceLock<Redactor> = OnceLock::new();
    R.get_or_init(|| {
        Redactor::builder()
            .known("held#1", b"fuzz-held-secret-value/+=")
            .known("held#2", b"0123456789abcdef0123")
            .detectors(true)
            .build()
    })
}

fuzz_target!(|data: &[u8]| {
    let s = scanner();
    let found = s.find(data);
    for f in &found {
        assert!(f.offset + f.len <= data.len(), "finding outside the input");
    }
    let redacted = s.redact(data);
    assert_eq!(
        found.is_empty(),
        matches!(redacted, std::borrow::Cow::Borrowed(_)),
        "find and redact disagree"
    );
});
