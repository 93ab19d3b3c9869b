//! Throughput of the request exfiltration scan on adversarial and ordinary bodies, in MiB per
//! CPU-second of one core:
//! `cargo run --release --example scan_bench [KiB] [name filter] [refuse|stream]` (default 1024,
//! every input, both modes; one mode is for profiling).
//!
//! "refuse" is what a refusing route does with a body read whole (strong and generic finds);
//! "stream/64" is what a redacting route does: the body pushed through the stream redactor in
//! 64-byte chunks (the worst case for re-checking held bytes). Adversarial inputs pack detector
//! anchors as densely as they go, each with a window that reaches far.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use keygate::redact::Redactor;

fn repeat(unit: &str, len: usize) -> Vec<u8> {
    unit.as_bytes().iter().copied().cycle().take(len).collect()
}

fn inputs(len: usize) -> Vec<(&'static str, Vec<u8>)> {
    let dashes = "-".repeat(5);
    let ordinary = concat!(
        r#"{"role":"user","content":"const apiKey = process.env.OPENAI_API_KEY;\nfetch(url, "#,
        r#"{ headers: { Authorization: `Bearer ${apiKey}` } })\n// next page: ?page_token=CAUQAA"#,
        r#"&limit=10 and max_tokens=400 tokens are counted\n"},{"role":"assistant","content":"Th"#,
        r#"e build uses sha512-3pHRtqXw/fKq== integrity hashes; commit 9fceb02d0ae598e95dc970b74"#,
        r#"767f19372d61af8 fixed it. password = os.environ[\"DB_PASSWORD\"]\n"},"#
    );
    vec![
        ("authorization=a1 repeated", repeat("authorization=a1", len)),
        (
            "Authorization: Basic repeated",
            repeat(&["Authorization: Basic ", "QWxhZGRpbjpvcGVu"].concat(), len),
        ),
        ("pwd=aA1aA1aA1a repeated", repeat("pwd=aA1aA1aA1a", len)),
        ("token: Zx9 repeated", repeat("token: Zx9!", len)),
        ("-sk-a repeated", repeat("-sk-a", len)),
        ("sk-ant- repeated", repeat("sk-ant-", len)),
        ("eyJ- repeated", repeat("eyJ-", len)),
        (
            "eyJ part. repeated",
            repeat(&["eyJabcdefgh.", "eyJabcdefgh."].concat(), len),
        ),
        (
            "AKIA repeated",
            repeat(&[" AKIA", "ABCDEFGHIJKLMNOP,"].concat(), len),
        ),
        (
            "secret_access_key= repeated",
            repeat("secret_access_key=", len),
        ),
        ("ghp_ repeated", repeat("-ghp_", len)),
        (
            "BEGIN PRIVATE KEY, no END",
            repeat(&format!("{dashes}BEGIN RSA PRIVATE KEY{dashes}\n"), len),
        ),
        ("one line, no newline", repeat("password ", len)),
        ("ordinary agent JSON", repeat(ordinary, len)),
        (
            "random bytes",
            (0..len as u64)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
    ]
}

/// This thread's CPU time in seconds (`/proc/thread-self/schedstat`), so that other work on a
/// shared machine does not count; wall-clock time where that file is missing.
fn cpu_seconds(wall: Instant) -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or_else(|| wall.elapsed().as_secs_f64(), |ns| ns as f64 / 1e9)
}

/// Best of a few runs, in MiB per CPU-second.
fn mibs(len: usize, mut f: impl FnMut() -> usize) -> f64 {
    let mut best = f64::MAX;
    let wall = Instant::now();
    for _ in 0..3 {
        let t = cpu_seconds(wall);
        black_box(f());
        best = best.min(cpu_seconds(wall) - t);
    }
    len as f64 / (1 << 20) as f64 / best.max(1e-9)
}

fn main() {
    let kib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let only = std::env::args().nth(2).unwrap_or_default();
    let mode = std::env::args().nth(3).unwrap_or_default();
    let len = kib << 10;
    let mut b = Redactor::builder().detectors(true);
    for i in 0..4 {
        let value = format!("held-secret-{i:02}-{}", "Zq9".repeat(12));
        b = b.known(&format!("key#{i}"), value.as_bytes());
    }
    let all = Arc::new(b.build());
    let strong = {
        let mut b = Redactor::builder().detector_set(keygate::redact::DetectorSet::class(
            keygate::redact::Class::Strong,
        ));
        for i in 0..4 {
            let value = format!("held-secret-{i:02}-{}", "Zq9".repeat(12));
            b = b.known(&format!("key#{i}"), value.as_bytes());
        }
        Arc::new(b.build())
    };
    println!("input ({kib} KiB each)               refuse MiB/s   stream/64 MiB/s");
    for (name, input) in inputs(len) {
        if !name.contains(only.as_str()) {
            continue;
        }
        let refuse = if mode == "stream" {
            0.0
        } else {
            mibs(len, || {
                let (s, g) = keygate::scan::labels(&strong, &input);
                s.len() + g.len()
            })
        };
        let stream = if mode == "refuse" {
            0.0
        } else {
            mibs(len, || {
                let mut s = Arc::clone(&all).stream();
                let mut n = 0;
                for chunk in input.chunks(64) {
                    n += s.push(chunk).len();
                }
                n + s.finish().len()
            })
        };
        println!("{name:<36} {refuse:>12.0} {stream:>16.0}");
    }
}
