"""The forward proxy's test bench: a TLS upstream for a made-up host (its own test CA, trusted by
keygate only through `upstream_ca`), keygate with `proxy_listen`, and real `curl` through it
with `-x` and `--cacert` set to the CA `keygate ca export` prints."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trustme

from conftest import DEADLINE, Keygate, fake_secret, new_token, run_keygate
from fake_upstream import FakeUpstream

HOST = "api.example.test"
MIRROR = "mirror.example.test"


@dataclass
class ProxyBench:
    kg: Keygate
    token: str
    key: str
    upstream: FakeUpstream
    mirror: FakeUpstream
    upstream_ca: Path  # the test CA of the "real" hosts
    keygate_ca: Path  # what `keygate ca export` printed
    tmp: Path

    @property
    def proxy_port(self) -> int:
        return int(self.kg.startup["proxy_listeners"][0].rsplit(":", 1)[1])

    def proxy_url(self, token: str | None = "default") -> str:
        token = self.token if token == "default" else token
        auth = f"keygate:{token}@" if token else ""
        return f"http://{auth}127.0.0.1:{self.proxy_port}"

    def curl_argv(self, *args: str) -> tuple[list[str], dict]:
        argv = ["curl", "-sS", "-N", "--max-time", str(DEADLINE), "--noproxy", "", "-x", self.proxy_url(), "--cacert", str(self.keygate_ca), *args]
        return argv, {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.tmp)}

    def curl(self, *args: str, token: str | None = "default", cacert: Path | None = None) -> subprocess.CompletedProcess:
        """curl through keygate's proxy; stdout is the body, then a line `STATUS CONNECT_STATUS`."""
        argv = [
            "curl", "-sS", "--max-time", str(DEADLINE), "--noproxy", "",
            "-x", self.proxy_url(token),
            "--cacert", str(cacert or self.keygate_ca),
            "-w", "\n%{http_code} %{http_connect}", *args,
        ]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.tmp)}
        return subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE + 5, env=env)


def status_of(done: subprocess.CompletedProcess) -> tuple[int, int, str]:
    """(HTTP status, CONNECT status, body) from `ProxyBench.curl`'s output."""
    body, _, last = done.stdout.rpartition("\n")
    code, connect = last.split(" ")
    return int(code), int(connect), body


def start_bench(keygate, keygate_bin, tmp_path: Path, *, wrong_ca: bool = False, extra: str = "", listen_port: int = 0, mirror_at: str | None = None, key: str | None = None, env: dict | None = None, route_extra: str = "") -> ProxyBench:
    ca = trustme.CA()
    upstream_ca = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(upstream_ca))
    upstream = FakeUpstream().serve_tls(_server_ctx(ca, HOST)).start()
    mirror = FakeUpstream().serve_tls(_server_ctx(ca, MIRROR)).start()
    trusted = upstream_ca
    if wrong_ca:
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        trusted = other
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    token = new_token()
    key = key or fake_secret("ghp_")
    config = f"""\
listen = ["127.0.0.1:{listen_port}"]
proxy_listen = ["127.0.0.1:0"]
state_dir = "{state}"
egress_allow = ["{MIRROR}"]
egress_connect = {{ "{MIRROR}" = "{mirror_at or f'127.0.0.1:{mirror.port}'}" }}

[secrets.gh]
source = "env"
name = "GH_KEY"

[routes.gh]
host = "{HOST}"
upstream = "{upstream.url}"
upstream_ca = "{trusted}"
secret = "gh"
allow = ["GET /user", "GET /echo", "POST /v1/chat/completions"]
{route_extra}

[agents.coder]
routes = ["gh"]
token_env = "KEYGATE_AGENT_TOKEN"
{extra}"""
    kg = keygate(config, env={"KEYGATE_AGENT_TOKEN": token, "GH_KEY": key, **(env or {})})
    exported = run_keygate(keygate_bin, ["ca", "export", "--config", str(kg.config_path)], tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE" not in exported.stdout
    keygate_ca = tmp_path / "keygate-ca.pem"
    keygate_ca.write_text(exported.stdout)
    return ProxyBench(kg, token, key, upstream, mirror, upstream_ca, keygate_ca, tmp_path)


def _server_ctx(ca: trustme.CA, host: str):
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(host).configure_cert(ctx)
    return ctx
