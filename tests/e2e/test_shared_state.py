"""Several keygates, one policy state (issue 14): three keygates on one real `redis-server`
(Debian's package; scripts/test installs it) share tokens, revocations, freezes, approvals,
budgets and rates. Budgets and rates are decided atomically in the store, so the three together
admit no more than one limit; a revocation or freeze made through one reaches the others; an
approval held by one is decided through another's admin socket; the store going away refuses
with 503 `state_unavailable` and coming back resumes service with nothing lost from the audit.

Every redis-server and keygate a test starts is stopped at teardown, also when it fails."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import DEADLINE, error_code, fake_secret, native_config, new_token, poll, run_keygate
from fake_upstream import CHAT_USAGE

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (scripts/test installs it)")

MESSAGES = [{"role": "user", "content": "hi"}]
# A chat request with max_tokens=10 books 10 + 4 (its input estimate), and the fake upstream
# reports CHAT_USAGE (14 tokens): each admitted request costs exactly what it booked.
BOOKED = 14
MSG = {"model": "claude-fake", "max_tokens": 8, "messages": MESSAGES}


class Redis:
    """A private redis-server on a free loopback port, with an append-only file in its own dir so
    that a restart keeps the data (as a production store would)."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "redis"
        self.dir.mkdir(exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "redis.log"

    def start(self) -> "Redis":
        argv = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                "--dir", str(self.dir), "--protected-mode", "no"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        poll(self.ping, f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE)
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path).start()
    yield r
    r.stop()


class Cluster:
    """Three keygates (instances a, b, c) on one store, each with its own state_dir (its admin
    socket and audit key) and its own audit log."""

    def __init__(self, keygate, keygate_bin, tmp_path, short_tmp, upstream, redis, agent_extra="", state_extra="",
                 route_extra=""):
        self.bin, self.tmp = keygate_bin, tmp_path
        self.token = new_token()
        self.env = {"KEYGATE_AGENT_TOKEN": self.token, "OPENAI_API_KEY": fake_secret("sk-proj-rds"),
                    "ANTHROPIC_API_KEY": fake_secret("sk-ant-api03-rds")}
        self.kgs = []
        for name in "abc":
            state_dir = short_tmp / name
            top = (f'instance = "{name}"\nstate_dir = "{state_dir}"\n'
                   f'state = {{ backend = "redis", url = "{redis.url}"{state_extra} }}\n')
            text = top + native_config(upstream, extra=agent_extra)
            if route_extra:
                text = text.replace('allow = ["POST /v1/messages"]\n', f'allow = ["POST /v1/messages"]\n{route_extra}\n')
            self.kgs.append(keygate(text, env=self.env))

    def admin(self, kg, *args, ok: bool = True) -> subprocess.CompletedProcess:
        out = run_keygate(self.bin, [*args, "--config", str(kg.config_path)], self.tmp, env=self.env)
        if ok:
            assert out.returncode == 0, f"keygate {args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
        return out

    def admin_json(self, kg, *args):
        return json.loads(self.admin(kg, *args, "--json").stdout)

    def audit_files(self) -> list[str]:
        return [str(kg.audit_path) for kg in self.kgs]


@pytest.fixture
def cluster(keygate, keygate_bin, tmp_path, short_tmp, fake_upstream, redis):
    def make(**kw) -> Cluster:
        return Cluster(keygate, keygate_bin, tmp_path, short_tmp, fake_upstream.url, redis, **kw)

    return make


def chat(kg, token: str, max_tokens: int = 10) -> httpx.Response:
    with kg.client() as c:
        return c.post("/openai/v1/chat/completions",
                      json={"model": "gpt-fake", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True},
                      headers={"Authorization": f"Bearer {token}"})


def models(kg, token: str) -> httpx.Response:
    with kg.client() as c:
        return c.get("/openai/v1/models", headers={"Authorization": f"Bearer {token}"})


# === budgets and rates: one limit for all three ===


def test_budget_spent_across_three_keygates_under_concurrent_load_is_never_overshot(cluster, fake_upstream):
    limit = 600
    c = cluster(agent_extra=f'budget_tokens = {{ per = "day", limit = {limit} }}')
    fits = limit // BOOKED  # 42 requests fit; the 43rd would pass the limit

    def one(i: int) -> httpx.Response:
        return chat(c.kgs[i % 3], c.token)

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, range(90)))

    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code != 200]
    for r in refused:
        assert r.status_code == 429 and error_code(r) == "budget_exhausted", r.text
        assert 1 <= int(r.headers["retry-after"]) <= 86_400
    # The documented bound: admission never books past the limit; the overshoot is at most the
    # usage beyond each request's booking, none here (the upstream reports what was booked).
    assert len(ok) == fits, (len(ok), [r.status_code for r in results])
    assert len(fake_upstream.requests) == fits
    poll(lambda: sum(len(kg.audit_records()) for kg in c.kgs) >= 90, "90 audit records across the three")
    records = [rec for kg in c.kgs for rec in kg.audit_records()]
    spent = sum(r.get("tokens") or 0 for r in records if r["decision"] == "allow")
    assert spent == fits * CHAT_USAGE["total_tokens"] <= limit
    # Every keygate admitted some and refused some: the limit is one, not one per keygate.
    assert {r["instance"] for r in records if r["decision"] == "allow"} == {"a", "b", "c"}


