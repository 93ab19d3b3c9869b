#!/usr/bin/env python3
"""keygate benchmark harness. Run it through `bench/run`, which installs and builds what it needs.

One run, on this machine:
  - a fast fake upstream (bench/tools fake-upstream): fixed ~650-byte chat.completion JSON, and SSE;
  - wrk (one thread, Lua POST script) at 1, 32 and 256 connections, pinned (client on CPU 0, every
    server -- proxy and fake upstream -- on CPU 1) and unpinned, against: direct, keygate (audit on,
    redaction on, rate + budget policy), nginx (adds the same Authorization header), LiteLLM proxy;
  - SSE time to first byte and per-event delay (bench/tools sse-client) direct / keygate / nginx;
  - redaction engine throughput (bench/tools redact-bench);
  - keygate RSS idle and with 256 open SSE streams;
  - optionally (--profile) a perf profile of keygate under load.
Writes bench/results/latest.{md,json} and prints the markdown.

Every process it starts is in its own process group, killed on exit (also on error or signal); the
pids are also listed in $KEYGATE_BENCH_RUN_DIR/pids so bench/run's trap can kill them if we are
killed hard.
"""
import argparse
import atexit
import datetime
import json
import os
import platform
import random
import select
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
# bench/run builds with cargo, which puts both packages' binaries under $CARGO_TARGET_DIR when it is set
_TARGET = os.environ.get("CARGO_TARGET_DIR")
TOOLS = os.path.join(_TARGET, "release") if _TARGET else os.path.join(BENCH, "tools", "target", "release")
LIB = os.path.join(BENCH, "lib")
KEYGATE_BIN = os.environ.get("KEYGATE_BENCH_BIN") or os.path.join(_TARGET or os.path.join(ROOT, "target"), "release",
                                                                   "keygate")
CACHE = os.environ.get("KEYGATE_BENCH_CACHE", os.path.expanduser("~/.cache/keygate-bench"))
LITELLM_BIN = os.path.join(CACHE, "litellm-venv", "bin", "litellm")

# Appended to the native TOML configs (ab-bin's NAME=PATH::TOML), e.g. `[connections]` keys.
EXTRA_TOML = ""
CLIENT_CPU = "0"
SERVER_CPU = "1"
CONCURRENCY = [1, 32, 256]
TARGETS = ["direct", "keygate", "nginx", "floor", "rawfloor", "litellm"]

PROCS = []  # (name, Popen)
RUN_DIR = None


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# process management


def cleanup():
    for name, p in reversed(PROCS):
        stop(p)
    PROCS.clear()
    if RUN_DIR:
        # everything we started is stopped: nothing left for bench/run's trap to kill
        open(os.path.join(RUN_DIR, "pids"), "w").close()


def stop(p, grace=3.0):
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def stop_named(name):
    for i, (n, p) in enumerate(list(PROCS)):
        if n == name:
            stop(p)
            PROCS.remove((n, p))


def _sig(signum, frame):
    raise SystemExit(128 + signum)


def spawn(name, argv, cpus=None, env=None, stdout=subprocess.PIPE, stderr=None):
    if cpus is not None:
        argv = ["taskset", "-c", cpus] + argv
    if stderr is None:
        stderr = open(os.path.join(RUN_DIR, f"{name}.stderr"), "ab")
    p = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
    PROCS.append((name, p))
    with open(os.path.join(RUN_DIR, "pids"), "a") as f:
        f.write(f"{p.pid}\n")
    return p


def read_line(p, timeout):
    """First stdout line of p within timeout, or None; afterwards stdout is drained in a thread."""
    deadline = time.time() + timeout
    buf = b""
    fd = p.stdout.fileno()
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                line, rest = buf.split(b"\n", 1)
                threading.Thread(target=_drain, args=(p,), daemon=True).start()
                return line.decode(errors="replace")
        elif p.poll() is not None:
            break
    return None


