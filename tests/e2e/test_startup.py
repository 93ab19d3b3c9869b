"""Start-up and shutdown: the one-line JSON report scripts read, refusals that must stop start-up
(unset client token variable, non-loopback bind), the Unix socket's permissions and peer identity,
and a graceful exit on SIGTERM and SIGINT."""

from __future__ import annotations

import json
import os
import re
import signal
import stat

import httpx
import pytest

from conftest import DEADLINE, StartupFailed, fake_secret, lab_config, native_config, new_token, run_keygate


def test_startup_line_reports_the_real_ephemeral_port(keygate):
    kg = keygate(lab_config("dry-run"))
    line = kg.stdout_text().splitlines()[0]
    report = json.loads(line)

    assert report["ok"] is True
    assert report["mode"] == "dry_run"
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", report["listen"])
    assert m and int(m.group(1)) != 0, report
    assert report["listen"] in report["listeners"]
    with kg.client() as c:
        assert c.get("/healthz").json()["listen"]["port"] == int(m.group(1))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_keygate_gracefully_with_exit_0(keygate, sig):
    kg = keygate(lab_config("dry-run"))
    with kg.client() as c:
        assert c.get("/healthz").status_code == 200
    assert kg.stop(sig) == 0, kg.stderr_text()


def test_unset_client_token_env_stops_startup_naming_the_variable(keygate_bin, tmp_path):
    unset_var = "KG_E2E_UNSET_TOKEN_VAR"
    cfg = lab_config("env.example", "http://127.0.0.1:9", client_token_env=unset_var)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    result = run_keygate(keygate_bin, ["serve", "--config", str(path)], tmp_path, env={"OPENAI_API_KEY": fake_secret("sk-proj-")})

    assert result.returncode == 2, (result.returncode, result.stderr)
    assert unset_var in result.stderr
    assert '"ok":true' not in result.stdout.replace(" ", "")


def test_non_loopback_bind_in_lab_config_is_refused(keygate_bin, tmp_path):
    cfg = lab_config("dry-run", listen_host="0.0.0.0")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    result = run_keygate(keygate_bin, ["serve", "--config", str(path)], tmp_path)

    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "0.0.0.0" in result.stderr


def test_non_loopback_bind_in_native_config_is_refused(keygate_bin, tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(native_config("http://127.0.0.1:9", listen='["0.0.0.0:0"]', mode="dry_run"))
    result = run_keygate(keygate_bin, ["serve", "--config", str(path)], tmp_path, env={"KEYGATE_AGENT_TOKEN": new_token()})

    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "0.0.0.0" in result.stderr


def test_serve_with_a_bad_config_exits_2_without_listening(keygate):
    with pytest.raises(StartupFailed) as failed:
        keygate(dict(lab_config("dry-run"), listen_prot=1))
    assert failed.value.returncode == 2
    assert "listen_prot" in failed.value.stderr


# === Unix socket ===

UNIX_KEY = fake_secret("sk-proj-unix")


@pytest.fixture
def unix_keygate(keygate, fake_upstream, short_tmp):
    token = new_token()
    sock = short_tmp / "kg.sock"
    kg = keygate(
        native_config(fake_upstream.url, listen=f'["127.0.0.1:0", "unix:{sock}"]'),
        env={"KEYGATE_AGENT_TOKEN": token, "OPENAI_API_KEY": UNIX_KEY, "ANTHROPIC_API_KEY": fake_secret("sk-ant-")},
    )
    return kg, sock, token


def test_unix_socket_is_listed_and_private_to_the_user(unix_keygate):
    kg, sock, _ = unix_keygate
    assert f"unix:{sock}" in kg.startup["listeners"]
    mode = os.stat(sock).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600, oct(stat.S_IMODE(mode))


def test_request_over_unix_socket_is_forwarded_and_audited_with_peer_uid(unix_keygate, fake_upstream):
    kg, sock, token = unix_keygate
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=DEADLINE) as c:
        r = c.post(
            "/openai/v1/chat/completions",
            json={"model": "gpt-fake", "messages": []},
            headers={"Authorization": f"Bearer {token}"},
        )

    assert r.status_code == 200, r.text
    assert fake_upstream.requests[0].header("authorization") == f"Bearer {UNIX_KEY}"
    record = kg.audit_record(r.headers["x-request-id"])
    assert record["peer"]["uid"] == os.getuid()
    assert record["peer"]["pid"] == os.getpid()


def test_restart_on_the_same_unix_socket_path_works(unix_keygate, keygate):
    kg, sock, token = unix_keygate
    assert kg.stop() == 0
    keys = {"OPENAI_API_KEY": UNIX_KEY, "ANTHROPIC_API_KEY": fake_secret("sk-ant-")}
    again = keygate(kg.config_path.read_text(), env={"KEYGATE_AGENT_TOKEN": token, **keys})
    assert f"unix:{sock}" in again.startup["listeners"]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=DEADLINE) as c:
        assert c.get("/healthz").status_code == 200