def test_rate_limit_holds_across_three_keygates(cluster):
    c = cluster(agent_extra='rate = "10/hour"')
    statuses = [models(c.kgs[i % 3], c.token) for i in range(30)]
    allowed = [r for r in statuses if r.status_code == 200]
    assert len(allowed) == 10, [r.status_code for r in statuses]
    for r in statuses:
        if r.status_code != 200:
            assert r.status_code == 429 and error_code(r) == "rate_limited"
            assert int(r.headers["retry-after"]) >= 1


# === revocation and freeze reach every keygate ===


def test_token_revoked_through_one_keygate_is_refused_by_the_others(cluster):
    c = cluster()
    a, b, cc = c.kgs
    issued = c.admin(a, "token", "issue", "--agent", "coder", "--ttl", "1h")
    token = issued.stdout.strip()
    tid = c.admin_json(a, "token", "list")[0]["id"]
    # Issued through a, accepted by all three (benign neighbour of the revocation).
    for kg in c.kgs:
        poll(lambda kg=kg: models(kg, token).status_code == 200, f"{kg.config_path.name} accepting the new token")
    c.admin(a, "token", "revoke", tid)
    t0 = time.monotonic()
    for kg in (b, cc):
        poll(lambda kg=kg: models(kg, token).status_code == 401, f"{kg.config_path.name} refusing the revoked token")
    took = time.monotonic() - t0
    print(f"revocation reached both other keygates after {took:.3f}s")
    r = models(b, token)
    assert r.status_code == 401 and error_code(r) == "invalid_token"
    # The config's own token still works everywhere.
    assert all(models(kg, c.token).status_code == 200 for kg in c.kgs)


def test_freeze_through_one_keygate_refuses_on_all_and_unfreeze_lifts_it(cluster):
    c = cluster()
    a, b, cc = c.kgs
    c.admin(a, "freeze", "--agent", "coder")
    t0 = time.monotonic()
    for kg in (b, cc):
        poll(lambda kg=kg: models(kg, c.token).status_code == 503, f"{kg.config_path.name} frozen")
    print(f"freeze reached both other keygates after {time.monotonic() - t0:.3f}s")
    r = models(cc, c.token)
    assert error_code(r) == "frozen"
    c.admin(b, "unfreeze", "--agent", "coder")
    for kg in c.kgs:
        poll(lambda kg=kg: models(kg, c.token).status_code == 200, f"{kg.config_path.name} unfrozen")


# === approvals: held by one, decided through another ===


def test_approval_requested_on_one_keygate_is_approved_through_anothers_admin_socket(cluster, fake_upstream):
    c = cluster(route_extra='approval = "each"\napproval_timeout = "25s"')
    a, b, _ = c.kgs
    out: dict = {}

    def run():
        with httpx.Client(base_url=a.url, timeout=30, trust_env=False) as h:
            out["resp"] = h.post("/anthropic/v1/messages", json=MSG, headers={"x-api-key": c.token})

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        pending = poll(lambda: c.admin_json(b, "approvals", "list"), "the approval pending on a, listed by b")
        (p,) = pending
        assert p["instance"] == "a" and p["route"] == "anthropic"
        assert not fake_upstream.requests
        c.admin(b, "approve", p["id"])
        t.join(timeout=DEADLINE)
    finally:
        t.join(timeout=DEADLINE)
    assert out["resp"].status_code == 200, out["resp"].text
    rec = a.audit_record(out["resp"].headers["x-request-id"])
    assert rec["approval_id"] == p["id"] and rec["decision"] == "allow" and rec["instance"] == "a"
    events = [e for e in b.audit_log() if e.get("event") == "approve"]
    assert events and events[0]["approval_id"] == p["id"]
    assert (events[0]["instance"], events[0]["held_by"]) == ("b", "a")
    # Decided once: deciding again through the holder says it is gone.
    again = c.admin(a, "deny", p["id"], ok=False)
    assert again.returncode == 1 and "no pending approval" in again.stderr


# === the store goes away and comes back ===


