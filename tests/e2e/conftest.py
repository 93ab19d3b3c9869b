"""Harness for keygate's end-to-end tests: the real binary next to a recording fake upstream.

- `keygate(config, env=..., suffix=...)` writes a config into the test's tmp dir, starts the binary
  (from KEYGATE_BIN, default target/debug/keygate) with stdout and stderr going to files, waits for
  its one-line JSON startup report and returns a `Keygate`. Every process it starts is stopped at
  teardown, also when the test failed; a keygate whose stderr shows a Rust panic fails the test.
- `fake_upstream` is a started `FakeUpstream` (see fake_upstream.py), stopped at teardown.
- Nothing here sleeps to synchronise: waits poll for the thing itself, with a deadline.
- All traffic goes to 127.0.0.1 (or a Unix socket in a private temp dir).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import shlex
import signal
import socket
import string
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import httpx
import pytest

from fake_upstream import FakeUpstream

E2E_DIR = Path(__file__).resolve().parent
REPO = E2E_DIR.parent.parent
STANDIN_BIN = E2E_DIR / "bin"
EXAMPLES = REPO / "examples"
LAB_EXAMPLES = EXAMPLES / "lab"

# The longest any wait may take for something that should happen promptly. Only a failing run
# ever waits this long; nothing asserts on how long anything took.
DEADLINE = 10.0

T = TypeVar("T")


# === small helpers ===


def poll(check: Callable[[], T], what: str, timeout: float = DEADLINE) -> T:
    """Calls `check` until it returns something truthy; fails after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def new_token() -> str:
    """A keygate-shaped agent token: `kg_` + 40 base62 characters."""
    alphabet = string.ascii_letters + string.digits
    return "kg_" + "".join(secrets.choice(alphabet) for _ in range(40))


def fake_secret(prefix: str) -> str:
    """A fresh fake credential, made at run time: the repository holds no credential-shaped
    literal (keygate's own `redact --check` test scans the tree for them)."""
    return prefix + secrets.token_hex(14)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def error_code(resp) -> str:
    """`error.code` of a keygate error answer, asserting the documented error shape."""
    body = resp.json()
    assert body.get("ok") is False, body
    assert body["error"]["type"] == "keygate_error", body
    return body["error"]["code"]


def lab_example(name: str) -> dict:
    """One of the shipped lab configs, e.g. `env.example` or `dry-run`."""
    return json.loads((LAB_EXAMPLES / f"broker_config.{name}.json").read_text())


def lab_config(name: str, upstream: str | None = None, **overrides) -> dict:
    """A shipped lab config changed only where a test must: port 0 and the fake upstream."""
    cfg = lab_example(name)
    cfg["listen_port"] = 0
    if upstream is not None:
        cfg["upstream_base_url"] = upstream
    cfg.update(overrides)
    return cfg


