//! `keygate run`: the per-run token, the agent's environment, the lease, the exit status, the
//! sandbox and keygate's own memory, through the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{full, keygate, upstream, Keygate};

/// A provider key built at run time (the repository self-check refuses literal key shapes).
fn provider_key() -> String {
    format!("sk-{}", "launchertestkey".repeat(3))
}

async fn setup(extra: &str) -> (crate::support::Upstream, Keygate, PathBuf) {
    let up = upstream(Arc::new(|_| {
        http::Response::new(full(r#"{"ok":"from upstream"}"#))
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\naudit_log = \"AUDIT\"\nstate_dir = \"{}\"\n{extra}\n\
         [secrets.openai]\nsource = \"env\"\nname = \"OPENAI_API_KEY\"\n\
         [routes.openai]\nprefix = \"/openai\"\nupstream = \"http://{}\"\nsecret = \"openai\"\n\
         allow = [\"POST /v1/chat/completions\"]\n\
         [agents.coder]\n",
        state.display(),
        up.addr
    );
    let audit = dir.path().join("audit.jsonl");
    let key = provider_key();
    let kg = Keygate::start_with_audit(&config, &[("OPENAI_API_KEY", &key)], dir, audit);
    let path = kg.dir.path().join("keygate.toml");
    (up, kg, path)
}

/// `keygate run --config C [flags] -- sh -c SCRIPT`, in `cwd`, with `env` added.
fn launcher(
    config: &Path,
    flags: &[&str],
    script: &str,
    cwd: &Path,
    env: &[(&str, &str)],
) -> Command {
    let mut c = keygate();
    c.args(["run", "--config"])
        .arg(config)
        .args(flags)
        .args(["--", "sh", "-c", script])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn output(mut c: Command) -> Output {
    use std::os::unix::process::CommandExt;
    // Its own process group, which the agent shares: the whole run is killed on a deadline.
    let child = c.process_group(0).spawn().unwrap();
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

/// The status keygate answers a chat request with this token.
fn status_with(kg: &Keygate, token: &str) -> u16 {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .args(["-d", "{}"])
        .arg(format!("{}/openai/v1/chat/completions", kg.url))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

/// Polls (bounded) until the token gets 401; the lease's end is noticed by keygate, not timed.
fn refused_within(kg: &Keygate, token: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if status_with(kg, token) == 401 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn get<'a>(env: &'a [(String, String)], k: &str) -> Option<&'a str> {
    env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_child_has_no_provider_key_and_reaches_the_upstream_with_a_run_token_refused_after_it_exits(
) {
    let (up, kg, config) = setup("").await;
    let work = tempfile::tempdir().unwrap();
    let key = provider_key();
    let copy = format!("{key}\n");
    let script = "env > env.txt; curl -s -H \"Authorization: Bearer $OPENAI_API_KEY\" -d '{}' \"$OPENAI_BASE_URL/chat/completions\" > answer.txt";
    let c = launcher(
        &config,
        &["--no-sandbox"],
        script,
        work.path(),
        &[
            ("OPENAI_API_KEY", key.as_str()),
            ("MY_COPY_OF_THE_KEY", copy.as_str()),
            ("ANTHROPIC_API_KEY", "sk-ant-something-else"),
            ("AWS_SECRET_ACCESS_KEY", "aws-secret-value-1234"),
            ("GITHUB_TOKEN", "ghp-something-1234567"),
            ("BENIGN_SETTING", "keep-me-please"),
        ],
    );
    let out = tokio::task::spawn_blocking(move || output(c))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = env_file(&work.path().join("env.txt"));
    let text = std::fs::read_to_string(work.path().join("env.txt")).unwrap();
    assert!(!text.contains(&key), "the child saw the provider key");
    for gone in [
        "MY_COPY_OF_THE_KEY",
        "ANTHROPIC_API_KEY",
        "AWS_SECRET_ACCESS_KEY",
        "GITHUB_TOKEN",
    ] {
        assert_eq!(get(&env, gone), None, "{gone} reached the child");
    }
    assert_eq!(get(&env, "BENIGN_SETTING"), Some("keep-me-please"));
    let token = get(&env, "OPENAI_API_KEY").unwrap().to_string();
    assert!(token.starts_with("kg_"), "{token}");
    assert_eq!(
        get(&env, "OPENAI_BASE_URL"),
        Some(format!("{}/openai/v1", kg.url).as_str())
    );
    let answer = std::fs::read_to_string(work.path().join("answer.txt")).unwrap();
    assert!(answer.contains("from upstream"), "{answer}");
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {key}").as_str()
    );

    let records = kg.audit_records(1);
    let run_id = get(&env, "KEYGATE_RUN_ID").unwrap();
    assert_eq!(records[0]["run_id"], run_id, "{:?}", records[0]);
    assert!(records[0]["person"].as_str().is_some_and(|p| !p.is_empty()));
    // The launcher waits for keygate to revoke before it exits: the very next request is refused.
    assert_eq!(status_with(&kg, &token), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_passes_the_exit_status_and_death_by_signal_and_revokes_a_sigkilled_childs_token() {
    let (_up, kg, config) = setup("").await;
    let work = tempfile::tempdir().unwrap();
    let c = launcher(&config, &["--no-sandbox"], "exit 7", work.path(), &[]);
    let out = tokio::task::spawn_blocking(move || output(c))
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let c = launcher(
        &config,
        &["--no-sandbox"],
        "echo \"$OPENAI_API_KEY\" > token.txt; kill -9 $$",
        work.path(),
        &[],
    );
    let out = tokio::task::spawn_blocking(move || output(c))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(128 + 9));
    let token = std::fs::read_to_string(work.path().join("token.txt")).unwrap();
    let token = token.trim().to_string();
    assert!(token.starts_with("kg_"));
    let t = token.clone();
    let refused = tokio::task::spawn_blocking(move || status_with(&kg, &t))
        .await
        .unwrap();
    assert_eq!(refused, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_token_is_refused_after_the_launcher_is_sigkilled() {
    let (_up, kg, config) = setup("").await;
    let work = tempfile::tempdir().unwrap();
    let c = launcher(
        &config,
        &["--no-sandbox"],
        "echo \"$OPENAI_API_KEY\" > token.txt; echo $$ > pid.txt; exec sleep 20",
        work.path(),
        &[],
    );
    let mut c = c;
    let mut child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let token_file = work.path().join("token.txt");
    let pid_file = work.path().join("pid.txt");
    while !(pid_file.exists() && token_file.exists()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let agent_pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    let t = token.clone();
    let kg = Arc::new(kg);
    let k = kg.clone();
    let before = tokio::task::spawn_blocking(move || status_with(&k, &t))
        .await
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let k = kg.clone();
    let refused =
        tokio::task::spawn_blocking(move || refused_within(&k, &token, Duration::from_secs(10)))
            .await
            .unwrap();
    let _ = Command::new("kill").args(["-9", &agent_pid]).status();
    assert_eq!(
        before, 200,
        "the run's token worked while the run held its lease"
    );
    assert!(refused, "the token outlived the SIGKILLed launcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_token_left_by_a_sigkilled_keygate_is_refused_by_the_next_one() {
    let (_up, mut kg, config) = setup("").await;
    let work = tempfile::tempdir().unwrap();
    let mut c = launcher(
        &config,
        &["--no-sandbox"],
        "echo \"$OPENAI_API_KEY\" > token.txt; exec sleep 20",
        work.path(),
        &[],
    );
    let mut run = c.spawn().unwrap();
    let token_file = work.path().join("token.txt");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !token_file.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let before = status_with(&kg, &token);
    // A crash: keygate cannot end the lease, and the token is still in the store.
    kg.kill();
    let _ = run.kill();
    let _ = run.wait();
    let text = std::fs::read_to_string(&config).unwrap();
    let next = Keygate::start(&text, &[("OPENAI_API_KEY", &provider_key())]);
    let after = status_with(&next, &token);
    assert_eq!(
        before, 200,
        "the run's token worked while its lease was held"
    );
    assert_eq!(
        after, 401,
        "a restarted keygate honoured a lease nobody holds"
    );
}

fn landlock_missing(out: &Output) -> bool {
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("does not support Landlock") {
        eprintln!("skipped: this kernel has no Landlock ({err})");
        return true;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_denies_config_file_secret_and_other_ports_but_lets_the_agent_work_in_its_directory(
) {
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let (_up, kg, config) = setup("").await;
    // The same request from outside the sandbox is answered: the refusal is the sandbox's.
    let sock = kg.dir.path().join("state/admin.sock");
    let outside = Command::new("curl")
        .args(["-sf", "--unix-socket"])
        .arg(&sock)
        .arg("http://keygate/status")
        .output()
        .unwrap();
    assert!(outside.status.success(), "{outside:?}");
    let kg_port = kg.url.rsplit(':').next().unwrap().to_string();
    let work = tempfile::tempdir().unwrap();
    let script = format!(
        "cat {cfg} >/dev/null 2>&1; echo config=$?; \
         cat {audit} >/dev/null 2>&1; echo audit=$?; \
         cat {state}/state.db >/dev/null 2>&1; echo statedir=$?; \
         bash -c 'exec 3<>/dev/tcp/127.0.0.1/{other_port}' 2>/dev/null; echo other=$?; \
         bash -c 'exec 3<>/dev/tcp/127.0.0.1/{kg_port}' 2>/dev/null; echo keygate=$?; \
         echo hi > here.txt && cat here.txt >/dev/null; echo cwd=$?; \
         ls /usr/bin >/dev/null; echo tools=$?; \
         curl -sf --unix-socket {state}/admin.sock http://keygate/status >/dev/null 2>&1; echo admin=$?",
        cfg = config.display(),
        audit = kg.audit.display(),
        state = kg.dir.path().join("state").display(),
    );
    let c = launcher(&config, &["--sandbox"], &script, work.path(), &[]);
    let out = tokio::task::spawn_blocking(move || output(c))
        .await
        .unwrap();
    if landlock_missing(&out) {
        return;
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for denied in ["config", "audit", "statedir", "other", "admin"] {
        assert!(
            !text.contains(&format!("{denied}=0")),
            "{denied} was reachable:\n{text}"
        );
    }
    for allowed in ["keygate", "cwd", "tools"] {
        assert!(
            text.contains(&format!("{allowed}=0")),
            "{allowed} was denied:\n{text}"
        );
    }
    drop(other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_denies_a_file_secret_that_keygate_itself_reads() {
    let dir = tempfile::tempdir().unwrap();
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("key");
    std::fs::write(&secret, provider_key()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let neighbour = secret_dir.path().join("neighbour");
    std::fs::write(&neighbour, "benign").unwrap();
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\naudit_log = \"AUDIT\"\nstate_dir = \"{}\"\n\
         [secrets.k]\nsource = \"file\"\npath = \"{}\"\n\
         [routes.openai]\nprefix = \"/openai\"\nupstream = \"http://127.0.0.1:9\"\nsecret = \"k\"\n\
         [agents.coder]\n",
        dir.path().join("state").display(),
        secret.display()
    );
    let audit = dir.path().join("audit.jsonl");
    let kg = Keygate::start_with_audit(&config, &[], dir, audit);
    let cfg = kg.dir.path().join("keygate.toml");
    let work = tempfile::tempdir().unwrap();
    let script = format!(
        "cat {} >/dev/null 2>&1; echo secret=$?; cat {} >/dev/null; echo neighbour=$?",
        secret.display(),
        neighbour.display()
    );
    let c = launcher(&cfg, &[], &script, work.path(), &[]);
    let out = tokio::task::spawn_blocking(move || output(c))
        .await
        .unwrap();
    if landlock_missing(&out) {
        return;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("secret=0"), "{text}");
    assert!(text.contains("neighbour=0"), "{text}");
}

#[test]
fn a_process_of_the_same_user_cannot_read_keygates_environ_or_memory() {
    // Root reads everything; the point is a process of keygate's own user, so as root both
    // keygate and the reader run as an unprivileged uid.
    let root = nix::unistd::geteuid().is_root();
    let as_user: &[&str] = if root {
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]
    } else {
        &[]
    };
    let dir = tempfile::tempdir().unwrap();
    if root {
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    }
    let audit = dir.path().join("audit.jsonl");
    let config = "listen = [\"127.0.0.1:0\"]\naudit_log = \"AUDIT\"\n[secrets.k]\nsource = \"env\"\nname = \"HELD\"\n[routes.r]\nprefix = \"/r\"\nupstream = \"http://127.0.0.1:9\"\nsecret = \"k\"\n";
    let key = provider_key();
    let kg = Keygate::start_wrapped(config, &[("HELD", &key)], dir, audit, as_user);
    let read = |path: &str| {
        let mut c = match as_user.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg("head");
                c
            }
            None => Command::new("head"),
        };
        c.args(["-c", "64", path]).output().unwrap()
    };
    for file in ["environ", "mem"] {
        let out = read(&format!("/proc/{}/{file}", kg.pid()));
        assert!(!out.status.success(), "/proc/<keygate>/{file} was readable");
        assert!(!String::from_utf8_lossy(&out.stdout).contains(&key));
    }
    // Its neighbour: the same reader reads an ordinary process of the same user.
    let mut sleeper = match as_user.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg("sleep");
            c
        }
        None => Command::new("sleep"),
    };
    let mut own = sleeper.arg("5").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = read(&format!("/proc/{}/environ", own.id()));
    let _ = own.kill();
    let _ = own.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_without_a_running_keygate_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        format!("state_dir = \"{}\"\n", dir.path().join("s").display()),
    )
    .unwrap();
    let out = keygate()
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no keygate is running") && err.contains("keygate serve"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sent_to_the_launcher_reaches_the_agent_whose_exit_status_passes_through() {
    let (_up, _kg, config) = setup("").await;
    let work = tempfile::tempdir().unwrap();
    let c = launcher(
        &config,
        &["--no-sandbox"],
        "trap 'exit 42' TERM; echo ready > ready.txt; while :; do sleep 0.05; done",
        work.path(),
        &[],
    );
    let mut c = c;
    let child = {
        use std::os::unix::process::CommandExt;
        c.process_group(0).spawn().unwrap()
    };
    let pid = child.id();
    let ready = work.path().join("ready.txt");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let out = tokio::task::spawn_blocking(move || {
        let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !waiter.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-9", "--", &format!("-{pid}")])
            .status();
        waiter.join().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(42),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
