"""Real tools through `keygate run` with the forward proxy and placeholders: `git clone` over HTTPS
from a dumb git server that checks Basic auth, Python `requests` and Node `fetch` (undici's
EnvHttpProxyAgent). The test exports no key to the agent: the agent's environment and files hold
only placeholders, the TLS upstreams (a test CA keygate alone trusts) see the real key, and a
foreign real token is refused with 403 `placeholder_mismatch`, never forwarded.

Also identity by placeholder alone: a tool that cannot send proxy credentials may CONNECT to a
host a route names (terminated, never tunnelled) and is identified by its run's placeholder."""

from __future__ import annotations

import base64
import http.server
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trustme

from conftest import DEADLINE, RawResponse, _dechunk, error_code, fake_secret, new_token, raw_request, run_keygate
from fake_upstream import FakeUpstream, credential_from

GIT_HOST = "git.example.test"
API_HOST = "api.example.test"
MIRROR = "mirror.example.test"
REPO_ROOT = Path(__file__).resolve().parents[2]
UNDICI = REPO_ROOT / "target" / "node-tools" / "node_modules" / "undici"


class GitServer:
    """A dumb-protocol git server over TLS for GIT_HOST that answers only Basic auth whose password
    is `key` (401 with a Basic challenge otherwise); it records every Authorization it saw."""

    def __init__(self, root: Path, key: str, ctx: ssl.SSLContext):
        self.seen: list[str | None] = []
        want = "Basic " + base64.b64encode(f"x-access-token:{key}".encode()).decode()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):
                got = self.headers.get("Authorization")
                server.seen.append(got)
                if got != want:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _git(*args: str, cwd: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=DEADLINE)


def make_dumb_repo(root: Path) -> str:
    """A bare repo `repo.git` under `root` with one commit, ready for dumb HTTP; returns the file's text."""
    work = root.parent / "src"
    work.mkdir()
    text = "served through keygate\n"
    (work / "README").write_text(text)
    _git("init", "-q", "-b", "main", cwd=work)
    _git("add", "README", cwd=work)
    _git("-c", "user.name=t", "-c", "user.email=t@example.test", "commit", "-q", "-m", "one", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(root / "repo.git"), cwd=root.parent)
    _git("update-server-info", cwd=root / "repo.git")
    return text


def _server_ctx(ca: trustme.CA, host: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(host).configure_cert(ctx)
    return ctx


class Bench:
    def __init__(self, keygate, tmp: Path):
        self.tmp = tmp
        self.key = fake_secret("ghp_")
        ca = trustme.CA()
        self.upstream_ca = tmp / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(self.upstream_ca))
        served = tmp / "served"
        served.mkdir()
        self.readme = make_dumb_repo(served)
        self.git = GitServer(served, self.key, _server_ctx(ca, GIT_HOST))
        self.api = FakeUpstream().serve_tls(_server_ctx(ca, API_HOST)).start()
        self.mirror = FakeUpstream().serve_tls(_server_ctx(ca, MIRROR)).start()
        state = tmp / "state"
        state.mkdir(mode=0o700)
        config = f"""\
listen = ["127.0.0.1:0"]
proxy_listen = ["127.0.0.1:0"]
state_dir = "{state}"
egress_allow = ["{MIRROR}"]
egress_connect = {{ "{MIRROR}" = "127.0.0.1:{self.mirror.port}" }}

[secrets.gh]
source = "env"
name = "GH_KEY"

[routes.git]
host = "{GIT_HOST}"
upstream = "https://127.0.0.1:{self.git.port}"
upstream_ca = "{self.upstream_ca}"
secret = "gh"
allow = ["GET /repo.git/**"]
placeholder_env = "GITHUB_TOKEN"

[routes.api]
host = "{API_HOST}"
upstream = "{self.api.url}"
upstream_ca = "{self.upstream_ca}"
secret = "gh"
allow = ["GET /user"]
placeholder_env = "API_TOKEN"

[agents.coder]
token_env = "KEYGATE_AGENT_TOKEN"
"""
        self.kg = keygate(config, env={"GH_KEY": self.key, "KEYGATE_AGENT_TOKEN": new_token()})

    @property
    def proxy_port(self) -> int:
        return int(self.kg.startup["proxy_listeners"][0].rsplit(":", 1)[1])

    def run(self, script: str, keygate_bin: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        """`keygate run` of a shell script in a fresh work dir (`self.work`); the agent gets no key."""
        self.work = self.tmp / f"work{len(list(self.tmp.glob('work*')))}"
        self.work.mkdir()
        agent_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work), **(env or {})}
        assert self.key not in "".join(agent_env.values())
        return subprocess.run(
            [str(keygate_bin), "run", "--no-sandbox", "--config", str(self.kg.config_path), "--", "sh", "-c", script],
            cwd=self.work, env=agent_env, capture_output=True, text=True, timeout=DEADLINE + 5,
        )

    def agent_saw_key(self) -> bool:
        for p in self.work.rglob("*"):
            if p.is_file() and self.key.encode() in p.read_bytes():
                return True
        return False

    def stop(self):
        self.git.stop()
        self.api.stop()
        self.mirror.stop()


