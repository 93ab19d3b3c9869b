//! The path checker and the rule matcher see raw bytes from the agent. They must never panic,
//! and an accepted path must decode to the same segments the upstream will see: no dot segment,
//! no empty segment, no slash or backslash introduced by decoding.
#![no_main]

use keygate::authorize::Rule;
use keygate::route::check_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    // The query (after the first `?`) goes to the rule matcher as the agent sent it.
    let (raw, query) = match input.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (input, None),
    };
    if let Ok(decoded) = check_path(raw) {
        assert_eq!(decoded.matches('/').count(), raw.matches('/').count());
        assert!(!decoded[1..].split('/').any(|s| s == "." || s == ".."));
        assert!(!decoded.contains("//"));
        assert!(!decoded.contains('\\') && !decoded.contains(';'));
        for rule in [
            "POST /v1/chat/completions",
            "GET /v1/files/*",
            "* /v1/**",
            "POST /v1/messages?beta",
            "GET /v1/models?",
        ] {
            let r = Rule::parse(rule).expect("fixed rules parse");
            let _ = r.matches(&http::Method::POST, &decoded, query);
        }
    }
    let _ = Rule::parse(input);
});