def test_store_down_refuses_with_503_state_unavailable_then_service_resumes_with_nothing_lost(cluster, redis):
    c = cluster(agent_extra='budget_tokens = { per = "day", limit = 100000 }\nrate = "1000/min"',
                state_extra=', max_stale = "1s"')
    a, b, _ = c.kgs
    sent = 0

    def counted(request):
        nonlocal sent
        sent += 1
        return request()

    def until(request, status: int, what: str) -> httpx.Response:
        return poll(lambda: (lambda r: r if r.status_code == status else None)(counted(request)), what)

    for kg in c.kgs:
        assert counted(lambda kg=kg: chat(kg, c.token)).status_code == 200
    redis.stop()

    r = until(lambda: chat(a, c.token), 503, "a 503 while the store is down")
    assert error_code(r) == "state_unavailable"
    st = poll(lambda: (lambda s: s if s["state"]["connected"] is False else None)(c.admin_json(a, "status")),
              "status saying the store is unreachable")
    assert st["state"]["shared"] is True and st["state"]["instance"] == "a"
    # Once the view of tokens and freezes is too old, even a request that needs no budget or
    # rate is refused: a revocation might be unseen.
    r = until(lambda: models(b, c.token), 503, "b refusing everything")
    assert error_code(r) == "state_unavailable"

    redis.start()  # same port, same data; no keygate is restarted

    until(lambda: chat(a, c.token), 200, "service resuming once the store is back")
    for kg in c.kgs:
        until(lambda kg=kg: chat(kg, c.token), 200, f"{kg.config_path.name} serving again")
    st = poll(lambda: (lambda s: s if s["state"]["connected"] else None)(c.admin_json(a, "status")),
              "status saying the store is reachable again")
    assert st["state"]["reconnects"] >= 1
    text = c.admin(a, "status").stdout
    assert "reconnected" in text
    # Nothing lost from the audit: one record per request sent (polls count the requests they
    # made), each chain whole, checked in one go.
    poll(lambda: sum(len(kg.audit_records()) for kg in c.kgs) >= sent, f"{sent} audit records")
    assert sum(len(kg.audit_records()) for kg in c.kgs) == sent
    verify = run_keygate(c.bin, ["audit", "verify", *c.audit_files()], c.tmp)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.count("\n") >= 3


def test_rate_limits_configured_to_fail_open_are_allowed_and_audited_as_such_while_the_store_is_down(
    cluster, redis
):
    c = cluster(agent_extra='rate = "1000/min"', state_extra=', rate_limits = "fail-open", max_stale = "1h"')
    a = c.kgs[0]
    assert models(a, c.token).status_code == 200
    redis.stop()
    r = models(a, c.token)
    assert r.status_code == 200, r.text
    rec = a.audit_record(r.headers["x-request-id"])
    assert rec["state"] == "rate_fail_open" and rec["decision"] == "allow"


def test_rate_limits_fail_closed_by_default_while_the_store_is_down(cluster, redis):
    c = cluster(agent_extra='rate = "1000/min"', state_extra=', max_stale = "1h"')
    a = c.kgs[0]
    assert models(a, c.token).status_code == 200
    redis.stop()
    r = models(a, c.token)
    assert r.status_code == 503 and error_code(r) == "state_unavailable"
    rec = a.audit_record(r.headers["x-request-id"])
    assert rec["reason"] == "state_unavailable" and "state" not in rec


# === config ===


@pytest.mark.parametrize(
    "state, message",
    [
        ('{ backend = "redis" }', "needs url"),
        ('{ backend = "redis", url = "redis://user:pw@127.0.0.1:1" }', "must not carry a user or password"),
        ('{ backend = "redis", url = "http://127.0.0.1:1" }', "redis://host:port"),
        ('{ backend = "redis", url = "redis://127.0.0.1:1", password_from = "nope" }', "no [secrets.nope]"),
        ('{ backend = "redis", url = "redis://127.0.0.1:1", rate_limits = "sometimes" }', "fail-open"),
        ('{ backend = "memcached", url = "redis://127.0.0.1:1" }', "unknown state backend"),
    ],
)
def test_a_bad_state_table_is_refused_with_its_line_and_key(keygate_bin, tmp_path, state, message):
    cfg = tmp_path / "k.toml"
    cfg.write_text(f"state = {state}\n[agents.coder]\n")
    out = run_keygate(keygate_bin, ["check", "--config", str(cfg)], tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{cfg}:1: state" in out.stderr and message in out.stderr, out.stderr


def test_a_good_state_table_checks_and_its_password_comes_from_a_secret(keygate_bin, tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        'instance = "ci-1"\n'
        'state = { backend = "redis", url = "redis://127.0.0.1:6379", username = "keygate", password_from = "redis" }\n'
        '[secrets.redis]\nsource = "env"\nname = "REDIS_PASSWORD"\n[routes.r]\nprefix = "/r"\nupstream = "http://127.0.0.1:9"\n[agents.coder]\n'
    )
    out = run_keygate(keygate_bin, ["check", "--json", "--config", str(cfg)], tmp_path)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)["state"]
    assert state["backend"] == "redis" and state["rate_limits"] == "fail-closed" and state["max_stale"] == "5s"
    assert state["tls"] is False and state["username"] == "keygate"
    # `tls = true` on a redis:// url is TLS, the same as rediss://.
    cfg.write_text('state = { backend = "redis", url = "redis://127.0.0.1:6379", tls = true }\n[routes.r]\nprefix = "/r"\nupstream = "http://127.0.0.1:9"\n[agents.coder]\n')
    out = run_keygate(keygate_bin, ["check", "--json", "--config", str(cfg)], tmp_path)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)["state"]
    assert state["tls"] is True and state["url"] == "rediss://127.0.0.1:6379"