def unused_port_holder() -> socket.socket:
    """A socket bound to a loopback port but not listening: connecting to it is refused, and
    nobody else can take the port while the test holds it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s


# === raw HTTP, for requests that HTTP clients would normalise ===


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = DEADLINE) -> RawResponse:
    """Sends `head` (request line + headers, without the blank line) and `body` byte for byte,
    then reads the whole answer. `Connection: close` is added so the answer ends with EOF."""
    data = head.rstrip("\r\n").replace("\r\n", "\n").replace("\n", "\r\n").encode("latin-1")
    data += b"\r\nConnection: close\r\n\r\n" + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    assert raw, "keygate closed the connection without an answer"
    head_bytes, _, rest = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        rest = _dechunk(rest)
    return RawResponse(status, headers, rest)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


# === the keygate process ===


class StartupFailed(Exception):
    def __init__(self, returncode: int | None, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        super().__init__(f"keygate did not start (exit {returncode})\nstdout:\n{stdout}\nstderr:\n{stderr}")


class Keygate:
    """A running `keygate serve`."""

    def __init__(self, argv, env, cwd: Path, workdir: Path, name: str, audit_path: Path | None, config_path: Path):
        self.argv, self.env, self.cwd = argv, env, cwd
        self.config_path = config_path
        self.audit_path = audit_path
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self.startup: dict = {}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True
            )

    # --- lifecycle ---

    def wait_ready(self, timeout: float = DEADLINE) -> "Keygate":
        def first_line():
            text = self.stdout_path.read_bytes()
            if b"\n" in text:
                return text.split(b"\n", 1)[0] or b"{}"
            if self.proc.poll() is not None:
                raise StartupFailed(self.proc.returncode, self.stdout_text(), self.stderr_text())
            return None

        try:
            line = poll(first_line, "keygate's startup line on stdout", timeout)
        except AssertionError:
            raise StartupFailed(self.proc.poll(), self.stdout_text(), self.stderr_text()) from None
        self.startup = json.loads(line)
        assert self.startup.get("ok") is True, self.startup
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signals keygate, waits for it, kills it if it does not stop; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=DEADLINE)
        # Anything keygate started and left behind (a hung secret command) is in its session.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode

    # --- where it listens ---

    @property
    def url(self) -> str:
        return self.startup["listen"]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def client(self, **kw) -> httpx.Client:
        """An HTTP client for keygate. It opens a new connection per request: keep-alive after
        a refusal is the subject of its own test (test_keepalive.py), so that it does not make
        unrelated tests flaky."""
        kw.setdefault("limits", httpx.Limits(max_keepalive_connections=0))
        return httpx.Client(base_url=self.url, timeout=DEADLINE, trust_env=False, **kw)

    # --- what it wrote ---

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def audit_lines(self) -> list[str]:
        """Complete lines of the audit log so far (a line still being written is left out)."""
        assert self.audit_path is not None
        try:
            text = self.audit_path.read_text()
        except FileNotFoundError:
            return []
        return text.split("\n")[:-1]

    def audit_log(self) -> list[dict]:
        """Every line of the audit log, parsed: request records and keygate's own lifecycle
        records (`event`: start, stop), which share one hash chain."""
        return [json.loads(line) for line in self.audit_lines()]

    def audit_records(self, n: int | None = None, timeout: float = DEADLINE) -> list[dict]:
        """The request records (one per request), each parsed as JSON. With `n`, first waits
        until there are at least `n` (they are written when a response ends, so they may trail
        the answer)."""

        def requests():
            return [r for r in self.audit_log() if "request_id" in r]

        if n is not None:
            poll(lambda: len(requests()) >= n, f"{n} audit records in {self.audit_path}", timeout)
        return requests()

    def audit_record(self, request_id: str, timeout: float = DEADLINE) -> dict:
        """The one audit record with this request_id, waiting for it to be written."""

        def find():
            found = [r for r in (json.loads(line) for line in self.audit_lines()) if r.get("request_id") == request_id]
            assert len(found) <= 1, f"{len(found)} audit records share request_id {request_id}"
            return found[0] if found else None

        return poll(find, f"the audit record of request {request_id}", timeout)


def base_env(tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment: none of the developer's API keys leak into a test; the stand-in
    `op` and `az` come first on PATH."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": f"{STANDIN_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "RUST_BACKTRACE": "1",
        "NO_PROXY": "*",
    }
    env.update(extra or {})
    # keygate clears a secret command's environment; the stand-ins read their steering from
    # HOME instead, as a real CLI reads its session from its config dir.
    steering = {k: v for k, v in env.items() if k.startswith("FAKE_")}
    (home / ".standin.env").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in steering.items()))
    return env


@pytest.fixture(scope="session")
def keygate_bin() -> Path:
    path = Path(os.environ.get("KEYGATE_BIN", REPO / "target" / "debug" / "keygate"))
    if not path.is_absolute():
        path = REPO / path
    if not os.access(path, os.X_OK):
        pytest.fail(f"keygate binary not found at {path}: build it (scripts/test does) or set KEYGATE_BIN")
    return path


@pytest.fixture
def keygate(tmp_path, keygate_bin):
    """Factory: `keygate(config, env=None, suffix=None, audit_log=True, args=(), wait=True)`.

    `config` is a dict (written as JSON, the lab format) or text (TOML unless `suffix` says
    otherwise). `audit_log=True` passes `--audit-log <tmp>/<name>-audit.jsonl`; a path passes that
    path; None passes nothing (the config decides)."""
    started: list[Keygate] = []
    counter = iter(range(1000))

    def start(config, *, env=None, suffix=None, audit_log=True, args=(), wait=True, cwd=None) -> Keygate:
        name = f"keygate{next(counter)}"
        if isinstance(config, dict):
            suffix = suffix or ".json"
            text = json.dumps(config, indent=2) + "\n"
        else:
            suffix = suffix or ".toml"
            text = config
        config_path = tmp_path / f"{name}{suffix}"
        config_path.write_text(text)
        argv = [str(keygate_bin), "serve", "--config", str(config_path)]
        audit_path = None
        if audit_log is True:
            audit_path = tmp_path / f"{name}-audit.jsonl"
        elif audit_log is not None:
            audit_path = Path(audit_log)
        if audit_path is not None:
            argv += ["--audit-log", str(audit_path)]
        argv += list(args)
        kg = Keygate(argv, base_env(tmp_path, env), Path(cwd or tmp_path), tmp_path, name, audit_path, config_path)
        started.append(kg)
        return kg.wait_ready() if wait else kg

    yield start

    panics = []
    for kg in started:
        kg.stop()
        if "panicked" in kg.stderr_text():
            panics.append(f"{kg.argv}:\n{kg.stderr_text()}")
    if panics:
        pytest.fail("keygate panicked:\n" + "\n".join(panics))


@pytest.fixture
def fake_upstream():
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture
def short_tmp():
    """A short private directory for Unix sockets (sun_path holds only 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_keygate(keygate_bin: Path, args: list[str], tmp_path: Path, env: dict | None = None, timeout: float = DEADLINE):
    """Runs a short keygate command (check, or a serve that must refuse to start)."""
    try:
        return subprocess.run(
            [str(keygate_bin), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=base_env(tmp_path, env),
            cwd=tmp_path,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed it
        raise AssertionError(f"keygate {args} did not exit within {timeout}s (it should have)\n{e.stdout}\n{e.stderr}") from None


# === native configs ===


def native_config(
    upstream: str,
    *,
    agent_routes=("openai", "anthropic"),
    token_env: str = "KEYGATE_AGENT_TOKEN",
    openai_upstream: str | None = None,
    anthropic_upstream: str | None = None,
    listen: str = '["127.0.0.1:0"]',
    mode: str = "proxy",
    extra: str = "",
) -> str:
    """Two routes (OpenAI with a bearer key, Anthropic with x-api-key) and one agent `coder`."""
    routes = ", ".join(f'"{r}"' for r in agent_routes)
    return f"""\
listen = {listen}
mode = "{mode}"

[secrets.openai]
source = "env"
name = "OPENAI_API_KEY"

[secrets.anthropic]
source = "env"
name = "ANTHROPIC_API_KEY"

[routes.openai]
prefix = "/openai"
upstream = "{openai_upstream or upstream}"
secret = "openai"
inject = "bearer"
allow = ["POST /v1/chat/completions", "POST /v1/responses", "GET /v1/models"]

[routes.anthropic]
prefix = "/anthropic"
upstream = "{anthropic_upstream or upstream}"
secret = "anthropic"
inject = "header:x-api-key"
allow = ["POST /v1/messages"]

[agents.coder]
routes = [{routes}]
token_env = "{token_env}"
{extra}"""


@dataclass
class NativeSetup:
    kg: Keygate
    token: str
    openai_key: str
    anthropic_key: str


@pytest.fixture
def native(keygate, fake_upstream):
    """keygate on the two-route native config in front of the fake upstream."""
    token = new_token()
    openai_key = fake_secret("sk-proj-e2e")
    anthropic_key = fake_secret("sk-ant-api03-e2e")
    kg = keygate(
        native_config(fake_upstream.url),
        env={"KEYGATE_AGENT_TOKEN": token, "OPENAI_API_KEY": openai_key, "ANTHROPIC_API_KEY": anthropic_key},
    )
    return NativeSetup(kg, token, openai_key, anthropic_key)
