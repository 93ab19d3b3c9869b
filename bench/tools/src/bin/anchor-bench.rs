//! The detectors' anchor search alone (issue 13): aho-corasick over the 52 anchor literals
//! (Fat Teddy prefilter), the packed searcher over the same, and the packed searcher over at
//! most 32 three-byte triggers (Slim Teddy) with the literals checked around each candidate.
//! Same corpus as redact-bench, with and without `tokens` (a keyword anchor); GiB/s per
//! CPU-second of the measuring thread, best of 9 batches. `taskset -c 1 anchor-bench`.
#![allow(clippy::unwrap_used)]
use aho_corasick::{AhoCorasick, AhoCorasickKind, Input, MatchKind};
use std::hint::black_box;

fn corpus(len: usize, tokens: bool) -> Vec<u8> {
    let mut words = vec![
        "the", "model", "returned", "a", "response", "with", "several", "tokens", "and", "this",
        "is", "about", "function", "call", "arguments", "value", "request", "content",
        "assistant", "user", "of", "to", "in", "for", "data", "stream", "choices", "delta",
        "index", "finish", "reason", "stop",
    ];
    if !tokens {
        words[7] = "words";
    }
    let mut out = Vec::with_capacity(len + 256);
    let mut x: u64 = 0x9E3779B97F4A7C15;
    while out.len() < len {
        out.extend_from_slice(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"");
        for _ in 0..12 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(words[(x % 32) as usize].as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(b"\"}}]}\n\n");
    }
    out.truncate(len);
    out
}

fn spell(k: &str) -> Vec<String> {
    let l = k.to_ascii_lowercase();
    let mut t = l.clone().into_bytes();
    t[0] = t[0].to_ascii_uppercase();
    vec![l.clone(), String::from_utf8(t).unwrap(), l.to_ascii_uppercase()]
}

fn literals() -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for k in ["secret", "authorization", "password", "passwd", "pwd", "token", "api_key", "apikey", "api-key"] {
        v.extend(spell(k));
    }
    v.extend(["apiKey", "APIKey", "ApiKey"].map(String::from));
    for t in ["sk-", "ghp_", "gho_", "ghs_", "ghu_", "ghr_", "github_pat_", "AKIA", "ASIA", "xoxb-", "xoxp-",
        "xoxa-", "xoxr-", "xoxs-", "xoxe-", "xapp-", "AIza", "sk_live_", "rk_live_", "kg_", "eyJ", "-----BEGIN"] {
        v.push(t.into());
    }
    v.sort();
    v.dedup();
    v
}

fn cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass and has no other effect.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn time(name: &str, body: &[u8], f: impl Fn(&[u8]) -> usize) {
    let mut best = f64::MAX;
    let mut n = 0;
    for _ in 0..9 {
        let t = cpu_s();
        for _ in 0..20 {
            n = black_box(f(black_box(body)));
        }
        best = best.min((cpu_s() - t) / 20.0);
    }
    println!("{name:40} {:6.2} GiB/s  hits {n}", body.len() as f64 / best / (1u64 << 30) as f64);
}

fn main() {
    let lits = literals();
    eprintln!("{} literals", lits.len());
    let full = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostFirst)
        .kind(Some(AhoCorasickKind::DFA))
        .build(&lits)
        .unwrap();
    // Triggers: 3 bytes at an offset per literal, fewer distinct.
    let mut trig: Vec<(String, usize)> = Vec::new();
    for l in &lits {
        let b = l.as_bytes();
        let at = [("secret", 1), ("authorization", 1), ("password", 2), ("passwd", 2), ("token", 1), ("apikey", 1)]
            .iter()
            .find(|(k, _)| l.eq_ignore_ascii_case(k) && !b[1..].iter().any(|c| c.is_ascii_uppercase()))
            .map_or(0, |x| x.1);
        let (t, off) = (l[at..at + 3].to_string(), at);
        trig.push((t, off));
    }
    let mut distinct: Vec<String> = trig.iter().map(|t| t.0.clone()).collect();
    distinct.sort();
    distinct.dedup();
    eprintln!("{} triggers: {:?}", distinct.len(), distinct);
    let slim = aho_corasick::packed::Config::new()
        .match_kind(aho_corasick::packed::MatchKind::LeftmostFirst)
        .builder()
        .extend(&distinct)
        .build()
        .unwrap();
    let fatp = aho_corasick::packed::Config::new()
        .match_kind(aho_corasick::packed::MatchKind::LeftmostFirst)
        .builder()
        .extend(&lits)
        .build()
        .unwrap();
    for tokens in [true, false] {
        let body = corpus(1 << 20, tokens);
        println!("-- corpus with tokens: {tokens}");
        time("AhoCorasick DFA 52, restart", &body, |b| {
            let mut n = 0;
            let mut from = 0;
            while let Some(m) = full.find(Input::new(b).range(from..)) {
                n += 1;
                from = m.start() + 1;
            }
            n
        });
        time("packed 52 (fat), restart", &body, |b| {
            let mut n = 0;
            let mut from = 0;
            while let Some(m) = fatp.find_in(b, aho_corasick::Span::from(from..b.len())) {
                n += 1;
                from = m.start() + 1;
            }
            n
        });
        time("packed triggers (slim), restart", &body, |b| {
            let mut n = 0;
            let mut from = 0;
            while let Some(m) = slim.find_in(b, aho_corasick::Span::from(from..b.len())) {
                n += 1;
                from = m.start() + 1;
            }
            n
        });
    }
}
