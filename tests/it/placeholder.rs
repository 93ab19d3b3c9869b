//! Placeholders through the real binary: `keygate run` hands the agent `kgph_…` placeholders
//! (never the key), keygate replaces them with the real credential on the way out, refuses a
//! foreign token and an ended run's placeholder, and leaves ordinary text alone.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::support::{full, keygate, upstream, Keygate, Upstream};

/// The provider key keygate holds, built at run time (the self-check refuses literal keys).
fn real_key() -> String {
    format!("ghp_{}", "PlaceholderTestKey0".repeat(2))
}

/// A foreign real token the agent might send; never forwarded.
fn foreign_key() -> String {
    format!("ghp_{}", "ForeignAgentToken00".repeat(2))
}

/// keygate with two placeholder routes in front of an upstream that echoes the request body.
async fn setup() -> (Upstream, Keygate) {
    let up = upstream(Arc::new(|req| {
        http::Response::new(full(String::from_utf8_lossy(req.body()).into_owned()))
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\naudit_log = \"AUDIT\"\nstate_dir = \"{state}\"\n\
         [secrets.gh]\nsource = \"env\"\nname = \"GH_REAL\"\n\
         [routes.gh]\nprefix = \"/gh\"\nupstream = \"http://{addr}\"\nsecret = \"gh\"\n\
         allow = [\"GET /user\", \"POST /echo\"]\nplaceholder_env = \"GITHUB_TOKEN\"\n\
         [routes.gh.env]\nKEYGATE_TOKEN = \"{{token}}\"\nGH_URL = \"{{base_url}}\"\n\
         [routes.api]\nprefix = \"/api\"\nupstream = \"http://{addr}\"\nsecret = \"gh\"\n\
         inject = \"header:x-custom-key\"\nallow = [\"POST /items\"]\nquery = [\"key\"]\n\
         placeholder_env = \"API_TOKEN\"\nplaceholder_in = [\"query\", \"body\"]\n\
         [routes.api.env]\nAPI_URL = \"{{base_url}}\"\n\
         [agents.coder]\n",
        state = dir.path().join("state").display(),
        addr = up.addr
    );
    let audit = dir.path().join("audit.jsonl");
    let kg = Keygate::start_with_audit(&config, &[("GH_REAL", &real_key())], dir, audit);
    (up, kg)
}

/// `keygate run --no-sandbox -- sh -c SCRIPT` in `cwd`, killed (whole group) after 25 s.
fn run_agent(kg: &Keygate, script: &str, cwd: &Path, env: &[(&str, &str)]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut c = keygate();
    c.args(["run", "--no-sandbox", "--config"])
        .arg(kg.dir.path().join("keygate.toml"))
        .args(["--", "sh", "-c", script])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c.spawn().unwrap();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let deadline = Instant::now() + Duration::from_secs(25);
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-9", "--", &format!("-{pid}")])
                .status();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    waiter.join().unwrap()
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Everything under `dir`, as text: what the agent could read or keep.
fn all_files(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    out
}

fn basic(pair: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_gets_placeholders_that_reach_the_upstream_as_the_real_key_in_each_spelling() {
    let (up, kg) = setup().await;
    let work = tempfile::tempdir().unwrap();
    // The agent's tools: git-style Basic with no keygate token (the placeholder identifies the
    // run), GitHub's `token` scheme, a query and a JSON body on the opted-in route.
    let script = r#"
        env > env.txt
        printf %s "$GITHUB_TOKEN" > ph.txt
        curl -s -o basic.txt -w '%{http_code}' -u "x-access-token:$GITHUB_TOKEN" "$GH_URL/user" > basic.code
        curl -s -o scheme.txt -w '%{http_code}' -H "Authorization: token $GITHUB_TOKEN" "$GH_URL/user" > scheme.code
        curl -s -o api.txt -w '%{http_code}' -H "X-Broker-Token: $KEYGATE_TOKEN" \
             -H 'content-type: application/json' -d "{\"key\":\"$API_TOKEN\"}" \
             "$API_URL/items?key=$API_TOKEN" > api.code
    "#;
    let out = run_agent(&kg, script, work.path(), &[("GITHUB_TOKEN", "user-value")]);
    assert!(out.status.success(), "{out:?}");
    let ph = read(work.path(), "ph.txt");
    assert!(ph.starts_with("kgph_gh_"), "GITHUB_TOKEN was {ph:?}");
    for code in ["basic.code", "scheme.code", "api.code"] {
        assert_eq!(read(work.path(), code), "200", "{code}");
    }
    let key = real_key();
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[0].headers["authorization"],
        basic(&format!("x-access-token:{key}")).as_str()
    );
    assert_eq!(
        seen[1].headers["authorization"],
        format!("token {key}").as_str()
    );
    // The api route: its inject header carries the key, and the query and body too.
    assert_eq!(seen[2].headers["x-custom-key"], key.as_str());
    assert_eq!(seen[2].uri, format!("/items?key={key}"));
    assert_eq!(
        &seen[2].body[..],
        format!("{{\"key\":\"{key}\"}}").as_bytes()
    );
    // The agent's environment, files and answers (the body echoed the key) hold no key.
    let agent_side = all_files(work.path());
    assert!(!agent_side.contains(&key), "the agent saw the key");
    assert!(agent_side.contains("kgph_api_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_token_is_refused_with_placeholder_mismatch_and_never_forwarded() {
    let (up, kg) = setup().await;
    let work = tempfile::tempdir().unwrap();
    let script = r#"
        curl -s -o bearer.txt -w '%{http_code}' -H "X-Broker-Token: $KEYGATE_TOKEN" \
             -H "Authorization: Bearer $FOREIGN" "$GH_URL/user" > bearer.code
        curl -s -o private.txt -w '%{http_code}' -H "X-Broker-Token: $KEYGATE_TOKEN" \
             -H "PRIVATE-TOKEN: $FOREIGN" "$GH_URL/user" > private.code
        curl -s -o inject.txt -w '%{http_code}' -H "X-Broker-Token: $KEYGATE_TOKEN" \
             -H "x-custom-key: $FOREIGN" -d '{}' "$API_URL/items" > inject.code
        curl -s -o mixed.txt -w '%{http_code}' -H "PRIVATE-TOKEN: $GITHUB_TOKEN" \
             -H "Authorization: Bearer $FOREIGN" "$GH_URL/user" > mixed.code
        curl -s -o other.txt -w '%{http_code}' -H "Authorization: Bearer $API_TOKEN" \
             "$GH_URL/user" > other.code
    "#;
    let foreign = foreign_key();
    let out = run_agent(&kg, script, work.path(), &[("FOREIGN", &foreign)]);
    assert!(out.status.success(), "{out:?}");
    for name in ["bearer", "private", "inject", "mixed", "other"] {
        assert_eq!(read(work.path(), &format!("{name}.code")), "403", "{name}");
        assert!(
            read(work.path(), &format!("{name}.txt")).contains("placeholder_mismatch"),
            "{name}"
        );
    }
    assert!(
        up.seen.lock().unwrap().is_empty(),
        "a refused request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholder_of_an_ended_run_is_refused_and_kgph_text_in_a_body_not_opted_in_passes() {
    let (up, kg) = setup().await;
    let work = tempfile::tempdir().unwrap();
    // Benign: `kgph_`-like text (even the live placeholder) in a body of a route that did not
    // opt in is the agent's text: forwarded untouched, not refused, not redacted on the way back.
    let script = r#"
        printf %s "$GITHUB_TOKEN" > ph.txt
        printf '{"note":"kgph_gh_NotAPlaceholder0123456789abcdefXYZ","mine":"%s"}' "$GITHUB_TOKEN" > sent.json
        curl -s -o echo.txt -w '%{http_code}' -H "X-Broker-Token: $KEYGATE_TOKEN" \
             -H 'content-type: application/json' --data-binary @sent.json "$GH_URL/echo" > echo.code
    "#;
    let out = run_agent(&kg, script, work.path(), &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(read(work.path(), "echo.code"), "200");
    let sent = read(work.path(), "sent.json");
    assert_eq!(read(work.path(), "echo.txt"), sent);
    assert_eq!(
        &up.seen.lock().unwrap()[0].body[..],
        sent.as_bytes(),
        "the body went upstream changed"
    );
    // The run ended with its command: its placeholder is dead.
    let ph = read(work.path(), "ph.txt");
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-u"])
        .arg(format!("x-access-token:{ph}"))
        .arg(format!("{}/gh/user", kg.url))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("\n403"), "{text}");
    assert!(text.contains("placeholder_mismatch"), "{text}");
    assert_eq!(up.seen.lock().unwrap().len(), 1);
}

/// Through the forward proxy: `keygate run` sets HTTPS_PROXY (the run's token as proxy
/// credentials) and the CA variables, and the agent's tools send only the placeholder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_through_the_proxy_send_placeholders_and_the_tls_upstream_sees_the_real_key() {
    use crate::forward_proxy::{tls_upstream, HOST};
    let up = tls_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, &up.ca_pem).unwrap();
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\nproxy_listen = [\"127.0.0.1:0\"]\naudit_log = \"AUDIT\"\n\
         state_dir = \"{state}\"\n\
         [secrets.gh]\nsource = \"env\"\nname = \"GH_REAL\"\n\
         [routes.gh]\nhost = \"{HOST}\"\nupstream = \"https://127.0.0.1:{port}\"\n\
         upstream_ca = \"{ca}\"\nsecret = \"gh\"\nallow = [\"GET /user\"]\n\
         placeholder_env = \"GITHUB_TOKEN\"\n\
         [agents.coder]\n",
        state = dir.path().join("state").display(),
        port = up.port,
        ca = ca_file.display(),
    );
    let audit = dir.path().join("audit.jsonl");
    let kg = Keygate::start_with_audit(&config, &[("GH_REAL", &real_key())], dir, audit);
    let work = tempfile::tempdir().unwrap();
    // curl and Python's urllib read HTTPS_PROXY and the CA variables keygate run sets.
    let script = format!(
        r#"
        env > env.txt
        curl -s -o curl.txt -w '%{{http_code}}' -u "x-access-token:$GITHUB_TOKEN" https://{HOST}/user > curl.code
        curl -s -o foreign.txt -w '%{{http_code}}' -H "Authorization: Bearer $FOREIGN" https://{HOST}/user > foreign.code
        python3 -c 'import os, urllib.request as u
r = u.Request("https://{HOST}/user", headers={{"Authorization": "Bearer " + os.environ["GITHUB_TOKEN"]}})
print(u.urlopen(r, timeout=10).status)' > py.code 2> py.err
    "#
    );
    let foreign = foreign_key();
    let out = run_agent(&kg, &script, work.path(), &[("FOREIGN", &foreign)]);
    assert!(out.status.success(), "{out:?}");
    let env = read(work.path(), "env.txt");
    assert!(env.contains("HTTPS_PROXY=http://keygate:kg_"), "{env}");
    assert_eq!(read(work.path(), "curl.code"), "200");
    assert_eq!(
        read(work.path(), "py.code").trim(),
        "200",
        "{}",
        read(work.path(), "py.err")
    );
    assert_eq!(read(work.path(), "foreign.code"), "403");
    assert!(read(work.path(), "foreign.txt").contains("placeholder_mismatch"));
    let key = real_key();
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            basic(&format!("x-access-token:{key}")),
            format!("Bearer {key}")
        ],
        "the upstream saw the real key, and nothing of the refused request"
    );
    assert!(
        !all_files(work.path()).contains(&key),
        "the agent saw the key"
    );
    // The run's CA bundle and git/AWS files are gone with the run.
    let bundle = env
        .lines()
        .find_map(|l| l.strip_prefix("SSL_CERT_FILE="))
        .unwrap()
        .to_string();
    assert!(!Path::new(&bundle).exists(), "{bundle} outlived the run");
}
