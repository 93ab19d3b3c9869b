"""The control plane (issue 10), through the real binary: approvals (approve, deny, timeout,
once-per-token, notify) with other traffic flowing; reload by command and by SIGHUP (a good config
applies to the next request and leaves a running stream alone, a broken one is refused while the old
policy keeps serving); freeze and unfreeze, also across a restart; budgets and revocations across a
restart; the admin socket's uid check; `status`; Prometheus `/metrics`; `drill revoke`; Unix-socket
identity by peer uid; the token id in audit records."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus_text

from conftest import DEADLINE, error_code, fake_secret, native_config, new_token, poll, run_keygate
from fake_upstream import CHAT_TEXT

CHAT = {"model": "gpt-fake", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
MSG = {"model": "claude-fake", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


class Setup:
    """A running keygate with a private state_dir (admin socket inside), and how to run admin
    commands against it."""

    def __init__(self, keygate, keygate_bin, tmp_path, state_dir: Path, config: str, env: dict):
        self.keygate, self.bin, self.tmp, self.state_dir, self.env = keygate, keygate_bin, tmp_path, state_dir, env
        self.kg = keygate(config, env=env)

    def admin(self, *args, ok: bool = True, config: Path | None = None) -> subprocess.CompletedProcess:
        cfg = str(config or self.kg.config_path)
        out = run_keygate(self.bin, [*args, "--config", cfg], self.tmp, env=self.env)
        if ok:
            assert out.returncode == 0, f"keygate {args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
        return out

    def admin_json(self, *args):
        return json.loads(self.admin(*args, "--json").stdout)

    def restart(self) -> None:
        self.kg.stop()
        self.kg = self.keygate(self.kg.config_path.read_text(), env=self.env, audit_log=self.kg.audit_path)

    def pending(self, n: int = 1) -> list[dict]:
        return poll(lambda: (lambda p: p if len(p) >= n else None)(self.admin_json("approvals", "list")), f"{n} pending approvals")


def config_with(upstream: str, state_dir: Path, extra_top: str = "", route_extra: str = "", agent_extra: str = "") -> str:
    text = native_config(upstream, extra=agent_extra)
    text = f'state_dir = "{state_dir}"\n{extra_top}\n' + text
    if route_extra:
        text = text.replace('allow = ["POST /v1/messages"]\n', f'allow = ["POST /v1/messages"]\n{route_extra}\n')
    return text


@pytest.fixture
def env():
    return {"KEYGATE_AGENT_TOKEN": new_token(), "OPENAI_API_KEY": fake_secret("sk-proj-ctl"), "ANTHROPIC_API_KEY": fake_secret("sk-ant-api03-ctl")}


@pytest.fixture
def make(keygate, keygate_bin, tmp_path, short_tmp, fake_upstream, env):
    def start(**kw) -> Setup:
        return Setup(keygate, keygate_bin, tmp_path, short_tmp, config_with(fake_upstream.url, short_tmp, **kw), env)

    return start


def chat(s: Setup, token: str | None = None):
    with s.kg.client() as c:
        return c.post("/openai/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {token or s.env['KEYGATE_AGENT_TOKEN']}"})


def message_in_thread(s: Setup) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        with httpx.Client(base_url=s.kg.url, timeout=30, trust_env=False) as c:
            out["resp"] = c.post("/anthropic/v1/messages", json=MSG, headers={"x-api-key": s.env["KEYGATE_AGENT_TOKEN"]})

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# === approvals ===


def test_approved_request_waits_while_20_others_complete_then_goes_through(make, fake_upstream, tmp_path):
    notified = tmp_path / "notified.json"
    s = make(
        route_extra='approval = "each"\napproval_timeout = "25s"',
        extra_top=f'approval_notify = ["{sys.executable}", "-c", "import sys; open({str(notified)!r}, \'w\').write(sys.stdin.read())"]',
    )
    t, out = message_in_thread(s)
    (p,) = s.pending()
    assert (p["agent"], p["route"], p["method"], p["path"], p["model"]) == ("coder", "anthropic", "POST", "/anthropic/v1/messages", "claude-fake")
    assert p["body_bytes"] == len(json.dumps(MSG, separators=(",", ":")).encode()) and p["id"].startswith("apr_") and p["age_seconds"] >= 0
    # The waiting request blocks nobody: 20 other requests complete meanwhile.
    for _ in range(20):
        assert chat(s).status_code == 200
    assert "resp" not in out and fake_upstream.requests and all(r.path != "/v1/messages" for r in fake_upstream.requests)
    assert json.loads(poll(lambda: notified.exists() and notified.read_text(), "approval_notify's stdin"))["id"] == p["id"]

    text = s.admin("approvals", "list").stdout
    assert p["id"] in text and "claude-fake" in text
    s.admin("approve", p["id"])
    t.join(DEADLINE)
    r = out["resp"]
    assert r.status_code == 200, r.text
    rec = s.kg.audit_record(r.headers["x-request-id"])
    assert rec["approval_id"] == p["id"] and rec["approved_by"] == "root" and rec["decision"] == "allow"
    events = [e for e in s.kg.audit_log() if e.get("event") == "approve"]
    assert events and events[0]["approval_id"] == p["id"] and events[0]["by"] == "root"
    assert s.admin_json("approvals", "list") == []


def test_denied_request_gets_403_approval_denied_with_the_reason(make, fake_upstream):
    s = make(route_extra='approval = "each"\napproval_timeout = "25s"')
    t, out = message_in_thread(s)
    (p,) = s.pending()
    s.admin("deny", p["id"], "--reason", "not today")
    t.join(DEADLINE)
    r = out["resp"]
    assert r.status_code == 403 and error_code(r) == "approval_denied"
    assert "not today" in r.json()["error"]["message"]
    assert all(req.path != "/v1/messages" for req in fake_upstream.requests)
    rec = s.kg.audit_record(r.headers["x-request-id"])
    assert (rec["reason"], rec["approval_id"], rec["approved_by"]) == ("approval_denied", p["id"], "root")
    # A decided approval is gone: deciding it again says so.
    again = s.admin("approve", p["id"], ok=False)
    assert again.returncode == 1 and "no pending approval" in again.stderr


def test_unanswered_approval_times_out_with_403_and_other_routes_still_pass(make, fake_upstream):
    s = make(route_extra='approval = "each"\napproval_timeout = "1s"')
    with s.kg.client() as c:
        r = c.post("/anthropic/v1/messages", json=MSG, headers={"x-api-key": s.env["KEYGATE_AGENT_TOKEN"]})
    assert r.status_code == 403 and error_code(r) == "approval_timeout"
    assert chat(s).status_code == 200
    assert s.admin_json("approvals", "list") == []
    assert [q.path for q in fake_upstream.requests] == ["/v1/chat/completions"]


def test_once_per_token_asks_for_the_first_request_only(make, fake_upstream):
    s = make(route_extra='approval = "once-per-token"\napproval_timeout = "25s"')
    t, out = message_in_thread(s)
    (p,) = s.pending()
    s.admin("approve", p["id"])
    t.join(DEADLINE)
    assert out["resp"].status_code == 200
    with s.kg.client() as c:
        second = c.post("/anthropic/v1/messages", json=MSG, headers={"x-api-key": s.env["KEYGATE_AGENT_TOKEN"]})
    assert second.status_code == 200, second.text
    assert "approval_id" not in s.kg.audit_record(second.headers["x-request-id"])


# === reload ===


def test_reload_applies_a_new_rule_to_the_next_request_and_leaves_a_running_stream_alone(make, fake_upstream):
    s = make()
    before = s.kg.startup["policy_version"]
    fake_upstream.first_event_gate = gate = threading.Event()
    client = openai.OpenAI(base_url=f"{s.kg.url}/openai/v1", api_key=s.env["KEYGATE_AGENT_TOKEN"], max_retries=0, timeout=DEADLINE)
    stream = client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True)
    with stream:
        events = iter(stream)
        next(events)
        cfg = s.kg.config_path
        cfg.write_text(cfg.read_text().replace('"POST /v1/chat/completions", ', ""))
        out = s.admin("reload")
        assert "reloaded" in out.stdout
        r = chat(s)
        assert r.status_code == 403 and error_code(r) == "path_not_allowed"
        gate.set()
        rest = list(events)
    assert fake_upstream.gate_timeouts == []
    assert "".join(c.choices[0].delta.content or "" for c in rest) == "".join(CHAT_TEXT)
    after = s.kg.audit_record(r.headers["x-request-id"])["policy_version"]
    assert after != before
    (ev,) = [e for e in s.kg.audit_log() if e.get("event") == "reload"]
    assert (ev["by"], ev["previous_policy_version"], ev["policy_version"]) == ("root", before, after)
    assert s.admin_json("status")["policy_version"] == after
    # Control records share the hash chain with request records.
    s.kg.stop()
    verify = run_keygate(s.bin, ["audit", "verify", str(s.kg.audit_path)], s.tmp)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_broken_config_is_refused_on_reload_and_the_old_policy_keeps_serving(make):
    s = make()
    cfg = s.kg.config_path
    good = cfg.read_text()
    cfg.write_text(good + "\n[agents.other]\nroutes = [\"nope\"]\n")
    bad_line = cfg.read_text().splitlines().index('routes = ["nope"]') + 1
    out = s.admin("reload", ok=False)
    assert out.returncode == 1
    assert f"{cfg}:{bad_line}: agents.other.routes" in out.stderr, out.stderr
    assert chat(s).status_code == 200
    assert s.admin_json("status")["policy_version"] == s.kg.startup["policy_version"]
    (ev,) = [e for e in s.kg.audit_log() if e.get("event") == "reload_failed"]
    assert "agents.other.routes" in ev["error"]


def test_sighup_reloads_and_never_kills_keygate(make):
    s = make()
    cfg = s.kg.config_path
    good = cfg.read_text()
    cfg.write_text(good + "\nthis is not toml\n")
    s.kg.proc.send_signal(signal.SIGHUP)
    poll(lambda: any(e.get("event") == "reload_failed" for e in s.kg.audit_log()), "the failed reload's record")
    assert s.kg.alive() and chat(s).status_code == 200
    cfg.write_text(good.replace('"POST /v1/chat/completions", ', ""))
    s.kg.proc.send_signal(signal.SIGHUP)
    poll(lambda: chat(s).status_code == 403, "the reloaded rule to apply")
    assert s.kg.alive()
    assert any(e.get("event") == "reload" and e["by"] == "SIGHUP" for e in s.kg.audit_log())
    assert s.kg.stop() == 0


def test_every_sighup_reloads_not_only_the_first(make):
    # Suspected: after one SIGHUP reload, further SIGHUPs were not acted on. Three SIGHUPs, the
    # config changed before each: three reload records, each new version serving requests.
    s = make()
    cfg = s.kg.config_path
    good = cfg.read_text()
    versions = [s.kg.startup["policy_version"]]
    for i in range(1, 4):
        cfg.write_text(good + "\n" + "".join(f"[agents.extra{j}]\n" for j in range(i)))
        s.kg.proc.send_signal(signal.SIGHUP)
        poll(
            lambda: len([e for e in s.kg.audit_log() if e.get("event") == "reload"]) == i,
            f"reload record {i}",
        )
        (ev,) = [e for e in s.kg.audit_log() if e.get("event") == "reload"][i - 1 : i]
        assert ev["by"] == "SIGHUP" and ev["previous_policy_version"] == versions[-1]
        versions.append(ev["policy_version"])
        r = chat(s)
        assert r.status_code == 200
        assert s.kg.audit_record(r.headers["x-request-id"])["policy_version"] == versions[-1]
    assert len(set(versions)) == 4, versions
    # Benign neighbour: an unchanged config reloads too, keeping its version.
    s.kg.proc.send_signal(signal.SIGHUP)
    poll(lambda: len([e for e in s.kg.audit_log() if e.get("event") == "reload"]) == 4, "reload record 4")
    assert s.admin_json("status")["policy_version"] == versions[-1]
    assert s.kg.stop() == 0


# === freeze ===


def test_freeze_refuses_everything_with_503_and_survives_a_restart(make, fake_upstream):
    s = make()
    assert chat(s).status_code == 200
    s.admin("freeze")
    r = chat(s)
    assert r.status_code == 503 and error_code(r) == "frozen"
    with s.kg.client() as c:
        assert c.get("/openai/v1/models").status_code == 503  # even without a token
    s.restart()
    assert error_code(chat(s)) == "frozen"
    assert s.admin_json("status")["frozen"]["all"]["by"] == "root"
    s.admin("unfreeze")
    assert chat(s).status_code == 200
    events = [e["event"] for e in s.kg.audit_log() if e.get("event") in ("freeze", "unfreeze")]
    assert events == ["freeze", "unfreeze"]  # both runs write to the same log
    assert len(fake_upstream.requests) == 2
    s.kg.stop()
    verify = run_keygate(s.bin, ["audit", "verify", str(s.kg.audit_path)], s.tmp)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_freeze_while_keygate_is_stopped_holds_from_its_next_start(make):
    s = make()
    s.kg.stop()
    out = s.admin("freeze")
    assert "not running" in out.stderr and "next start" in out.stderr
    s.restart()
    assert error_code(chat(s)) == "frozen"
    s.admin("unfreeze")
    assert chat(s).status_code == 200


def test_freezing_one_agent_leaves_the_others_alone(make, env):
    other = new_token()
    env["OTHER_TOKEN"] = other
    s = make(agent_extra='\n[agents.other]\ntoken_env = "OTHER_TOKEN"\n')
    s.admin("freeze", "--agent", "other")
    r = chat(s, other)
    assert r.status_code == 503 and error_code(r) == "frozen"
    assert chat(s).status_code == 200
    s.restart()
    assert chat(s, other).status_code == 503 and chat(s).status_code == 200
    s.admin("unfreeze", "--agent", "other")
    assert chat(s, other).status_code == 200


# === durable budgets and revocations ===


def test_spent_budget_holds_across_a_restart(make):
    s = make(agent_extra="budget_tokens = { per = \"day\", limit = 20 }\n")
    codes = []
    for _ in range(5):
        codes.append(chat(s).status_code)
        if codes[-1] == 429:
            break
    assert codes[0] == 200 and codes[-1] == 429, codes
    s.restart()
    r = chat(s)
    assert r.status_code == 429 and error_code(r) in ("budget_exhausted", "budget_exceeded")
    status = s.admin_json("status")
    (coder,) = [a for a in status["agents"] if a["name"] == "coder"]
    assert coder["budget"]["spent"] >= 20
    assert int(r.headers["retry-after"]) >= 1
    # A reload keeps the counter too.
    s.admin("reload")
    assert chat(s).status_code == 429


def test_revoked_token_stays_revoked_across_a_restart_and_its_id_is_audited(make):
    s = make()
    issued = s.admin("token", "issue", "--agent", "coder", "--ttl", "1h")
    token = issued.stdout.strip()
    token_id = issued.stderr.split()[1]
    r = poll(lambda: (lambda r: r if r.status_code == 200 else None)(chat(s, token)), "the issued token to be accepted")
    rec = s.kg.audit_record(r.headers["x-request-id"])
    assert rec["token_id"] == token_id and token not in json.dumps(rec)
    s.admin("token", "revoke", token_id)
    poll(lambda: chat(s, token).status_code == 401, "the revocation to apply")
    s.restart()
    assert chat(s, token).status_code == 401
    assert chat(s).status_code == 200


# === admin socket, status, metrics ===


def test_status_names_secrets_by_key_id_and_never_shows_a_value(make, env):
    s = make()
    assert chat(s).status_code == 200
    st = s.admin_json("status")
    assert st["policy_version"] == s.kg.startup["policy_version"] and st["listeners"] == s.kg.startup["listeners"]
    (sec,) = [x for x in st["secrets"] if x["name"] == "openai"]
    assert sec["source"] == "env:OPENAI_API_KEY" and sec["key_id"] and sec["last_fetch"]
    assert st["frozen"]["all"] is None and st["audit"]["healthy"] is True and st["pending_approvals"] == []
    text = s.admin("status").stdout
    for out in (json.dumps(st), text):
        assert env["OPENAI_API_KEY"] not in out and env["KEYGATE_AGENT_TOKEN"] not in out
    assert "openai" in text and "env:OPENAI_API_KEY" in text


def test_admin_commands_say_clearly_when_keygate_is_not_running(make):
    s = make()
    s.kg.stop()
    out = s.admin("status", ok=False)
    assert out.returncode == 1 and "keygate is not running" in out.stderr


def test_metrics_parse_as_prometheus_text_and_count_the_requests_sent(make):
    s = make()
    for _ in range(3):
        assert chat(s).status_code == 200
    with s.kg.client() as c:
        for _ in range(2):
            assert c.post("/openai/v1/images", json=CHAT, headers={"Authorization": f"Bearer {s.env['KEYGATE_AGENT_TOKEN']}"}).status_code == 403
    sock = s.state_dir / "admin.sock"
    s.kg.audit_records(5)
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://keygate", timeout=DEADLINE) as c:
        text = c.get("/metrics").text
    # The strict OpenMetrics parser (the content type keygate declares) reads every family; the
    # classic Prometheus text parser reads it too.
    families = {f.name: f for f in parse_openmetrics(text)}
    assert list(parse_prometheus_text(text))
    requests = {
        (x.labels["route"], x.labels["agent"], x.labels["decision"], x.labels["status"]): x.value
        for x in families["keygate_requests"].samples
        if x.name == "keygate_requests_total"
    }
    assert requests == {("openai", "coder", "allow", "200"): 3, ("openai", "coder", "deny", "403"): 2}
    counts = [x.value for x in families["keygate_request_duration_seconds"].samples if x.name.endswith("_count")]
    assert counts == [5]
    assert [x.value for x in families["keygate_pending_approvals"].samples] == [0]


def metrics_text(s: Setup) -> str:
    sock = s.state_dir / "admin.sock"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://keygate", timeout=DEADLINE) as c:
        return c.get("/metrics").text


def test_metrics_after_a_reload_still_count_requests_in_the_same_series(make):
    # Each worker keeps the handles of the series it counted last: a reload (a config with new
    # route and agent names) must not leave a request uncounted or counted apart.
    s = make()
    headers = {"Authorization": f"Bearer {s.env['KEYGATE_AGENT_TOKEN']}"}
    with s.kg.client() as c:
        for _ in range(3):
            assert c.post("/openai/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
        s.kg.audit_records(3)
        out = s.admin("reload")
        assert "reloaded" in out.stdout
        for _ in range(2):
            assert c.post("/openai/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    assert chat(s).status_code == 200
    s.kg.audit_records(6)
    families = {f.name: f for f in parse_openmetrics(metrics_text(s))}
    requests = {
        (x.labels["route"], x.labels["agent"], x.labels["decision"], x.labels["status"]): x.value
        for x in families["keygate_requests"].samples
        if x.name == "keygate_requests_total"
    }
    assert requests == {("openai", "coder", "allow", "200"): 6}
    counts = [x.value for x in families["keygate_request_duration_seconds"].samples if x.name.endswith("_count")]
    assert counts == [6]
    assert [x.value for x in families["keygate_reloads"].samples if x.name == "keygate_reloads_total"] == [1]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user (nobody)")
def test_admin_socket_refuses_a_connection_from_another_uid(make):
    s = make()
    sock = s.state_dir / "admin.sock"
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print('refused:', e.strerror); sys.exit(0)\n"
        "s.sendall(b'GET /status HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "print(s.recv(65536).decode(errors='replace'))\n"
    )

    def as_nobody():
        def drop():
            os.setgid(65534)
            os.setuid(65534)

        return subprocess.run(["/usr/bin/python3", "-c", probe, str(sock)], capture_output=True, text=True, timeout=DEADLINE, preexec_fn=drop)

    # The socket's mode keeps other users out...
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert "refused:" in as_nobody().stdout
    # ...and were its mode opened, keygate itself refuses another uid.
    os.chmod(s.state_dir, 0o755)
    os.chmod(sock, 0o666)
    out = as_nobody().stdout
    assert "403" in out.split("\r\n")[0] and "uid 65534 may not use" in out
    assert s.admin_json("status")["ok"] is True  # keygate's own user still may


# === Unix-socket identity ===


def test_a_mapped_unix_peer_uid_needs_no_token_and_an_unmapped_one_does(keygate, fake_upstream, short_tmp, env):
    sock = short_tmp / "agent.sock"
    base = native_config(fake_upstream.url, listen=f'["127.0.0.1:0", "unix:{sock}"]')
    mapped = keygate(f'state_dir = "{short_tmp}/a"\n' + base + f"unix_uids = [{os.getuid()}]\n", env=env)
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=DEADLINE) as c:
        placeholder = {"Authorization": " ".join(("Bearer", "sdk-placeholder"))}
        r = c.post("/openai/v1/chat/completions", json=CHAT, headers=placeholder)
    assert r.status_code == 200, r.text
    rec = mapped.audit_record(r.headers["x-request-id"])
    assert rec["agent"] == "coder" and rec["peer"]["uid"] == os.getuid()
    assert "sdk-placeholder" not in fake_upstream.requests[-1].wire_text()
    with mapped.client() as c:  # TCP has no peer uid: a token is still needed
        assert c.post("/openai/v1/chat/completions", json=CHAT).status_code == 401
    mapped.stop()

    other_uid = os.getuid() + 4242
    unmapped = keygate(f'state_dir = "{short_tmp}/b"\n' + base + f"unix_uids = [{other_uid}]\n", env=env)
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=DEADLINE) as c:
        r = c.post("/openai/v1/chat/completions", json=CHAT)
        assert r.status_code == 401 and error_code(r) == "missing_token"
        ok = c.post("/openai/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {env['KEYGATE_AGENT_TOKEN']}"})
        assert ok.status_code == 200
    unmapped.stop()


# === drill ===

DRILL_CONFIG = """\
state_dir = "{state}"
audit_log = "{audit}"

