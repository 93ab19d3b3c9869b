//! Placeholders in the headers, query and body of a request through the forward proxy: whatever
//! a tool sends, `lift`, `masked` and `substitute` never panic; what the request scan is shown
//! never holds the live placeholder; and after a substitution neither a credential header nor
//! the opted-in query and body still carry it (the upstream would see a placeholder, or worse,
//! a half-replaced one).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use keygate::authenticate::CALLER_CREDENTIAL_HEADERS;
use keygate::config::{Config, Route};
use keygate::placeholder::{check_foreign, lift, substitute, Registry, Target, TOKEN_HEADERS};
use libfuzzer_sys::fuzz_target;

const REAL: &[u8] = b"REAL-credential/+=value";

struct World {
    config: Config,
    registry: Registry,
    live: String,
    other_run: String,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let text = "[secrets.k]\nsource = \"none\"\n\
            [routes.gh]\nprefix = \"/gh\"\nupstream = \"http://127.0.0.1:1\"\nsecret = \"k\"\n\
            placeholder_env = \"GITHUB_TOKEN\"\nplaceholder_in = [\"query\", \"body\"]\n\
            [routes.other]\nprefix = \"/o\"\nupstream = \"http://127.0.0.1:1\"\nsecret = \"k\"\n\
            placeholder_env = \"OTHER_TOKEN\"\n[agents.a]\n";
        let config = Config::from_text(Path::new("fuzz.toml"), text).expect("fuzz config");
        let registry = Registry::default();
        let routes: Vec<&Route> = config.routes.iter().collect();
        let live = registry
            .mint_for_run("tok_run1", "a", &routes)
            .into_iter()
            .find(|(r, _)| r == "gh")
            .expect("gh placeholder")
            .1;
        let other_run = registry
            .mint_for_run("tok_run2", "a", &routes)
            .into_iter()
            .find(|(r, _)| r == "gh")
            .expect("gh placeholder")
            .1;
        World {
            config,
            registry,
            live,
            other_run,
        }
    })
}

/// The fuzzer writes `\x01` for this run's placeholder, `\x02` for another run's, and `\x03`
/// for `Basic base64(git:<placeholder>)`, so it reaches the live paths without guessing 32
/// random characters.
fn expand(raw: &[u8], w: &World) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 64);
    for &b in raw {
        match b {
            1 => out.extend_from_slice(w.live.as_bytes()),
            2 => out.extend_from_slice(w.other_run.as_bytes()),
            3 => {
                let pair = format!("git:{}", w.live);
                out.extend_from_slice(b"Basic ");
                out.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(pair)
                        .as_bytes(),
                );
            }
            _ => out.push(b),
        }
    }
    out
}

/// Beside the credential headers, headers where a placeholder is ordinary text.
const OTHER_NAMES: [&str; 4] = ["proxy-authorization", "cookie", "x-custom", "content-type"];

fuzz_target!(|data: &[u8]| {
    let w = world();
    // Sections separated by 0xff: headers (one per line, first byte picks the name), query, body.
    let mut parts = data.split(|&b| b == 0xff);
    let head = parts.next().unwrap_or_default();
    let query = parts.next().map(|q| expand(q, w));
    let body = parts.next().map(|b| expand(b, w));

    let mut headers = HeaderMap::new();
    for line in head.split(|&b| b == b'\n') {
        let Some((&pick, value)) = line.split_first() else {
            continue;
        };
        let pick = pick as usize % (TOKEN_HEADERS.len() + OTHER_NAMES.len());
        let name = HeaderName::from_static(
            TOKEN_HEADERS
                .get(pick)
                .copied()
                .unwrap_or_else(|| OTHER_NAMES[pick - TOKEN_HEADERS.len()]),
        );
        let Ok(value) = HeaderValue::from_bytes(&expand(value, w)) else {
            continue;
        };
        headers.append(name, value);
    }

    let Ok(lifted) = lift(&mut headers, &w.registry, true) else {
        return;
    };
    // A `kgph_` glued to a word before it is text, not a placeholder (and never replaced);
    // one standing on its own is blanked for the scan.
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    for (_, shown) in lifted.masked() {
        for at in memchr::memmem::find_iter(&shown, w.live.as_bytes()) {
            assert!(
                at > 0 && word(shown[at - 1]),
                "the scan is shown a live placeholder"
            );
        }
    }
    let route = &w.config.routes[0];
    // The pipeline's order: a caller without a token, whose credential headers `authenticate`
    // strips, then the foreign-credential check, then the substitution.
    if check_foreign(route, &lifted, None, &headers).is_err() {
        return;
    }
    for name in CALLER_CREDENTIAL_HEADERS {
        headers.remove(name);
    }
    let mut query = query.and_then(|q| String::from_utf8(q).ok());
    let mut body = body.map(Bytes::from);
    let target = Target {
        headers: &mut headers,
        query: &mut query,
        body: body.as_mut(),
        max_body: 1 << 16,
    };
    if substitute(route, lifted, Some(&w.live), REAL, target).is_err() {
        return;
    }
    for name in TOKEN_HEADERS {
        for v in headers.get_all(name) {
            assert!(
                memchr::memmem::find(v.as_bytes(), w.live.as_bytes()).is_none(),
                "{name} still holds the placeholder"
            );
        }
    }
    if let Some(q) = &query {
        assert!(
            !q.contains(&w.live),
            "the query still holds the placeholder"
        );
    }
    if let Some(b) = &body {
        assert!(
            memchr::memmem::find(b, w.live.as_bytes()).is_none(),
            "the body still holds the placeholder"
        );
    }
});