@pytest.fixture
def bench(keygate, keygate_bin, tmp_path):
    b = Bench(keygate, tmp_path)
    b.keygate_bin = keygate_bin
    yield b
    b.stop()


def test_git_clone_over_https_sends_the_helper_placeholder_and_the_git_server_gets_the_real_key(bench, keygate_bin):
    done = bench.run(
        f"env > env.txt; git clone -q https://{GIT_HOST}/repo.git clone 2> git.err; echo $? > git.code",
        keygate_bin,
    )
    assert done.returncode == 0, done.stderr
    assert (bench.work / "git.code").read_text().strip() == "0", ((bench.work / "git.err").read_text(), bench.git.seen, [(r["method"], r["path"], r["status"], r.get("reason"), r.get("agent")) for r in bench.kg.audit_records()])
    assert (bench.work / "clone" / "README").read_text() == bench.readme
    real = "Basic " + base64.b64encode(f"x-access-token:{bench.key}".encode()).decode()
    assert real in bench.git.seen, "the git server never saw the real key as the Basic password"
    env = (bench.work / "env.txt").read_text()
    assert re.search(r"^GITHUB_TOKEN=kgph_git_", env, re.M), env
    assert not bench.agent_saw_key(), "the agent's env or files held the real key"
    recs = bench.kg.audit_records()
    inner = [r for r in recs if r["method"] == "GET" and r["route"] == "git"]
    assert inner and all(r["decision"] == "allow" for r in inner)


def test_git_clone_with_a_foreign_token_in_the_url_is_refused_and_never_forwarded(bench, keygate_bin):
    foreign = fake_secret("ghp_")
    done = bench.run(
        f'git clone -q "https://x-access-token:$FOREIGN@{GIT_HOST}/repo.git" clone 2> git.err; echo $? > git.code',
        keygate_bin,
        env={"FOREIGN": foreign},
    )
    assert done.returncode == 0, done.stderr
    assert (bench.work / "git.code").read_text().strip() != "0"
    assert "403" in (bench.work / "git.err").read_text()
    assert not any(foreign in base64.b64decode(s.split(" ", 1)[1]).decode() for s in bench.git.seen if s and s.startswith("Basic "))
    recs = bench.kg.audit_records()
    assert any(r.get("reason") == "placeholder_mismatch" for r in recs), recs


REQUESTS_SCRIPT = f"""
import os, requests
h = {{"Authorization": "Bearer " + os.environ["API_TOKEN"]}}
print(requests.get("https://{API_HOST}/user", headers=h, timeout=10).status_code)
r = requests.get("https://{API_HOST}/user", headers={{"Authorization": "Bearer " + os.environ["FOREIGN"]}}, timeout=10)
print(r.status_code, r.json()["error"]["code"])
"""


def test_python_requests_sends_its_placeholder_and_a_foreign_token_is_refused(bench, keygate_bin):
    (bench.tmp / "req.py").write_text(REQUESTS_SCRIPT)
    foreign = fake_secret("ghp_")
    done = bench.run(f'env > env.txt; "{sys.executable}" "{bench.tmp / "req.py"}"', keygate_bin, env={"FOREIGN": foreign})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["200", "403 placeholder_mismatch"], done.stdout + done.stderr
    assert [credential_from(r) for r in bench.api.requests] == [bench.key]
    assert "REQUESTS_CA_BUNDLE=" in (bench.work / "env.txt").read_text()
    assert not bench.agent_saw_key() and bench.key not in done.stdout + done.stderr