[secrets.openai]
source = "env"
name = "OPENAI_API_KEY"

[secrets.anthropic]
source = "env"
name = "ANTHROPIC_API_KEY"

[routes.openai]
prefix = "/openai"
upstream = "http://127.0.0.1:9"
secret = "openai"
allow = ["POST /v1/chat/completions"]

[routes.anthropic]
prefix = "/anthropic"
upstream = "http://127.0.0.1:9"
secret = "anthropic"
inject = "header:x-api-key"
allow = ["POST /v1/messages"]

[agents.coder]
routes = ["openai", "anthropic"]

[agents.reviewer]
routes = ["anthropic"]
"""


def audit_line(age_s: float, agent: str, route: str, decision: str = "allow") -> str:
    t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - age_s))
    return json.dumps({"time": t, "request_id": f"req_{agent}_{route}_{age_s}", "agent": agent, "route": route, "decision": decision, "status": 200 if decision == "allow" else 403})


def test_drill_revoke_lists_what_would_break_and_changes_nothing(keygate_bin, tmp_path, short_tmp):
    audit = tmp_path / "sample-audit.jsonl"
    lines = [json.dumps({"time": "2026-01-01T00:00:00Z", "event": "start"})]
    lines += [audit_line(60 * i, "coder", "openai") for i in range(3)]
    lines += [audit_line(120 * i, "coder", "anthropic") for i in range(2)]
    lines += [audit_line(30, "reviewer", "anthropic"), audit_line(40, "reviewer", "anthropic", "deny")]
    lines += [audit_line(2 * 86400, "coder", "openai")]  # outside --since 24h
    audit.write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "drill.toml"
    cfg.write_text(DRILL_CONFIG.format(state=short_tmp, audit=audit))
    ids = {}
    for agent in ("coder", "reviewer"):
        out = run_keygate(keygate_bin, ["token", "issue", "--agent", agent, "--config", str(cfg)], tmp_path)
        assert out.returncode == 0, out.stderr
        ids[agent] = out.stderr.split()[1]
    def tokens():
        out = run_keygate(keygate_bin, ["token", "list", "--json", "--config", str(cfg)], tmp_path)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    before = (audit.read_bytes(), tokens())

    def drill(*args):
        out = run_keygate(keygate_bin, ["drill", "revoke", *args, "--config", str(cfg), "--json"], tmp_path)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    by_secret = drill("--secret", "anthropic")
    assert by_secret["routes"] == ["anthropic"] and sorted(by_secret["agents"]) == ["coder", "reviewer"]
    assert by_secret["agents_stopped_entirely"] == ["reviewer"]
    assert [t["id"] for t in by_secret["tokens"]] == [ids["reviewer"]]
    assert by_secret["requests_would_be_refused"] == 3
    assert by_secret["by_agent_route"] == [
        {"agent": "coder", "route": "anthropic", "requests": 2},
        {"agent": "reviewer", "route": "anthropic", "requests": 1},
    ]

    by_agent = drill("--agent", "coder")
    assert sorted(by_agent["routes"]) == ["anthropic", "openai"] and by_agent["agents"] == ["coder"]
    assert [t["id"] for t in by_agent["tokens"]] == [ids["coder"]]
    assert by_agent["requests_would_be_refused"] == 5

    by_route = drill("--route", "openai", "--since", "72h")
    assert by_route["agents"] == ["coder"] and by_route["agents_stopped_entirely"] == []
    assert by_route["requests_would_be_refused"] == 4 and by_route["tokens"] == []

    text = run_keygate(keygate_bin, ["drill", "revoke", "--secret", "anthropic", "--config", str(cfg)], tmp_path).stdout
    assert "nothing was changed" in text and "reviewer" in text and "3 of" in text
    assert (audit.read_bytes(), tokens()) == before
    bad = run_keygate(keygate_bin, ["drill", "revoke", "--agent", "nobody", "--config", str(cfg)], tmp_path)
    assert bad.returncode == 2 and "no [agents.nobody]" in bad.stderr


def test_tokens_json_from_an_earlier_keygate_is_migrated_and_its_tokens_still_work(make, tmp_path, short_tmp, fake_upstream):
    token = new_token()
    import hashlib

    digest = hashlib.sha256(token.encode()).hexdigest()
    now = int(time.time())
    old = {"tokens": [{"id": f"tok_{digest[:12]}", "agent": "coder", "sha256": digest, "created": now, "expires": now + 3600, "revoked": False}]}
    (short_tmp / "tokens.json").write_text(json.dumps(old))
    os.chmod(short_tmp / "tokens.json", 0o600)
    s = make()
    r = chat(s, token)
    assert r.status_code == 200, r.text
    assert s.kg.audit_record(r.headers["x-request-id"])["token_id"] == f"tok_{digest[:12]}"
    assert not (short_tmp / "tokens.json").exists() and (short_tmp / "tokens.json.migrated").exists()
    listed = json.loads(s.admin("token", "list", "--json").stdout)
    assert [t["id"] for t in listed] == [f"tok_{digest[:12]}"]


def test_reload_fetches_secrets_afresh(keygate, keygate_bin, tmp_path, short_tmp, fake_upstream, env):
    key_file = tmp_path / "openai.key"
    first, second = fake_secret("sk-proj-one"), fake_secret("sk-proj-two")
    key_file.write_text(first)
    os.chmod(key_file, 0o600)
    text = config_with(fake_upstream.url, short_tmp).replace(
        'source = "env"\nname = "OPENAI_API_KEY"', f'source = "file"\npath = "{key_file}"'
    )
    s = Setup(keygate, keygate_bin, tmp_path, short_tmp, text, env)
    assert chat(s).status_code == 200
    key_file.write_text(second)
    assert chat(s).status_code == 200  # cached: no TTL, no 401
    s.admin("reload")
    assert chat(s).status_code == 200
    seen = [r.header("authorization") for r in fake_upstream.requests]
    assert seen == [f"Bearer {first}", f"Bearer {first}", f"Bearer {second}"]
    # A reload whose secret cannot be fetched is refused; the running policy and key stay.
    key_file.unlink()
    refused = s.admin("reload", ok=False)
    assert refused.returncode == 1 and str(key_file) in refused.stderr, refused.stderr
    assert chat(s).status_code == 200
    assert fake_upstream.requests[-1].header("authorization") == f"Bearer {second}"
