//! Redaction engine throughput (an equivalent of a criterion bench, with JSON output).
//!
//! Cases: body size 1 MiB and 64 KiB; without matches and with matches (a held secret every
//! ~16 KiB); whole-buffer `Redactor::redact` and streamed `StreamRedactor::push` in 16 KiB chunks
//! (how a proxied body arrives); detectors on (what keygate runs on responses). Reports the median
//! of repeated timed batches, in GiB/s of input per CPU-second of the measuring thread (thread CPU
//! time, so that other processes on a loaded machine do not count; the harness also pins it).
//!
//! Two engines: 3 held secrets (the usual deployment) and 50 (issue 13's many-secrets point, about
//! 600 spellings: past aho-corasick's SIMD prefilter limit).
#![allow(clippy::unwrap_used)]
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::redact::Redactor;
use keygate_bench_tools::Args;

/// Key-shaped test values, split with `concat!` so the repository's own `keygate redact --check`
/// finds no credential literal in its source.
const SECRETS: [(&str, &str); 3] = [
    (
        "openai",
        concat!(
            "sk-",
            "proj-Bx7Qm2Lr9Tz4Wn8Kc3Vh6Yd1Fp5Gs0Ja7Ue2Io9Rb4Nt8Mw3Xe6Zq1"
        ),
    ),
    (
        "anthropic",
        concat!(
            "sk-",
            "ant-api03-Hq3Lx8Ve2Nb7Wz1Kt6Rc9Ym4Fd0Sp5Gj2Ua7Io3Xn8Qb1Mv6Zt4-AbCdEf"
        ),
    ),
    (
        "github",
        concat!("ghp", "_Za8Kq3Wm7Xr2Tn6Vb1Lc5Yh9Pd4Fs0Gj7Ue2"),
    ),
];

/// 50 key-shaped values built at run time: provider-like prefixes and lengths (20 to 164 bytes,
/// as AWS key ids, GitHub, Slack, Anthropic and OpenAI keys have), random base62 bodies.
fn many_secrets() -> Vec<(String, String)> {
    const SHAPES: [(&str, usize); 10] = [
        ("AKIA", 20),
        ("glpat-", 26),
        ("hf_", 37),
        ("ghp_", 40),
        ("", 40),
        ("xoxb-", 55),
        ("sk-", 56),
        ("AIza", 39),
        ("sk-ant-api03-", 108),
        ("sk-proj-", 164),
    ];
    const B62: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x: u64 = 0x2545F4914F6CDD1D;
    (0..50)
        .map(|i| {
            let (prefix, len) = SHAPES[i % SHAPES.len()];
            let mut v = prefix.to_string();
            while v.len() < len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(B62[(x % 62) as usize] as char);
            }
            (format!("key{i}"), v)
        })
        .collect()
}

/// Deterministic, realistic-looking text: JSON-ish completion chunks made of common words.
fn corpus(len: usize) -> Vec<u8> {
    const WORDS: [&str; 32] = [
        "the",
        "model",
        "returned",
        "a",
        "response",
        "with",
        "several",
        "tokens",
        "and",
        "this",
        "is",
        "about",
        "function",
        "call",
        "arguments",
        "value",
        "request",
        "content",
        "assistant",
        "user",
        "of",
        "to",
        "in",
        "for",
        "data",
        "stream",
        "choices",
        "delta",
        "index",
        "finish",
        "reason",
        "stop",
    ];
    let mut out = Vec::with_capacity(len + 256);
    let mut x: u64 = 0x9E3779B97F4A7C15;
    while out.len() < len {
        out.extend_from_slice(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"");
        for _ in 0..12 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(WORDS[(x % 32) as usize].as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(b"\"}}]}\n\n");
    }
    out.truncate(len);
    out
}

fn with_matches(mut body: Vec<u8>, secrets: &[(String, String)]) -> Vec<u8> {
    let mut at = 1000;
    let mut i = 0;
    while at + 200 < body.len() {
        let s = secrets[i % secrets.len()].1.as_bytes();
        body[at..at + s.len()].copy_from_slice(s);
        at += 16 * 1024;
        i += 1;
    }
    body
}

/// CPU time of this thread: on a machine loaded by others, wall time counts their turns too.
fn cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass and has no other effect.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn measure(min_time: Duration, bytes: usize, mut f: impl FnMut()) -> (f64, usize) {
    // warm up, then size a batch to ~10 ms
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < Duration::from_millis(20) || n < 2 {
        f();
        n += 1;
    }
    let per = t.elapsed().as_secs_f64() / n as f64;
    let batch = ((0.01 / per) as usize).max(1);
    let mut rates = Vec::new();
    let start = Instant::now();
    while start.elapsed() < min_time || rates.len() < 5 {
        let t = cpu_s();
        for _ in 0..batch {
            f();
        }
        let s = cpu_s() - t;
        rates.push((bytes * batch) as f64 / s / (1u64 << 30) as f64);
    }
    rates.sort_by(f64::total_cmp);
    (rates[rates.len() / 2], rates.len() * batch)
}

fn main() {
    let args = Args::from_env();
    let min_time = Duration::from_millis(args.num("ms", 1000));
    let detectors = !args.has("no-detectors");
    let few: Vec<(String, String)> = SECRETS
        .iter()
        .map(|(l, v)| (l.to_string(), v.to_string()))
        .collect();
    let mut rows = Vec::new();
    let only: usize = args.num("secrets", 0);
    // `--only-whole` / `--only-stream`: one entry point, for a profile of it alone.
    let (do_whole, do_stream) = (!args.has("only-stream"), !args.has("only-whole"));
    for secrets in [few, many_secrets()] {
        if only != 0 && secrets.len() != only {
            continue;
        }
        let mut b = Redactor::builder();
        for (label, v) in &secrets {
            b = b.known(label, v.as_bytes());
        }
        let t = Instant::now();
        let engine = Arc::new(b.detectors(detectors).build());
        let build_ms = t.elapsed().as_secs_f64() * 1e3;
        for (size_label, size) in [("1MiB", 1usize << 20), ("64KiB", 64usize << 10)] {
            for matches in [false, true] {
                let body = if matches {
                    with_matches(corpus(size), &secrets)
                } else {
                    corpus(size)
                };
                let found = engine.find(&body).len();
                let (whole, iters_w) = if do_whole {
                    measure(min_time, size, || {
                        black_box(engine.redact(black_box(&body)));
                    })
                } else {
                    (0.0, 0)
                };
                let (streamed, iters_s) = if do_stream {
                    measure(min_time, size, || {
                        let mut s = engine.clone().stream();
                        for chunk in body.chunks(16 * 1024) {
                            black_box(s.push(black_box(chunk)));
                        }
                        black_box(s.finish());
                    })
                } else {
                    (0.0, 0)
                };
                let row = serde_json::json!({
                    "secrets": secrets.len(), "build_ms": build_ms,
                    "size": size_label, "bytes": size, "matches": matches, "findings": found,
                    "detectors": detectors,
                    "whole_gib_s": whole, "stream_gib_s": streamed,
                    "iterations": iters_w + iters_s,
                });
                eprintln!("{row}");
                rows.push(row);
            }
        }
    }
    println!("{}", serde_json::Value::Array(rows));
}
