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

/// A `keygate run` whose agent (`sh`) wrote its token and pid and then sleeps; killed, agent
/// and launcher, when dropped.
struct LongRun {
    child: std::process::Child,
    token: String,
    agent_pid: String,
    _work: tempfile::TempDir,
}

impl LongRun {
    async fn start(config: &Path, flags: &[&str], env: &[(&str, &str)]) -> LongRun {
        let work = tempfile::tempdir().unwrap();
        let mut c = launcher(
            config,
            flags,
            "echo \"$OPENAI_API_KEY\" > token.txt; echo $$ > pid.txt; exec sleep 25",
            work.path(),
            env,
        );
        let child = c.spawn().unwrap();
        let (token_file, pid_file) = (work.path().join("token.txt"), work.path().join("pid.txt"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(pid_file.exists() && token_file.exists()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        LongRun {
            token: read(&token_file),
            agent_pid: read(&pid_file),
            child,
            _work: work,
        }
    }

    fn launcher_pid(&self) -> String {
        self.child.id().to_string()
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.launcher_pid(), &self.agent_pid])
            .status();
    }
}

impl Drop for LongRun {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-9", &self.agent_pid]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    let mut run = LongRun::start(&config, &["--no-sandbox"], &[]).await;
    let kg = Arc::new(kg);
    let (k, t) = (kg.clone(), run.token.clone());
    let before = tokio::task::spawn_blocking(move || status_with(&k, &t))
        .await
        .unwrap();
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    let (k, t) = (kg.clone(), run.token.clone());
    let refused =
        tokio::task::spawn_blocking(move || refused_within(&k, &t, Duration::from_secs(10)))
            .await
            .unwrap();
    assert_eq!(
        before, 200,
        "the run's token worked while the run held its lease"
    );
    assert!(refused, "the token outlived the SIGKILLed launcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_token_left_by_a_sigkilled_keygate_is_refused_by_the_next_one() {
    let (_up, mut kg, config) = setup("").await;
    let run = LongRun::start(&config, &["--no-sandbox"], &[]).await;
    let before = status_with(&kg, &run.token);
    // A crash: keygate cannot end the lease, and the token is still in the store.
    kg.kill();
    let token = run.token.clone();
    drop(run);
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

/// A sandboxed agent's attempt on the admin socket from a process that is not the one that
/// connected: connect, fork, let the connecting process exit, and ask from the grandchild.
const CONNECT_FORK_EXIT: &str = r#"
import os, socket, sys, time
sock, out = sys.argv[1], sys.argv[2]
def ask(s, path, body, upgrade):
    extra = "Connection: upgrade\r\nUpgrade: keygate-lease\r\n" if upgrade else ""
    s.sendall(("POST %s HTTP/1.1\r\nHost: k\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (path, extra, len(body), body)).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return "closed"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    while len(rest) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        rest += chunk
    return head.split(b" ")[1].decode()
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
except OSError as e:
    open(out, "w").write("approve=connect-refused lease=connect-refused\n")
    sys.exit(0)
parent = os.getpid()
if os.fork():
    os._exit(0)
for _ in range(200):
    if os.getppid() != parent:
        break
    time.sleep(0.02)
try:
    a = ask(s, "/approve", '{"id":"apr_x"}', False)
except OSError:
    a = "closed"
try:
    l = ask(s, "/lease", '{}', True)
except OSError:
    l = "closed"
open(out + ".tmp", "w").write("approve=%s lease=%s\n" % (a, l))
os.rename(out + ".tmp", out)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxed_connect_fork_exit_grandchild_is_refused_on_approve_and_lease() {
    let (_up, kg, config) = setup("").await;
    let sock = kg.dir.path().join("state/admin.sock");
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("attack.py"), CONNECT_FORK_EXIT).unwrap();
    let script = format!(
        "python3 attack.py {} result.txt; i=0; while [ ! -s result.txt ] && [ $i -lt 150 ]; do sleep 0.05; i=$((i+1)); done; cat result.txt",
        sock.display()
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
        text.contains("approve="),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for refused in ["approve", "lease"] {
        let ok = ["403", "closed", "connect-refused"]
            .iter()
            .any(|v| text.contains(&format!("{refused}={v}")));
        assert!(ok, "{refused} was not refused:\n{text}");
    }
    // Its neighbour: the same admin socket still answers keygate's user outside the sandbox.
    let outside = Command::new("curl")
        .args(["-sf", "--unix-socket"])
        .arg(&sock)
        .arg("http://keygate/status")
        .output()
        .unwrap();
    assert!(outside.status.success(), "{outside:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_does_not_open_the_config_through_a_symlink_next_to_it() {
    let (_up, kg, config) = setup("").await;
    // `peek` points at the directory holding the config: granting it "as itself" would open
    // its target, and so the config, to the agent.
    std::os::unix::fs::symlink(".", kg.dir.path().join("peek")).unwrap();
    std::fs::write(kg.dir.path().join("notes.txt"), "benign").unwrap();
    let work = tempfile::tempdir().unwrap();
    let script = format!(
        "cat {peek}/keygate.toml >/dev/null 2>&1; echo via_link=$?; \
         cat {cfg} >/dev/null 2>&1; echo direct=$?; \
         cat {notes} >/dev/null; echo notes=$?",
        peek = kg.dir.path().join("peek").display(),
        cfg = config.display(),
        notes = kg.dir.path().join("notes.txt").display(),
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
        !text.contains("via_link=0"),
        "config read through a symlink:\n{text}"
    );
    assert!(!text.contains("direct=0"), "{text}");
    assert!(
        text.contains("notes=0"),
        "a neighbour of the config was denied:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_lets_the_agent_run_but_not_rewrite_the_programs_keygate_runs() {
    let dir = tempfile::tempdir().unwrap();
    let tools = tempfile::tempdir().unwrap();
    let fetch = tools.path().join("fetch-key.sh");
    let notify = tools.path().join("notify.sh");
    std::fs::write(&fetch, format!("#!/bin/sh\necho {}\n", provider_key())).unwrap();
    std::fs::write(&notify, "#!/bin/sh\ncat >/dev/null\n").unwrap();
    std::fs::write(tools.path().join("scratch.txt"), "benign").unwrap();
    for p in [&fetch, &notify] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\naudit_log = \"AUDIT\"\nstate_dir = \"{}\"\n\
         approval_notify = [\"{}\"]\n\
         [secrets.k]\nsource = \"command\"\nargv = [\"{}\"]\n\
         [routes.openai]\nprefix = \"/openai\"\nupstream = \"http://127.0.0.1:9\"\nsecret = \"k\"\n\
         [agents.coder]\n",
        dir.path().join("state").display(),
        notify.display(),
        fetch.display()
    );
    let audit = dir.path().join("audit.jsonl");
    let kg = Keygate::start_with_audit(&config, &[], dir, audit);
    let cfg = kg.dir.path().join("keygate.toml");
    let work = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_keygate");
    let script = format!(
        "true 2>/dev/null >> {fetch}; echo fetch_w=$?; \
         true 2>/dev/null >> {notify}; echo notify_w=$?; \
         true 2>/dev/null >> {exe}; echo exe_w=$?; \
         {fetch} >/dev/null; echo fetch_x=$?; \
         {exe} --version >/dev/null; echo exe_x=$?; \
         true >> {scratch}; echo scratch_w=$?",
        fetch = fetch.display(),
        notify = notify.display(),
        scratch = tools.path().join("scratch.txt").display(),
    );
    let c = launcher(&cfg, &["--sandbox"], &script, work.path(), &[]);
    let out = tokio::task::spawn_blocking(move || output(c))
        .await
        .unwrap();
    if landlock_missing(&out) {
        return;
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for denied in ["fetch_w", "notify_w", "exe_w"] {
        assert!(
            !text.contains(&format!("{denied}=0")),
            "{denied} was writable:\n{text}"
        );
    }
    for allowed in ["fetch_x", "exe_x", "scratch_w"] {
        assert!(
            text.contains(&format!("{allowed}=0")),
            "{allowed} was denied:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_token_variable_is_dropped_and_token_file_denied_for_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let bao = tempfile::tempdir().unwrap();
    let token_file = bao.path().join("bao-token");
    std::fs::write(&token_file, "bao-token-from-a-file-1234").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(bao.path().join("neighbour"), "benign").unwrap();
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\naudit_log = \"AUDIT\"\nstate_dir = \"{}\"\n\
         [secrets.a]\nsource = \"openbao\"\naddress = \"http://127.0.0.1:9\"\ntoken_env = \"MY_BAO\"\npath = \"p\"\nfield = \"f\"\nfetch = \"first-use\"\n\
         [secrets.b]\nsource = \"openbao\"\naddress = \"http://127.0.0.1:9\"\ntoken_file = \"{}\"\npath = \"p\"\nfield = \"f\"\nfetch = \"first-use\"\n\
         [routes.ra]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:9\"\nsecret = \"a\"\n\
         [routes.rb]\nprefix = \"/b\"\nupstream = \"http://127.0.0.1:9\"\nsecret = \"b\"\n\
         [agents.coder]\n",
        dir.path().join("state").display(),
        token_file.display()
    );
    let audit = dir.path().join("audit.jsonl");
    let kg = Keygate::start_with_audit(&config, &[("MY_BAO", "bao-token-in-env-5678")], dir, audit);
    let cfg = kg.dir.path().join("keygate.toml");
    let work = tempfile::tempdir().unwrap();
    let script = format!(
        "echo my_bao=${{MY_BAO:-unset}}; \
         cat {tf} >/dev/null 2>&1; echo token_file=$?; \
         cat {nb} >/dev/null; echo neighbour=$?",
        tf = token_file.display(),
        nb = bao.path().join("neighbour").display(),
    );
    let c = launcher(
        &cfg,
        &[],
        &script,
        work.path(),
        &[("MY_BAO", "bao-token-in-env-5678")],
    );
    let out = tokio::task::spawn_blocking(move || output(c))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("my_bao=unset"),
        "the OpenBao token variable reached the agent:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("neighbour=0"), "{text}");
    if landlock_missing(&out) {
        return;
    }
    assert!(
        !text.contains("token_file=0"),
        "the OpenBao token file was readable:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_token_is_refused_once_a_sigstopped_launcher_misses_its_heartbeats() {
    let (_up, kg, config) = setup("").await;
    let run = LongRun::start(
        &config,
        &["--no-sandbox"],
        &[("KEYGATE_RUN_HEARTBEAT_SECS", "1")],
    )
    .await;
    let kg = Arc::new(kg);
    let (k, t) = (kg.clone(), run.token.clone());
    let before = tokio::task::spawn_blocking(move || status_with(&k, &t))
        .await
        .unwrap();
    let _ = Command::new("kill")
        .args(["-STOP", &run.launcher_pid()])
        .status();
    let (k, t) = (kg.clone(), run.token.clone());
    let refused =
        tokio::task::spawn_blocking(move || refused_within(&k, &t, Duration::from_secs(15)))
            .await
            .unwrap();
    assert_eq!(before, 200, "the run's token worked while the launcher ran");
    assert!(refused, "the token outlived a stopped launcher's heartbeat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_run_stopped_like_ctrl_z_keeps_its_token_when_the_agent_cannot_signal_the_launcher(
) {
    let (_up, kg, config) = setup("").await;
    let run = LongRun::start(&config, &[], &[("KEYGATE_RUN_HEARTBEAT_SECS", "1")]).await;
    let watched = std::fs::read_to_string(&kg.audit)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["event"] == "run_start")
        .map(|r| r["heartbeat_watched"].clone());
    if watched != Some(serde_json::Value::Bool(false)) {
        // Only a kernel without Landlock signal scoping (ABI < 6) watches a sandboxed run.
        eprintln!("skipped: this kernel cannot keep the agent from signalling ({watched:?})");
        return;
    }
    // The terminal's job control stops the whole job; longer than three missed heartbeats.
    run.signal("-STOP");
    let kg = Arc::new(kg);
    let (k, t) = (kg.clone(), run.token.clone());
    let refused =
        tokio::task::spawn_blocking(move || refused_within(&k, &t, Duration::from_secs(5)))
            .await
            .unwrap();
    run.signal("-CONT");
    let after = status_with(&kg, &run.token);
    assert!(
        !refused,
        "a stopped job lost its token though its agent cannot stop the launcher"
    );
    assert_eq!(after, 200, "the resumed run's token works");
}
