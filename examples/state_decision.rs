//! Hand-run cost of a budget decision: keygate's in-memory check (what the request path does)
//! against an atomic check-and-charge in the SQLite state store (what a request path that wrote
//! through to disk would do), and the write-behind save that keygate runs once a second instead:
//! `cargo run --release --example state_decision`. With `KEYGATE_BENCH_REDIS=redis://…` it also
//! times the shared store's decision (one Lua round trip to book, one to settle) on that server.

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use keygate::config::Config;
use keygate::state::{self, Spent};

const N: u32 = 20_000;

fn main() {
    let dir = tempfile_dir();
    let store = state::open(&dir).expect("state store");
    let text = "[agents.coder]\nbudget_tokens = { per = \"day\", limit = 1000000000 }\n";
    let config = Config::from_text(Path::new("bench.toml"), text).expect("config");
    let policy = keygate::authorize::Policy::new(&config);

    // `reserve` is async (a shared store decides over the network); in memory it never waits.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let t = Instant::now();
    for _ in 0..N {
        let booked = rt
            .block_on(policy.reserve(&config, keygate::config::AgentId(0), 1))
            .expect("reserve");
        if let Some(r) = booked {
            r.settle(1);
        }
    }
    report("in-memory reserve + settle (the request path)", t, N);

    let t = Instant::now();
    for _ in 0..N / 10 {
        black_box(store.charge("coder", 1, 1_000_000_000, 1).expect("charge"));
    }
    report("SQLite check-and-charge (one transaction)", t, N / 10);

    let spent = vec![Spent {
        agent: "coder".into(),
        window_start: 1,
        tokens: 42,
    }];
    let t = Instant::now();
    for _ in 0..N / 10 {
        store.save_spent(&spent).expect("save");
    }
    report("write-behind save (once a second in keygate)", t, N / 10);
    let _ = std::fs::remove_dir_all(&dir);

    if let Ok(url) = std::env::var("KEYGATE_BENCH_REDIS") {
        let text = format!(
            "instance = \"bench\"\nstate = {{ backend = \"redis\", url = \"{url}\" }}\n{text}"
        );
        let config = Config::from_text(Path::new("bench.toml"), &text).expect("config");
        let store = state::open_configured(&config)
            .expect("redis store")
            .expect("a store");
        let policy = keygate::authorize::Policy::new(&config).shared(Some(&store), &config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let t = Instant::now();
        for _ in 0..N / 10 {
            rt.block_on(async {
                let booked = policy
                    .reserve(&config, keygate::config::AgentId(0), 1)
                    .await
                    .expect("reserve");
                if let Some(r) = booked {
                    r.settle(1);
                }
            });
        }
        report("Redis reserve (Lua), settle sent behind", t, N / 10);
    }
}

fn report(what: &str, t: Instant, n: u32) {
    let per = t.elapsed() / n;
    println!("{what:<48} {:>10.2} µs/op", per.as_secs_f64() * 1e6);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("keygate-state-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