def _drain(p):
    try:
        while p.stdout.read(65536):
            pass
    except Exception:
        pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def pgroup_pids(pgid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
                if int(st[2]) == pgid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def repin(pgid, cpus):
    for pid in pgroup_pids(pgid):
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def proc_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return line.split()[1]
    except OSError:
        return None
    return None


def ctx_switches(pids):
    """Context switches (voluntary + involuntary) summed over every thread of the given processes."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            total += int(line.split()[1])
            except OSError:
                pass
    return total


def rss_kib(pids):
    total = 0
    for pid in pids:
        v = proc_status(pid, "VmRSS")
        if v:
            total += int(v)
    return total


def fill(template, out, **kv):
    with open(os.path.join(LIB, template)) as f:
        text = f.read()
    for k, v in kv.items():
        text = text.replace(f"@{k}@", str(v))
    with open(out, "w") as f:
        f.write(text)
    return out


# ---------------------------------------------------------------------------------------------
# the servers


class Servers:
    def __init__(self, args, secrets):
        self.args = args
        self.s = secrets
        self.upstream_port = free_port()
        self.urls = {}
        self.headers = {}
        self.procs = {}
        self.keygate_info = {}
        self.litellm_ok = False

    def start_upstream(self, cpus):
        p = spawn("upstream", [os.path.join(TOOLS, "fake-upstream"), "--port", str(self.upstream_port),
                               "--expect-auth", "Bearer " + self.s["provider_key"]], cpus=cpus)
        line = read_line(p, 10)
        if not line:
            raise RuntimeError("fake upstream did not start")
        self.procs["direct"] = p
        self.urls["direct"] = f"http://127.0.0.1:{self.upstream_port}/v1/chat/completions"
        self.headers["direct"] = "Authorization: Bearer " + self.s["provider_key"]
        self.upstream_threads = json.loads(line).get("threads")

    def start_keygate(self, cpus):
        if not os.path.exists(KEYGATE_BIN):
            self.keygate_info = {"ok": False, "why": f"{KEYGATE_BIN} not built"}
            return False
        env = dict(os.environ, KEYGATE_BENCH_TOKEN=self.s["agent_token"],
                   KEYGATE_BENCH_PROVIDER_KEY=self.s["provider_key"], RUST_LOG="warn")
        audit = os.path.join(RUN_DIR, "keygate-audit.jsonl")
        attempts = []
        toml_full = fill("keygate.toml.in", os.path.join(RUN_DIR, "keygate.toml"), TMP=RUN_DIR,
                         UPSTREAM_PORT=self.upstream_port)
        text = open(toml_full).read() + EXTRA_TOML
        with open(toml_full, "w") as f:
            f.write(text.replace("#POLICY# ", ""))
        with open(os.path.join(RUN_DIR, "keygate-nopolicy.toml"), "w") as f:
            f.write("\n".join(l for l in text.splitlines() if not l.startswith("#POLICY#")) + "\n")
        fill("keygate-seed.json.in", os.path.join(RUN_DIR, "keygate-seed.json"), TMP=RUN_DIR,
             UPSTREAM_PORT=self.upstream_port)
        candidates = [
            ("native TOML, rate + budget policy", "keygate.toml", "Authorization: Bearer "),
            ("native TOML, no policy rules", "keygate-nopolicy.toml", "Authorization: Bearer "),
            ("lab seed JSON", "keygate-seed.json", "X-Broker-Token: "),
        ]
        for label, cfg, hdr in candidates:
            os.makedirs(os.path.join(RUN_DIR, "keygate-state"), exist_ok=True)
            p = spawn("keygate", [KEYGATE_BIN, "serve", "--config", os.path.join(RUN_DIR, cfg),
                                  "--audit-log", audit], cpus=cpus, env=env)
            line = read_line(p, 10)
            info = None
            if line:
                try:
                    info = json.loads(line)
                except ValueError:
                    info = None
            if info and info.get("ok") and info.get("listen"):
                base = info["listen"].rstrip("/")
                path = "/openai/v1/chat/completions" if cfg.endswith(".toml") else "/v1/chat/completions"
                url = base + path
                hdrs = hdr + self.s["agent_token"]
                if self._probe(url, hdrs):
                    self.procs["keygate"] = p
                    self.urls["keygate"] = url
                    self.headers["keygate"] = hdrs
                    self.keygate_info = {"ok": True, "config": label, "startup": info, "attempts": attempts,
                                         "audit_log": audit}
                    return True
                attempts.append(f"{label}: started but a probe request failed")
            else:
                attempts.append(f"{label}: no startup line ({(line or '').strip()[:200]!r})")
            stop_named("keygate")
        err = ""
        try:
            with open(os.path.join(RUN_DIR, "keygate.stderr"), errors="replace") as f:
                err = f.read()[-600:]
        except OSError:
            pass
        self.keygate_info = {"ok": False, "why": "; ".join(attempts), "stderr_tail": err}
        return False

    def _probe(self, url, hdrs):
        k, v = hdrs.split(":", 1)
        req = urllib.request.Request(url, data=b'{"model":"bench","messages":[{"role":"user","content":"hi"}]}',
                                     headers={k: v.strip(), "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                body = r.read()
                return r.status == 200 and b"chat.completion" in body
        except Exception as e:  # noqa: BLE001
            log(f"probe {url} failed: {e}")
            return False

    def start_floor(self, cpus, name="floor", tool="floor-proxy"):
        """bench/tools floor-proxy: a bare hyper 1 proxy (token check + header swap), for reference;
        `tool="raw-floor"`: the same job without hyper (httparse, one upstream connection per
        downstream connection)."""
        p = spawn(name, [os.path.join(TOOLS, tool), "--upstream", f"http://127.0.0.1:{self.upstream_port}",
                         "--token", self.s["agent_token"], "--key", self.s["provider_key"]], cpus=cpus)
        line = read_line(p, 10)
        if not line:
            return False
        self.procs[name] = p
        self.urls[name] = json.loads(line)["listen"] + "/openai/v1/chat/completions"
        self.headers[name] = "Authorization: Bearer " + self.s["agent_token"]
        return self._probe(self.urls[name], self.headers[name])

    def start_nginx(self, cpus):
        port = free_port()
        for d in ["nginx-body", "nginx-proxy", "nginx-fastcgi", "nginx-uwsgi", "nginx-scgi"]:
            os.makedirs(os.path.join(RUN_DIR, d), exist_ok=True)
        conf = fill("nginx.conf.in", os.path.join(RUN_DIR, "nginx.conf"), TMP=RUN_DIR, PORT=port,
                    UPSTREAM_PORT=self.upstream_port, PROVIDER_KEY=self.s["provider_key"])
        p = spawn("nginx", [shutil.which("nginx") or "/usr/sbin/nginx", "-c", conf, "-p", RUN_DIR], cpus=cpus,
                  stdout=subprocess.DEVNULL)
        if not wait_port(port, 10, p):
            raise RuntimeError("nginx did not start; see " + os.path.join(RUN_DIR, "nginx-error.log"))
        self.procs["nginx"] = p
        self.urls["nginx"] = f"http://127.0.0.1:{port}/openai/v1/chat/completions"
        self.headers["nginx"] = "Authorization: Bearer " + self.s["agent_token"]
        if not self._probe(self.urls["nginx"], self.headers["nginx"]):
            raise RuntimeError("nginx probe failed")

    def start_litellm(self):
        if self.args.no_litellm or not os.path.exists(LITELLM_BIN):
            self.litellm_why = "not installed" if not self.args.no_litellm else "--no-litellm"
            return False
        port = free_port()
        cfg = fill("litellm.yaml.in", os.path.join(RUN_DIR, "litellm.yaml"), UPSTREAM_PORT=self.upstream_port,
                   PROVIDER_KEY=self.s["provider_key"], MASTER_KEY=self.s["litellm_master"])
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False",
                   DISABLE_SCHEMA_UPDATE="True", LITELLM_LOG="ERROR")
        p = spawn("litellm", [LITELLM_BIN, "--config", cfg, "--host", "127.0.0.1", "--port", str(port),
                              "--num_workers", "1"], env=env, stdout=subprocess.DEVNULL)
        t0 = time.time()
        url = f"http://127.0.0.1:{port}/health/liveliness"
        while time.time() - t0 < 90 and p.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        break
            except Exception:  # noqa: BLE001
                time.sleep(0.3)
        self.urls["litellm"] = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.headers["litellm"] = "Authorization: Bearer " + self.s["litellm_master"]
        self.procs["litellm"] = p
        self.litellm_startup_s = round(time.time() - t0, 1)
        self.litellm_ok = p.poll() is None and self._probe(self.urls["litellm"], self.headers["litellm"])
        if not self.litellm_ok:
            self.litellm_why = "did not start; see litellm.stderr"
            stop_named("litellm")
        return self.litellm_ok

    def stop_mode_servers(self):
        for n in ["keygate", "nginx", "floor", "rawfloor", "upstream"]:
            stop_named(n)
        for n in ["direct", "keygate", "nginx", "floor", "rawfloor"]:
            self.procs.pop(n, None)
            self.urls.pop(n, None)


# ---------------------------------------------------------------------------------------------
# measurements


def run_wrk(url, headers, conns, seconds, pinned, timeout_s=10, check_2xx=False):
    seconds = max(1, int(round(seconds)))
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", f"--timeout={timeout_s}s", "-s",
            os.path.join(LIB, "post.lua"), url]
    if pinned:
        argv = ["taskset", "-c", CLIENT_CPU] + argv
    env = dict(os.environ, BENCH_HEADERS=headers, BENCH_MODEL="bench", BENCH_CHECK_2XX="1" if check_2xx else "0")
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + timeout_s + 30)
    for line in r.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            d = json.loads(line[len("BENCHJSON "):])
            d["rps"] = d["requests"] / (d["duration_us"] / 1e6) if d["duration_us"] else 0.0
            # non2xx is -1 when not checked; a non-2xx answer >= 400 is in both counts, so take the larger
            d["errors"] = (d["err_connect"] + d["err_read"] + d["err_write"] + d["err_timeout"]
                           + max(d["err_status"], d.get("non2xx", -1)))
            return d
    raise RuntimeError(f"wrk gave no result: {r.stdout[-500:]} {r.stderr[-500:]}")


def run_sse(url, headers, conns, repeat, events, interval_ms, pinned, announce_cb=None, leak=None):
    argv = [os.path.join(TOOLS, "sse-client"), "--url", url, "--conns", str(conns), "--repeat", str(repeat),
            "--events", str(events), "--interval-ms", str(interval_ms)]
    if leak:
        argv.append("--leak")
    if announce_cb:
        argv.append("--announce")
    if pinned:
        argv = ["taskset", "-c", CLIENT_CPU] + argv
    env = dict(os.environ, BENCH_HEADERS=headers, BENCH_FORBID=leak or "")
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    PROCS.append(("sse-client", p))
    result = None
    try:
        for line in p.stdout:
            if line.startswith("OPEN") and announce_cb:
                announce_cb()
            elif line.startswith("{"):
                result = json.loads(line)
        p.wait(timeout=120)
    finally:
        stop(p)
        PROCS.remove(("sse-client", p))
    return result


def median_by(runs, key):
    runs = sorted(runs, key=lambda r: r[key])
    return runs[len(runs) // 2]


def machine_info():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = "%.0f GiB" % (int(f.readline().split()[1]) / 1024 / 1024)
    except OSError:
        pass

    def ver(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return "?"

    def git(*a):
        try:
            return subprocess.run(["git", "-C", ROOT] + list(a), capture_output=True, text=True).stdout.strip()
        except Exception:  # noqa: BLE001
            return "?"

    return {
        "cpu": cpu, "cores": os.cpu_count(), "mem": mem, "kernel": platform.release(),
        "nginx": ver(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": ver(["wrk", "-v"]).split(" [")[0].replace("debian/", "").replace("wrk ", ""),
        "litellm": (ver([LITELLM_BIN, "--version"]).split("=")[-1].strip()
                    if os.path.exists(LITELLM_BIN) else "not installed"),
        "keygate_commit": git("rev-parse", "--short", "HEAD"),
        "keygate_dirty": bool(git("status", "--porcelain", "--", "src", "Cargo.toml")),
        # which build was measured: target/release (cargo build --release) or bench/pgo's target/pgo/...
        "keygate_bin": os.path.relpath(KEYGATE_BIN, ROOT) if KEYGATE_BIN.startswith(ROOT) else KEYGATE_BIN,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# ---------------------------------------------------------------------------------------------
# the run


def main():
    global RUN_DIR
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (< 2 minutes)")
    ap.add_argument("--duration", type=int, help="seconds per wrk point (default 5, quick 1)")
    ap.add_argument("--rounds", type=int, help="rounds per point, median reported (default 3, quick 1)")
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure a bare hyper proxy (bench/tools floor-proxy) and the same without hyper "
                         "(raw-floor); default: on unless --quick")
    ap.add_argument("--modes", default="pinned,unpinned")
    ap.add_argument("--profile", action="store_true", help="also perf-profile keygate (pinned, 32 conns)")
    ap.add_argument("--out", default=os.path.join(BENCH, "results"))
    ap.add_argument("--only", choices=["budget", "tls"],
                    help="run one scenario instead of the full bench: budget = keygate with vs without "
                         "budget_tokens + SQLite state_dir, 1 and 32 conns (writes OUT/budget.{md,json}); "
                         "tls = forward proxy TLS termination vs nginx (bench/tls.py, OUT/tls.{md,json})")
    args = ap.parse_args()
    quick = args.quick
    dur = args.duration or (1 if quick else 5)
    rounds = args.rounds or (1 if quick else 3)
    modes = [m for m in args.modes.split(",") if m]
    if args.floor is None:
        args.floor = not quick

    RUN_DIR = os.environ.get("KEYGATE_BENCH_RUN_DIR") or tempfile.mkdtemp(prefix="keygate-bench-")
    os.makedirs(RUN_DIR, exist_ok=True)
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, _sig)
    signal.signal(signal.SIGINT, _sig)
    t_start = time.time()

    alphabet = string.ascii_letters + string.digits
    secrets = {
        "agent_token": "kg_" + "".join(random.choice(alphabet) for _ in range(40)),
        "provider_key": "sk-bench-" + "".join(random.choice(alphabet) for _ in range(48)),
        "litellm_master": "sk-litellm-master-" + "".join(random.choice(alphabet) for _ in range(24)),
    }
    res = {"machine": machine_info(), "load_before": loadavg(), "settings": {
        "quick": quick, "seconds_per_point": dur, "rounds": rounds, "modes": modes,
        "concurrency": CONCURRENCY, "client": "wrk -t1 (one thread), POST ~120-byte JSON, keep-alive",
        "pinning": f"pinned: client on CPU {CLIENT_CPU}; proxy under test AND fake upstream on CPU {SERVER_CPU}",
    }, "http": [], "sse": [], "rss": {}, "redaction": None, "notes": []}
    log("run dir", RUN_DIR, "| load", res["load_before"])
    if args.only == "budget":
        budget_scenario(args, secrets, dur, rounds, modes)
        return
    if args.only == "tls":
        import tls
        tls.run(sys.modules[__name__], args, secrets, dur, rounds)
        return

    sv = Servers(args, secrets)
    # LiteLLM starts once (slow start-up); it is re-pinned between modes with taskset -a -p.
    sv.start_upstream(None)
    if "litellm" in TARGETS:
        log("starting LiteLLM ...")
        sv.start_litellm()
        log("LiteLLM", "ok" if sv.litellm_ok else "unavailable: " + getattr(sv, "litellm_why", "?"))
    stop_named("upstream")

    warm = 1 if quick else 2
    for mode in modes:
        pinned = mode == "pinned"
        cpus = SERVER_CPU if pinned else None
        sv.start_upstream(cpus)
        sv.start_keygate(cpus)
        if not sv.keygate_info.get("ok"):
            log("keygate unavailable:", sv.keygate_info.get("why"), sv.keygate_info.get("stderr_tail", "")[-300:])
        sv.start_nginx(cpus)
        if args.floor:
            sv.start_floor(cpus)
            sv.start_floor(cpus, "rawfloor", "raw-floor")
        if sv.litellm_ok:
            repin(sv.procs["litellm"].pid, SERVER_CPU if pinned else "0-%d" % (os.cpu_count() - 1))
        targets = [t for t in TARGETS if t in sv.urls and (t != "litellm" or sv.litellm_ok)]
        log(mode, "targets:", targets)
        threads = {t: proc_status(sv.procs[t].pid, "Threads") for t in targets if t in sv.procs}
        res.setdefault("threads", {})[mode] = threads

        # warm-up (fills connection pools, page cache, JITs)
        for t in targets:
            run_wrk(sv.urls[t], sv.headers[t], 32, warm if t != "litellm" else 2 * warm, pinned)

        if pinned:
            time.sleep(0.5)
            if "keygate" in targets:
                res["rss"]["keygate_idle_kib"] = rss_kib([sv.procs["keygate"].pid])
            res["rss"]["nginx_idle_kib"] = rss_kib(pgroup_pids(sv.procs["nginx"].pid))
        if pinned:
            measure_rss_streams(sv, res, quick)

        # Is response redaction really on? The upstream puts the attached key into one event.
        if "keygate" in sv.urls and mode == modes[0]:
            leaks = {}
            for t in ["keygate", "nginx"]:
                r = run_sse(sv.urls[t], sv.headers[t], 1, 1, 3, 1, pinned, leak=secrets["provider_key"])
                leaks[t] = (r or {}).get("forbidden_seen")
            res["redaction_check"] = leaks
            log("key seen in the SSE output (keygate should be 0, nginx 1):", leaks)

        # SSE timing: one connection, sequential streams, fresh TCP connection each
        sse_n, sse_iv, sse_rep = (5, 10, 10) if quick else (20, 10, 30)
        for t in ["direct", "keygate", "nginx"]:
            if t not in sv.urls:
                continue
            r = run_sse(sv.urls[t], sv.headers[t], 1, sse_rep, sse_n, sse_iv, pinned)
            res["sse"].append({"mode": mode, "target": t, "events": sse_n, "interval_ms": sse_iv, **(r or {})})
            log(f"sse {mode} {t}: ttfb p50 {r['ttfb_us']['p50']:.0f} us, delay p50 {r['event_delay_us']['p50']:.0f} us")

        # throughput / latency, targets interleaved per point, median of rounds
        for c in CONCURRENCY:
            per = {t: [] for t in targets}
            for rnd in range(rounds):
                for t in targets:
                    if t == "litellm":
                        # context only: one round, long enough for 256 queued requests to come back;
                        # --quick measures it pinned only
                        if rnd > 0 or (quick and not pinned):
                            continue
                        d = max(dur, 12 if c == 256 else 3)
                    else:
                        d = dur
                    pids = pgroup_pids(sv.procs[t].pid) if t in sv.procs else []
                    cs0 = ctx_switches(pids)
                    r = run_wrk(sv.urls[t], sv.headers[t], c, d, pinned, timeout_s=20)
                    r["cs_per_req"] = (ctx_switches(pids) - cs0) / r["requests"] if r["requests"] else None
                    per[t].append(r)
            for t in targets:
                if not per[t]:
                    continue
                m = median_by(per[t], "rps")
                none = m["requests"] == 0  # nothing came back within the run (LiteLLM at 256)
                row = {"mode": mode, "conns": c, "target": t, "rps": m["rps"],
                       "p50_us": None if none else m["lat_p50_us"], "p90_us": None if none else m["lat_p90_us"],
                       "p99_us": None if none else m["lat_p99_us"], "mean_us": None if none else m["lat_mean_us"],
                       "cs_per_req": m.get("cs_per_req"),
                       "errors": sum(r["errors"] for r in per[t]), "requests": sum(r["requests"] for r in per[t]),
                       "rounds_rps": [round(r["rps"]) for r in per[t]],
                       "rounds_p50": [r["lat_p50_us"] for r in per[t]],
                       "rounds_p99": [r["lat_p99_us"] for r in per[t]]}
                res["http"].append(row)
                log(f"{mode} c={c} {t}: {m['rps']:.0f} req/s p50 {m['lat_p50_us']} us p99 {m['lat_p99_us']} us"
                    f" errors {row['errors']}")

        if pinned and "keygate" in targets:
            res["rss"]["keygate_after_load_kib"] = rss_kib([sv.procs["keygate"].pid])
            res["rss"]["keygate_hwm_kib"] = int(proc_status(sv.procs["keygate"].pid, "VmHWM") or 0)
        if pinned and args.profile and "keygate" in targets:
            profile_keygate(sv, res, quick)
        if "keygate" in targets:
            res.setdefault("audit", {})[mode] = audit_stats(sv.keygate_info["audit_log"])
        res.setdefault("keygate", {})[mode] = sv.keygate_info
        sv.stop_mode_servers()

    cleanup()
    res["redaction"] = redaction_bench(quick)
    res["load_after"] = loadavg()
    res["elapsed_s"] = round(time.time() - t_start, 1)
    res["litellm"] = {"ok": sv.litellm_ok, "why": getattr(sv, "litellm_why", ""),
                      "startup_s": getattr(sv, "litellm_startup_s", None)}
    os.makedirs(args.out, exist_ok=True)
    md = render(res)
    name = "latest-quick" if quick else "latest"
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(md)
    if not quick and os.path.abspath(args.out) == os.path.abspath(os.path.join(BENCH, "results")):
        embed(md)
    print(md)
    log(f"done in {res['elapsed_s']} s; wrote {args.out}/{name}.md and .json")


# ---------------------------------------------------------------------------------------------
# scenario: cost of the budget decision (issue 10)

BUDGET_CONNS = [1, 32]


def budget_configs(upstream_port, redis_url=None):
    """Configs from keygate.toml.in that differ only in the budget: `with` has the agent's
    budget_tokens and a state_dir (SQLite store, written behind once a second); `without` has neither;
    `redis` (when a redis-server runs) is `with` plus `state = { backend = "redis" }`, so every
    decision is an atomic script on the shared store (issue 14). The rate limit is left out of all so
    the ratio is the budget's alone."""
    text = open(fill("keygate.toml.in", os.path.join(RUN_DIR, "keygate-template.toml"), TMP=RUN_DIR,
                     UPSTREAM_PORT=upstream_port)).read()
    with_lines, without_lines = [], []
    for line in text.splitlines():
        if line.startswith("#POLICY# rate"):
            continue
        if line.startswith("#POLICY# budget_tokens"):
            with_lines.append(line.replace("#POLICY# ", "", 1))
            continue
        if line.startswith("state_dir"):
            with_lines.append(f'state_dir = "{os.path.join(RUN_DIR, "budget-state")}"')
            continue
        if line.startswith("audit_log"):
            with_lines.append(f'audit_log = "{os.path.join(RUN_DIR, "audit-with.jsonl")}"')
            without_lines.append(f'audit_log = "{os.path.join(RUN_DIR, "audit-without.jsonl")}"')
            continue
        with_lines.append(line)
        without_lines.append(line)
    if not any(l.startswith("budget_tokens") for l in with_lines):
        raise RuntimeError("keygate.toml.in has no '#POLICY# budget_tokens' line")
    os.makedirs(os.path.join(RUN_DIR, "budget-state"), exist_ok=True)
    out = {}
    variants = [("with", with_lines), ("without", without_lines)]
    if redis_url:
        redis_lines = [l.replace("audit-with.jsonl", "audit-redis.jsonl").replace("budget-state", "redis-state")
                       for l in with_lines]
        os.makedirs(os.path.join(RUN_DIR, "redis-state"), exist_ok=True)
        redis_lines.insert(0, f'state = {{ backend = "redis", url = "{redis_url}" }}')
        redis_lines.insert(0, 'instance = "bench"')
        variants.append(("redis", redis_lines))
    for name, lines in variants:
        path = os.path.join(RUN_DIR, f"keygate-budget-{name}.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        out[name] = path
    return out


def start_keygate_named(sv, name, cfg, audit, cpus):
    env = dict(os.environ, KEYGATE_BENCH_TOKEN=sv.s["agent_token"],
               KEYGATE_BENCH_PROVIDER_KEY=sv.s["provider_key"], RUST_LOG="warn")
    p = spawn(name, [KEYGATE_BIN, "serve", "--config", cfg, "--audit-log", audit], cpus=cpus, env=env)
    line = read_line(p, 10)
    try:
        info = json.loads(line) if line else None
    except ValueError:
        info = None
    if not (info and info.get("ok") and info.get("listen")):
        raise RuntimeError(f"keygate ({name}) did not start: {(line or '').strip()[:200]!r}; see "
                           + os.path.join(RUN_DIR, f"{name}.stderr"))
    url = info["listen"].rstrip("/") + "/openai/v1/chat/completions"
    hdrs = "Authorization: Bearer " + sv.s["agent_token"]
    if not sv._probe(url, hdrs):
        raise RuntimeError(f"keygate ({name}) started but the probe request failed")
    return p, url, hdrs


def budget_spent(state_dir):
    """Tokens the SQLite store holds for the agent after keygate stopped (it flushes at exit): proves the
    budget was really counted, not just configured."""
    import sqlite3
    db = os.path.join(state_dir, "state.db")
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT agent, tokens FROM budgets").fetchall()
        finally:
            con.close()
        return {a: t for a, t in rows}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{db}: {e}"}


def start_redis(cpus):
    """A private redis-server for the shared-store point, or None when none is installed."""
    exe = shutil.which("redis-server")
    if not exe:
        return None
    port = free_port()
    p = spawn("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
              cpus=cpus, stdout=subprocess.DEVNULL)
    if not wait_port(port, proc=p):
        raise RuntimeError("redis-server did not start; see " + os.path.join(RUN_DIR, "redis.stderr"))
    return f"redis://127.0.0.1:{port}"


def budget_scenario(args, secrets, dur, rounds, modes):
    res = {"scenario": "budget", "machine": machine_info(), "load_before": loadavg(), "settings": {
        "seconds_per_point": dur, "rounds": rounds, "modes": modes, "concurrency": BUDGET_CONNS,
        "client": "wrk -t1 (one thread), POST ~120-byte JSON, keep-alive, every status checked to be 2xx",
        "pinning": f"pinned: client on CPU {CLIENT_CPU}; both keygates AND fake upstream on CPU {SERVER_CPU}",
    }, "http": [], "spent": {}, "ok": True, "problems": []}
    t_start = time.time()
    sv = Servers(args, secrets)
    for mode in modes:
        pinned = mode == "pinned"
        cpus = SERVER_CPU if pinned else None
        sv.start_upstream(cpus)
        redis_url = start_redis(cpus)
        cfgs = budget_configs(sv.upstream_port, redis_url)
        names = list(cfgs)
        res["settings"]["redis"] = bool(redis_url)
        kg = {}
        for name in names:
            kg[name] = start_keygate_named(sv, f"keygate-{name}", cfgs[name],
                                           os.path.join(RUN_DIR, f"audit-{name}.jsonl"), cpus)
        log(mode, "keygate with budget:", kg["with"][1], "| without:", kg["without"][1])
        for name in names:
            run_wrk(kg[name][1], kg[name][2], 32, 1, pinned, check_2xx=True)
        for c in BUDGET_CONNS:
            per = {n: [] for n in names}
            for rnd in range(rounds):
                # alternate which one goes first, so a drift in machine load hits all alike
                order = names if rnd % 2 == 0 else list(reversed(names))
                for name in order:
                    r = run_wrk(kg[name][1], kg[name][2], c, dur, pinned, timeout_s=20, check_2xx=True)
                    if r.get("non2xx", -1) < 0:
                        raise RuntimeError("wrk did not check the statuses (post.lua without BENCH_CHECK_2XX?)")
                    per[name].append(r)
            row = {"mode": mode, "conns": c}
            for name in names:
                m = median_by(per[name], "rps")
                row[name] = {"rps": m["rps"], "p50_us": m["lat_p50_us"], "p99_us": m["lat_p99_us"],
                             "requests": sum(r["requests"] for r in per[name]),
                             "errors": sum(r["errors"] for r in per[name]),
                             "non2xx": sum(r["non2xx"] for r in per[name]),
                             "rounds_rps": [round(r["rps"]) for r in per[name]]}
                if row[name]["errors"] or not row[name]["requests"]:
                    res["ok"] = False
                    res["problems"].append(f"{mode} c={c} {name}: {row[name]['errors']} errors "
                                           f"({row[name]['non2xx']} non-2xx) of {row[name]['requests']} requests")
            res["http"].append(row)
            w, wo = row["with"], row["without"]
            log(f"{mode} c={c}: with {w['rps']:.0f} req/s p50 {w['p50_us']} p99 {w['p99_us']} | without "
                f"{wo['rps']:.0f} req/s p50 {wo['p50_us']} p99 {wo['p99_us']} | errors {w['errors']}/{wo['errors']}")
        for name in names:
            stop_named(f"keygate-{name}")
        stop_named("upstream")
        if redis_url:
            stop_named("redis")
        res["spent"][mode] = budget_spent(os.path.join(RUN_DIR, "budget-state"))
        spent = res["spent"][mode].get("bench")
        if not isinstance(spent, int) or spent <= 0:
            res["ok"] = False
            res["problems"].append(f"{mode}: the SQLite store holds no spent tokens for the agent: "
                                   f"{res['spent'][mode]}")
        # the next mode starts from an empty store
        shutil.rmtree(os.path.join(RUN_DIR, "budget-state"), ignore_errors=True)
    res["load_after"] = loadavg()
    res["elapsed_s"] = round(time.time() - t_start, 1)
    md = render_budget(res)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "budget.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "budget.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"done in {res['elapsed_s']} s; wrote {args.out}/budget.md and .json")
    if not res["ok"]:
        raise SystemExit("budget scenario measured nothing valid: " + "; ".join(res["problems"]))


def render_budget(res):
    m, s = res["machine"], res["settings"]
    L = [f"### Budget decision cost — {m['date']}", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}. Load average before "
         f"{res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f} (1-min). keygate `{m['keygate_commit']}`"
         f"{' (+uncommitted src changes)' if m['keygate_dirty'] else ''}; wrk {m['wrk']}.",
         f"Client: {s['client']}; {s['seconds_per_point']} s per point, median of {s['rounds']} round(s), "
         f"with/without interleaved. {s['pinning']}. Total {res['elapsed_s']} s.",
         "with = agent `budget_tokens = { per = \"day\", limit = 10^15 }` + `state_dir` (SQLite, write-behind); "
         "without = no budget, no state_dir; both audit on, no rate limit.",
         "Spent tokens in the SQLite store after the run: "
         + ", ".join(f"{k} {v}" for k, v in res["spent"].items()) + ".", "",
         "| mode | conns | req/s with | req/s without | req/s with/without | p50 with | p50 without | "
         "p50 with/without | p99 with | p99 without | p99 with/without | errors (with/without) |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["http"]:
        w, wo = r["with"], r["without"]
        L.append(f"| {r['mode']} | {r['conns']} | {fmt_rps(w['rps'])} | {fmt_rps(wo['rps'])} | "
                 f"{fmt_ratio(ratio(w['rps'], wo['rps']))} | {fmt_us(w['p50_us'])} | {fmt_us(wo['p50_us'])} | "
                 f"{fmt_ratio(ratio(w['p50_us'], wo['p50_us']))} | {fmt_us(w['p99_us'])} | {fmt_us(wo['p99_us'])} | "
                 f"{fmt_ratio(ratio(w['p99_us'], wo['p99_us']))} | {w['errors']}/{wo['errors']} |")
    shared = [r for r in res["http"] if "redis" in r]
    if shared:
        L += ["", "Shared store (issue 14): `redis` = `with` + `state = { backend = \"redis\" }` on a local "
              "redis-server (one atomic script per decision), as ratios to the embedded default (`with`, SQLite) "
              "and to no budget (`without`).", "",
              "| mode | conns | req/s redis | redis/with | redis/without | p50 redis | p50 redis/with | "
              "p99 redis | p99 redis/with | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in shared:
            rd, w, wo = r["redis"], r["with"], r["without"]
            L.append(f"| {r['mode']} | {r['conns']} | {fmt_rps(rd['rps'])} | {fmt_ratio(ratio(rd['rps'], w['rps']))} | "
                     f"{fmt_ratio(ratio(rd['rps'], wo['rps']))} | {fmt_us(rd['p50_us'])} | "
                     f"{fmt_ratio(ratio(rd['p50_us'], w['p50_us']))} | {fmt_us(rd['p99_us'])} | "
                     f"{fmt_ratio(ratio(rd['p99_us'], w['p99_us']))} | {rd['errors']} |")
    if res["problems"]:
        L += ["", "**Not valid:** " + "; ".join(res["problems"])]
    return "\n".join(L) + "\n"


def embed(md):
    """Puts the latest full run's tables into BENCHMARKS.md between the markers."""
    path = os.path.join(ROOT, "BENCHMARKS.md")
    begin, end = "<!-- bench:latest:begin -->", "<!-- bench:latest:end -->"
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        body = md.replace("### keygate benchmark", "### Latest run", 1)
        with open(path, "w") as f:
            f.write(head + begin + "\n" + body + end + tail)
        log("updated BENCHMARKS.md")


def measure_rss_streams(sv, res, quick):
    """RSS of keygate (and nginx for context) while 256 SSE streams are open through it."""
    for t in ["keygate", "nginx"]:
        if t not in sv.urls:
            continue
        pids = lambda: [sv.procs[t].pid] if t == "keygate" else pgroup_pids(sv.procs[t].pid)  # noqa: E731
        samples = []
        got = threading.Event()

        def sampler():
            got.wait(30)
            end = time.time() + (0.5 if quick else 1.5)
            while time.time() < end:
                samples.append(rss_kib(pids()))
                time.sleep(0.05)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        events, iv = (12, 100) if quick else (30, 100)
        r = run_sse(sv.urls[t], sv.headers[t], 256, 1, events, iv, True, announce_cb=got.set)
        got.set()
        th.join()
        res["rss"][f"{t}_256_streams_kib"] = max(samples) if samples else None
        res["rss"][f"{t}_256_streams_complete"] = (r or {}).get("complete_streams")
        log(f"rss {t} with 256 streams: {res['rss'][f'{t}_256_streams_kib']} KiB,"
            f" complete {res['rss'][f'{t}_256_streams_complete']}/256")


def audit_stats(path):
    try:
        n = 0
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            for _ in f:
                n += 1
        return {"lines": n, "bytes": size}
    except OSError as e:
        return {"error": str(e)}


def redaction_bench(quick):
    exe = os.path.join(TOOLS, "redact-bench")
    if not os.path.exists(exe):
        return {"error": "redact-bench not built"}
    out = {}
    for det in [True, False]:
        argv = ["taskset", "-c", SERVER_CPU, exe, "--ms", "200" if quick else "1000"]
        if not det:
            argv.append("--no-detectors")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        try:
            out["detectors_on" if det else "detectors_off"] = json.loads(r.stdout)
        except ValueError:
            out["error"] = r.stderr[-500:]
    return out


def profile_keygate(sv, res, quick):
    perf = shutil.which("perf")
    if not perf:
        res["notes"].append("perf not found; no profile")
        return
    data = os.path.join(RUN_DIR, "perf.data")
    secs = 3 if quick else 8
    pid = sv.procs["keygate"].pid
    rec = subprocess.Popen([perf, "record", "-F", "2999", "-g", "--call-graph", "dwarf,16384", "-p", str(pid),
                            "-o", data, "--", "sleep", str(secs + 1)],
                           stdout=subprocess.DEVNULL, stderr=open(os.path.join(RUN_DIR, "perf.stderr"), "w"),
                           start_new_session=True)
    PROCS.append(("perf", rec))
    time.sleep(0.5)
    run_wrk(sv.urls["keygate"], sv.headers["keygate"], 32, secs, True)
    rec.wait(timeout=120)
    PROCS.remove(("perf", rec))
    out_dir = os.path.join(BENCH, "results")

    def report(*extra):
        r = subprocess.run([perf, "report", "-i", data, "--stdio", "-g", "none"] + list(extra),
                           capture_output=True, text=True)
        rows = []
        for line in r.stdout.splitlines():
            if line.startswith("#") or not line.strip() or "%" not in line:
                continue
            parts = line.split()
            rows.append((parts, line.rstrip()))
        return rows

    by_thread = report("--no-children", "--sort", "comm")
    self_rows = report("--no-children", "--sort", "comm,dso,sym", "--percent-limit", "0.5")
    incl = report("--children", "--sort", "sym", "--percent-limit", "0.5")
    own = [l for p_, l in incl if "keygate::" in l or "audit" in l or "redact" in l][:40]
    kernel_sched = [l for p_, l in incl if any(k in l for k in ["[k] schedule", "futex_wake", "__x64_sys_futex",
                                                                 "do_writev", "__x64_sys_write", "sock_recvmsg",
                                                                 "__sys_sendto", "epoll_wait"])][:12]
    lines = ["# keygate profile (perf record -g --call-graph dwarf, cpu-clock), wrk -c32 pinned, "
             f"{secs} s", "", "## CPU by thread (self time)", ""]
    lines += ["    " + l.strip() for _, l in by_thread]
    lines += ["", "## Top self time (thread, object, symbol)", ""]
    lines += ["    " + l.strip()[:160] for _, l in self_rows[:30]]
    lines += ["", "## Inclusive time of keygate's own functions (children included)", ""]
    lines += ["    " + l.strip()[:160] for l in own]
    lines += ["", "## Inclusive time of selected kernel paths", ""]
    lines += ["    " + l.strip()[:160] for l in kernel_sched]
    with open(os.path.join(out_dir, "profile-keygate.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    # flame graph with inferno when it is installed (bench/run --profile installs it)
    inferno_c = shutil.which("inferno-collapse-perf") or os.path.join(CACHE, "bin", "inferno-collapse-perf")
    inferno_f = shutil.which("inferno-flamegraph") or os.path.join(CACHE, "bin", "inferno-flamegraph")
    if os.path.exists(inferno_c) and os.path.exists(inferno_f):
        script = subprocess.run([perf, "script", "-i", data], capture_output=True)
        col = subprocess.run([inferno_c], input=script.stdout, capture_output=True)
        svg = subprocess.run([inferno_f, "--title", "keygate, wrk -c32, pinned"], input=col.stdout,
                             capture_output=True)
        with open(os.path.join(out_dir, "keygate-flamegraph.svg"), "wb") as f:
            f.write(svg.stdout)
    res["profile"] = {"seconds": secs, "files": ["profile-keygate.txt", "keygate-flamegraph.svg"]}


# ---------------------------------------------------------------------------------------------
# report


def fmt_rps(x):
    return f"{x:,.0f}" if x is not None else "—"


def fmt_us(x):
    if x is None:
        return "—"
    if abs(x) >= 10000:
        return f"{x / 1000:,.1f} ms"
    return f"{x:,.0f} µs"


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def fmt_ratio(x):
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:,.0f}×"
    return f"{x:.2f}×"


def render(res):
    m = res["machine"]
    L = []
    L.append(f"### keygate benchmark — {m['date']}{' (quick)' if res['settings']['quick'] else ''}")
    L.append("")
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem']} RAM, Linux {m['kernel']}. "
             f"Load average before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f} (1-min). "
             f"keygate `{m['keygate_commit']}`{' (+uncommitted src changes)' if m['keygate_dirty'] else ''} "
             f"(`{m.get('keygate_bin', '?')}`); "
             f"{m['nginx']}; wrk {m['wrk']}; LiteLLM {m['litellm']}.")
    s = res["settings"]
    L.append(f"Client: {s['client']}; {s['seconds_per_point']} s per point, median of {s['rounds']} "
             f"round(s), targets interleaved. {s['pinning']}. Total run {res['elapsed_s']} s.")
    kg = res.get("keygate", {})
    for mode, info in kg.items():
        if info.get("ok"):
            L.append(f"keygate ({mode}): config = {info['config']}; audit log on.")
        else:
            L.append(f"keygate ({mode}): **not measured** — {info.get('why', '?')}")
    rc = res.get("redaction_check")
    if rc:
        L.append(f"Response redaction check: the fake upstream echoed the attached key in one SSE event; it reached "
                 f"the client {rc.get('keygate')} time(s) through keygate (must be 0), {rc.get('nginx')} through nginx "
                 "(which does not redact).")
    au = res.get("audit", {})
    if au:
        L.append("Audit lines written: " + ", ".join(f"{k} {v.get('lines')}" for k, v in au.items()) + ".")
    L.append("")

    http = res["http"]
    idx = {(r["mode"], r["conns"], r["target"]): r for r in http}
    L.append("#### HTTP (POST /v1/chat/completions, ~650-byte JSON answer)")
    L.append("")
    L.append("| mode | conns | target | req/s | p50 | p99 | added p50 | added p99 | ctx sw/req | errors |")
    L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in http:
        d = idx.get((r["mode"], r["conns"], "direct"))
        ok = d and r["target"] != "direct" and r["p50_us"] is not None and d["p50_us"] is not None
        add50 = r["p50_us"] - d["p50_us"] if ok else None
        add99 = r["p99_us"] - d["p99_us"] if ok else None
        L.append(f"| {r['mode']} | {r['conns']} | {r['target']} | {fmt_rps(r['rps'])} | {fmt_us(r['p50_us'])} | "
                 f"{fmt_us(r['p99_us'])} | {fmt_us(add50)} | {fmt_us(add99)} | "
                 f"{'—' if r.get('cs_per_req') is None else format(r['cs_per_req'], '.2f')} | {r['errors']} |")
    L.append("")
    L.append("ctx sw/req: context switches of the server under test (all its threads; for `direct` the fake "
             "upstream) per request, from /proc/PID/task/*/status.")
    L.append("")
    L.append("#### Throughput ratios (same run)")
    L.append("")
    L.append("| mode | conns | keygate / nginx | keygate / LiteLLM | keygate / direct | nginx / direct | "
             "keygate / hyper floor | raw floor / nginx |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in s["modes"]:
        for c in s["concurrency"]:
            g = lambda t: (idx.get((mode, c, t)) or {}).get("rps")  # noqa: E731
            L.append(f"| {mode} | {c} | {fmt_ratio(ratio(g('keygate'), g('nginx')))} | "
                     f"{fmt_ratio(ratio(g('keygate'), g('litellm')))} | {fmt_ratio(ratio(g('keygate'), g('direct')))} | "
                     f"{fmt_ratio(ratio(g('nginx'), g('direct')))} | {fmt_ratio(ratio(g('keygate'), g('floor')))} | "
                     f"{fmt_ratio(ratio(g('rawfloor'), g('nginx')))} |")
    L.append("")

    L.append("#### SSE (1 connection, sequential streams, first event at once then one every "
             f"{res['sse'][0]['interval_ms'] if res['sse'] else '?'} ms)")
    L.append("")
    L.append("| mode | target | streams ok | TTFB p50 | TTFB p99 | added TTFB p50 | event delay p50 | p99 | max | "
             "added delay p50 |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    sidx = {(r["mode"], r["target"]): r for r in res["sse"]}
    for r in res["sse"]:
        d = sidx.get((r["mode"], "direct"))
        t, e = r.get("ttfb_us", {}), r.get("event_delay_us", {})
        at = t.get("p50") - d["ttfb_us"]["p50"] if d and r["target"] != "direct" else None
        ae = e.get("p50") - d["event_delay_us"]["p50"] if d and r["target"] != "direct" else None
        L.append(f"| {r['mode']} | {r['target']} | {r.get('complete_streams')}/{r.get('streams')} | "
                 f"{fmt_us(t.get('p50'))} | {fmt_us(t.get('p99'))} | {fmt_us(at)} | {fmt_us(e.get('p50'))} | "
                 f"{fmt_us(e.get('p99'))} | {fmt_us(e.get('max'))} | {fmt_us(ae)} |")
    L.append("")
    L.append("Event delay = arrival at the client − the moment the fake upstream wrote the event (a "
             "CLOCK_MONOTONIC stamp inside the event). An event held back by a proxy would show up as a delay "
             "of one interval or more.")
    L.append("")

    rss = res["rss"]
    L.append("#### Memory (VmRSS)")
    L.append("")
    L.append("| what | keygate | nginx (master + worker) |")
    L.append("|---|---:|---:|")

    def mib(k):
        v = rss.get(k)
        return f"{v / 1024:.1f} MiB" if v else "—"

    L.append(f"| idle, after start-up and warm-up | {mib('keygate_idle_kib')} | {mib('nginx_idle_kib')} |")
    L.append(f"| 256 open SSE streams | {mib('keygate_256_streams_kib')} | {mib('nginx_256_streams_kib')} |")
    L.append(f"| after the pinned load runs (peak VmHWM) | {mib('keygate_after_load_kib')} "
             f"({mib('keygate_hwm_kib')}) | |")
    L.append("")

    red = res.get("redaction") or {}
    L.append("#### Redaction engine (one core; median GiB/s of input; build = engine build time)")
    L.append("")
    L.append("| held secrets | body | matches | detectors | findings | build | `redact()` whole "
             "| `stream().push()` 16 KiB chunks |")
    L.append("|---:|---|---|---|---:|---:|---:|---:|")
    for key in ["detectors_on", "detectors_off"]:
        for row in red.get(key, []) or []:
            L.append(f"| {row.get('secrets', 3)} | {row['size']} | {'yes' if row['matches'] else 'no'} | "
                     f"{'on' if row['detectors'] else 'off'} | {row['findings']} | "
                     f"{row.get('build_ms', 0):.1f} ms | {row['whole_gib_s']:.2f} | {row['stream_gib_s']:.2f} |")
    if red.get("error"):
        L.append(f"\nredaction bench error: {red['error']}")
    L.append("")

    L.append("#### Targets")
    L.append("")
    L.extend(targets(res, idx, sidx))
    L.append("")
    ll = res.get("litellm", {})
    if not ll.get("ok"):
        L.append(f"LiteLLM not measured: {ll.get('why')}")
    return "\n".join(L) + "\n"


def targets(res, idx, sidx):
    out = ["| target | result | status |", "|---|---|---|"]

    def row(name, result, ok):
        out.append(f"| {name} | {result} | {'met' if ok else ('**missed**' if ok is False else 'not measured')} |")

    for mode in res["settings"]["modes"]:
        for c in [32, 256]:
            k, n = (idx.get((mode, c, "keygate")) or {}).get("rps"), (idx.get((mode, c, "nginx")) or {}).get("rps")
            r = ratio(k, n)
            row(f"throughput ≥ 1.0× nginx, {mode}, {c} conns", fmt_ratio(r), None if r is None else r >= 1.0)
    for mode in res["settings"]["modes"]:
        d, k, n = (idx.get((mode, 1, t)) for t in ["direct", "keygate", "nginx"])
        for p in ["p50_us", "p99_us"]:
            if d and k and n and None not in (d[p], k[p], n[p]):
                ak, an = k[p] - d[p], n[p] - d[p]
                row(f"added {p[:3]} at 1 conn ≤ nginx's, {mode}", f"keygate {ak:+} µs vs nginx {an:+} µs", ak <= an)
            else:
                row(f"added {p[:3]} at 1 conn ≤ nginx's, {mode}", "—", None)
    for mode in res["settings"]["modes"]:
        k, n, d = sidx.get((mode, "keygate")), sidx.get((mode, "nginx")), sidx.get((mode, "direct"))
        if k and n and k.get("ttfb_us") and n.get("ttfb_us"):
            # Added = the proxy's TTFB minus the direct one's, fresh connection each stream.
            base = (d.get("ttfb_us") or {}).get("p50") if d else None
            added = "" if base is None else (f"; added keygate {k['ttfb_us']['p50'] - base:+.0f} µs vs "
                                              f"nginx {n['ttfb_us']['p50'] - base:+.0f} µs")
            row(f"SSE added time to first byte ≤ nginx's (fresh connections), {mode}",
                f"TTFB p50 keygate {fmt_us(k['ttfb_us']['p50'])} vs nginx {fmt_us(n['ttfb_us']['p50'])}{added}",
                k["ttfb_us"]["p50"] <= n["ttfb_us"]["p50"])
            iv = k["interval_ms"] * 1000
            okev = k["complete_streams"] == k["streams"] and (k["event_delay_us"]["max"] or 1e12) < iv
            row(f"SSE every event forwarded as it arrives, {mode}",
                f"max event delay {fmt_us(k['event_delay_us']['max'])} (must stay < the {fmt_us(iv)} interval); "
                f"{k['complete_streams']}/{k['streams']} streams complete", okev)
        else:
            row(f"SSE first event no later than nginx's, {mode}", "—", None)
    red = (res.get("redaction") or {}).get("detectors_on") or []
    for n in [3, 50]:
        for m in [False, True]:
            r1 = [r for r in red if r["size"] == "1MiB" and r["matches"] == m and r.get("secrets", 3) == n]
            if not r1:
                continue
            v = min(r1[0]["whole_gib_s"], r1[0]["stream_gib_s"])
            what = "a match every 16 KiB" if m else "no matches"
            row(f"redaction ≥ 1 GiB/s/core, {n} held secrets, 1 MiB, {what} (detectors on)",
                f"{r1[0]['whole_gib_s']:.2f} GiB/s whole, {r1[0]['stream_gib_s']:.2f} GiB/s streamed", v >= 1.0)
    rss = res["rss"]
    i, s = rss.get("keygate_idle_kib"), rss.get("keygate_256_streams_kib")
    row("RSS ≤ 20 MiB idle", f"{i / 1024:.1f} MiB" if i else "—", None if not i else i <= 20 * 1024)
    row("RSS ≤ 64 MiB with 256 open streams", f"{s / 1024:.1f} MiB" if s else "—",
        None if not s else s <= 64 * 1024)
    return out


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
