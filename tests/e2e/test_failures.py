"""When a secret source or the upstream fails, the agent gets a clear keygate error (naming the
source, never its value or its stderr), the failure is audited, and keygate keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import error_code, fake_secret, lab_config, new_token, poll, unused_port_holder

CLIENT_TOKEN = fake_secret("lab-client-")
AUTH = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
CHAT_BODY = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}
WOULD_BE_SECRET = fake_secret("sk-proj-wouldBe")


def assert_still_serving(kg) -> None:
    assert kg.alive(), f"keygate exited:\n{kg.stderr_text()}"
    with kg.client() as c:
        assert c.get("/healthz").status_code == 200
    assert "panicked" not in kg.stderr_text()


def test_failing_secret_command_is_503_naming_the_source_not_its_output(keygate, fake_upstream):
    kg = keygate(
        lab_config("1password.example", fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "FAKE_SECRET_MODE": "fail", "FAKE_OP_SECRET": WOULD_BE_SECRET},
    )
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)

    assert r.status_code == 503, r.text
    assert error_code(r) == "secret_unavailable"
    message = r.json()["error"]["message"]
    assert "op read" in message, "the error must name the secret source (the command)"
    assert "session expired" not in message, "the secret command's stderr was shown to the agent"
    record = kg.audit_record(r.headers["x-request-id"])
    assert record["status"] == 503
    assert fake_upstream.requests == []
    for place, text in {"answer": r.text, "audit": kg.audit_path.read_text(), "stdout": kg.stdout_text(), "stderr": kg.stderr_text()}.items():
        assert WOULD_BE_SECRET not in text, f"the failing command's stderr (holding a secret) reached the {place}"
    assert_still_serving(kg)


def hanging_secret_config(upstream: str) -> dict:
    # A lab config: its secret is tried at start-up and, when that fails, fetched again at first
    # use (a native config would refuse to start instead: test_request_scan.py).
    cfg = lab_config("1password.example", upstream)
    cfg["secret_source"] = dict(cfg["secret_source"], timeout_seconds=1)
    return cfg


def process_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")  # exited, not yet reaped


@pytest.fixture
def hanging_secret(keygate, fake_upstream, tmp_path):
    log = tmp_path / "secret-calls.log"
    kg = keygate(
        hanging_secret_config(fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "FAKE_SECRET_MODE": "hang", "FAKE_SECRET_LOG": str(log)},
    )
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)
    return kg, r, log


def test_hanging_secret_command_times_out_with_a_clear_error(hanging_secret, fake_upstream):
    kg, r, _ = hanging_secret
    assert r.status_code in (503, 504), r.text
    assert error_code(r) in ("secret_unavailable", "secret_timeout")
    assert "op read" in r.json()["error"]["message"], "the error must name the secret source (the command)"
    assert kg.audit_record(r.headers["x-request-id"])["status"] == r.status_code
    assert fake_upstream.requests == []
    assert_still_serving(kg)


def test_hanging_secret_command_is_killed_after_its_timeout(hanging_secret):
    _, r, log = hanging_secret
    assert r.status_code in (503, 504), r.text
    calls = log.read_text().splitlines()
    assert calls, "the secret command never ran"
    for call in calls:
        pid = int(call.split()[1])
        poll(lambda: process_gone(pid), f"the hung secret command (pid {pid}) to be killed")


def test_unreachable_upstream_is_502(keygate):
    holder = unused_port_holder()  # bound, not listening: connections are refused
    try:
        port = holder.getsockname()[1]
        kg = keygate(
            lab_config("env.example", f"http://127.0.0.1:{port}"),
            env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": WOULD_BE_SECRET},
        )
        with kg.client() as c:
            r = c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)
    finally:
        holder.close()

    assert r.status_code == 502, r.text
    assert error_code(r) == "upstream_unreachable"
    assert WOULD_BE_SECRET not in r.text
    assert kg.audit_record(r.headers["x-request-id"])["status"] == 502
    assert_still_serving(kg)


def test_upstream_that_never_answers_is_504_after_upstream_timeout(keygate, fake_upstream):
    fake_upstream.hang = True
    kg = keygate(
        lab_config("env.example", fake_upstream.url, upstream_timeout_seconds=1),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": WOULD_BE_SECRET},
    )
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)

    assert r.status_code == 504, r.text
    assert error_code(r) == "upstream_timeout"
    assert len(fake_upstream.requests) == 1
    assert kg.audit_record(r.headers["x-request-id"])["status"] == 504
    assert_still_serving(kg)


def test_missing_env_secret_is_503_naming_the_variable(keygate, fake_upstream):
    kg = keygate(lab_config("env.example", fake_upstream.url), env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN})
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)

    assert r.status_code == 503, r.text
    assert error_code(r) == "secret_unavailable"
    assert "OPENAI_API_KEY" in r.json()["error"]["message"]
    assert fake_upstream.requests == []
    assert_still_serving(kg)