FETCH_SCRIPT = f"""
const {{ EnvHttpProxyAgent, setGlobalDispatcher, fetch }} = require(process.env.UNDICI);
setGlobalDispatcher(new EnvHttpProxyAgent());
(async () => {{
  const ok = await fetch("https://{API_HOST}/user", {{ headers: {{ authorization: "Bearer " + process.env.API_TOKEN }} }});
  console.log(ok.status);
  const bad = await fetch("https://{API_HOST}/user", {{ headers: {{ authorization: "Bearer " + process.env.FOREIGN }} }});
  console.log(bad.status, (await bad.json()).error.code);
}})().catch((e) => {{ console.error(e); process.exit(3); }});
"""


def test_node_fetch_through_undici_proxy_agent_sends_its_placeholder_and_a_foreign_token_is_refused(bench, keygate_bin):
    assert UNDICI.is_dir() and shutil.which("node"), "scripts/test installs node's undici into target/node-tools"
    (bench.tmp / "fetch.js").write_text(FETCH_SCRIPT)
    foreign = fake_secret("ghp_")
    done = bench.run(f'node "{bench.tmp / "fetch.js"}"', keygate_bin, env={"FOREIGN": foreign, "UNDICI": str(UNDICI)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["200", "403 placeholder_mismatch"], done.stdout + done.stderr
    assert [credential_from(r) for r in bench.api.requests] == [bench.key]
    assert not bench.agent_saw_key() and bench.key not in done.stdout + done.stderr


# Identity by placeholder alone: the tool's proxy URL carries no keygate token.

TOKENLESS = "export HTTPS_PROXY=http://127.0.0.1:$PORT https_proxy=http://127.0.0.1:$PORT; "
# git's proxy comes from the GIT_CONFIG_* entries keygate run sets: drop its credentials there.
GIT_TOKENLESS = (
    'i=0; while [ "$i" -lt "$GIT_CONFIG_COUNT" ]; do eval k=\\$GIT_CONFIG_KEY_$i; '
    '[ "$k" = http.proxy ] && export GIT_CONFIG_VALUE_$i=http://127.0.0.1:$PORT; i=$((i+1)); done; '
)


def test_tool_with_only_its_placeholder_and_no_proxy_credentials_works(bench, keygate_bin):
    done = bench.run(
        TOKENLESS + GIT_TOKENLESS + f'echo "$API_TOKEN" > ph.txt; curl -sS -o out.txt -w "%{{http_code}}" '
        f'-H "Authorization: Bearer $API_TOKEN" https://{API_HOST}/user > code.txt; '
        f'git clone -q https://{GIT_HOST}/repo.git clone 2> git.err; echo $? > git.code',
        keygate_bin,
        env={"PORT": str(bench.proxy_port)},
    )
    assert done.returncode == 0, done.stderr
    assert (bench.work / "code.txt").read_text() == "200", (bench.work / "out.txt").read_text()
    assert (bench.work / "git.code").read_text().strip() == "0", (bench.work / "git.err").read_text()
    assert [credential_from(r) for r in bench.api.requests] == [bench.key]
    assert not bench.agent_saw_key()
    recs = bench.kg.audit_records()
    inner = [r for r in recs if r["method"] == "GET" and r["route"] == "api"]
    assert [(r["decision"], r["agent"]) for r in inner] == [("allow", "coder")]
    assert inner[0].get("run_id"), inner[0]
    tunnels = [r for r in recs if r["method"] == "CONNECT"]
    assert tunnels and all(r["reason"] == "tunnel_terminated" and r["agent"] is None for r in tunnels)
    # git's first request has no credential: keygate's 401 challenges, its helper answers.
    git = [(r["status"], r["agent"]) for r in recs if r["method"] == "GET" and r["path"].startswith("/repo.git/")]
    assert git[0] == (401, None) and (200, "coder") in git, git

    # The placeholder of the ended run is refused, and audited.
    placeholder = (bench.work / "ph.txt").read_text().strip()
    assert placeholder.startswith("kgph_api_")
    before = len(bench.kg.audit_records())
    ended = _tokenless_get(bench, f"Authorization: Bearer {placeholder}")
    assert ended.status == 403 and error_code(ended) == "placeholder_mismatch", ended.body
    assert len(bench.api.requests) == 1
    last = [r for r in bench.kg.audit_records(before + 2) if r["method"] == "GET"][-1]
    assert last["decision"] == "deny" and last["reason"] == "placeholder_mismatch"


def _tokenless_get(bench, header: str):
    """CONNECT API_HOST without proxy credentials, then one GET inside the TLS tunnel."""
    import socket

    with socket.create_connection(("127.0.0.1", bench.proxy_port), timeout=DEADLINE) as s:
        s.sendall(f"CONNECT {API_HOST}:443 HTTP/1.1\r\nHost: {API_HOST}:443\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            chunk = s.recv(1)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cafile=str(_keygate_ca(bench)))
        with ctx.wrap_socket(s, server_hostname=API_HOST) as t:
            extra = f"{header}\r\n" if header else ""
            t.sendall(f"GET /user HTTP/1.1\r\nHost: {API_HOST}\r\n{extra}Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := t.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return RawResponse(int(lines[0].split()[1]), headers, body)


def _keygate_ca(bench) -> Path:
    path = bench.tmp / "keygate-ca.pem"
    if not path.exists():
        done = run_keygate(bench.keygate_bin, ["ca", "export", "--config", str(bench.kg.config_path)], bench.tmp)
        assert done.returncode == 0, done.stderr
        path.write_text(done.stdout)
    return path


def test_tokenless_request_inside_a_tunnel_without_a_placeholder_is_refused_and_audited(bench):
    resp = _tokenless_get(bench, "")
    assert resp.status == 401 and error_code(resp) == "missing_token", resp.body
    foreign = _tokenless_get(bench, "Authorization: Bearer " + fake_secret("ghp_"))
    assert foreign.status == 401, foreign.body
    assert bench.api.requests == []
    recs = bench.kg.audit_records(4)
    inner = [r for r in recs if r["method"] == "GET"]
    assert [(r["decision"], r["status"]) for r in inner] == [("deny", 401), ("deny", 401)]
    tunnels = [r for r in recs if r["method"] == "CONNECT"]
    assert [r["reason"] for r in tunnels] == ["tunnel_terminated", "tunnel_terminated"]
    assert all(r.get("agent") in (None, "") for r in tunnels)


@pytest.mark.parametrize(
    "target",
    [f"{MIRROR}:443", "unrouted.example.test:443", f"{API_HOST}:22", "127.0.0.1:443", "bad_host..x:443"],
)
def test_tokenless_connect_to_anything_but_a_route_host_is_407_and_audited(bench, target):
    resp = raw_request(bench.proxy_port, f"CONNECT {target} HTTP/1.1\nHost: {target}")
    assert resp.status == 407 and error_code(resp) == "proxy_auth_required", resp.body
    (rec,) = [r for r in bench.kg.audit_records(1) if r["method"] == "CONNECT"]
    assert rec["decision"] == "deny" and rec["reason"] == "proxy_auth_required"
    assert bench.mirror.requests == []


HOG_SCRIPT = r'''
import http.client, os, socket, ssl
port, ph, host = int(os.environ["PORT"]), os.environ["API_TOKEN"], "api.example.test"

def tunnel():
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        c = s.recv(1)
        if not c:
            break
        head += c
    return s, int(head.split(b" ")[1]) if head else 0

def get(conn):
    conn.request("GET", "/user", headers={"Authorization": f"Bearer {ph}"})
    r = conn.getresponse()
    r.read()
    return r.status

hogs = [tunnel() for _ in range(64)]
s, connect = tunnel()
print("hogs", sorted({c for _, c in hogs}))
print("connect", connect)
conn = http.client.HTTPConnection(host)
conn.sock = ssl.create_default_context().wrap_socket(s, server_hostname=host)
print("first", get(conn))
more = [tunnel() for _ in range(64)]
print("more", sorted({c for _, c in more}))
print("again", get(conn))
hogs[0][0].settimeout(10)
print("oldest hog closed", hogs[0][0].recv(1) == b"")
'''


def test_tunnels_without_proxy_credentials_cannot_lock_a_tool_with_a_placeholder_out(bench, keygate_bin):
    # A local process holding nothing fills the pool of token-less tunnels; a tool with its
    # run's placeholder still gets in (the oldest unidentified tunnel makes room), and once its
    # request identified it, more tunnels from that process never push it out.
    (bench.tmp / "hog.py").write_text(HOG_SCRIPT)
    done = bench.run(f"python3 {bench.tmp / 'hog.py'} > out.txt 2> err.txt", keygate_bin, env={"PORT": str(bench.proxy_port)})
    out = (bench.work / "out.txt").read_text()
    assert done.returncode == 0, out + (bench.work / "err.txt").read_text()
    assert out.splitlines() == [
        "hogs [200]",
        "connect 200",
        "first 200",
        "more [200]",
        "again 200",
        "oldest hog closed True",
    ], out
    assert [credential_from(r) for r in bench.api.requests] == [bench.key, bench.key]
