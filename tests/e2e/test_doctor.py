"""`keygate doctor` finds what would stop keygate from serving (a failing secret source, a busy
port, a too-open state dir or secret file, a stalled upstream), says what to do about each, exits 1
for a problem and 0 for a good setup, and never shows a secret value."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from conftest import fake_secret, native_config, new_token, run_keygate

# A stalled upstream is given up on after 5 s; the whole doctor run stays well within this.
DOCTOR_DEADLINE = 25.0


def good_setup(tmp_path: Path, upstream: str, listen: str = '["127.0.0.1:0"]') -> tuple[Path, dict[str, str], list[str]]:
    """A config whose every check passes: an env secret, a 0600 file secret, a 0700 state dir, an
    existing audit directory, a reachable upstream. Returns (config, env, secret values)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (tmp_path / "logs").mkdir()
    key_file = tmp_path / "anthropic.key"
    anthropic_key = fake_secret("sk-ant-api03-doctor")
    key_file.write_text(anthropic_key)
    key_file.chmod(0o600)
    openai_key = fake_secret("sk-proj-doctor")
    # The Anthropic secret comes from the file instead of the environment; top-level keys go
    # before the first table.
    text = native_config(upstream, listen=listen).replace(
        'source = "env"\nname = "ANTHROPIC_API_KEY"',
        f'source = "file"\npath = "{key_file}"',
    )
    config = tmp_path / "keygate.toml"
    config.write_text(f'state_dir = "{state}"\naudit_log = "{tmp_path}/logs/audit.jsonl"\n' + text)
    env = {"OPENAI_API_KEY": openai_key, "KEYGATE_AGENT_TOKEN": new_token()}
    return config, env, [openai_key, anthropic_key, env["KEYGATE_AGENT_TOKEN"]]


def doctor(keygate_bin, tmp_path, config: Path, env: dict[str, str], json_out: bool = True):
    args = ["doctor", "--config", str(config)] + (["--json"] if json_out else [])
    return run_keygate(keygate_bin, args, tmp_path, env=env, timeout=DOCTOR_DEADLINE)


def findings(result) -> list[dict]:
    return json.loads(result.stdout)["checks"]


def failed(result, check: str) -> list[dict]:
    return [f for f in findings(result) if f["check"] == check and f["status"] == "fail"]


def assert_no_secret_shown(result, values: list[str]) -> None:
    out = result.stdout + result.stderr
    for v in values:
        assert v not in out, "doctor printed a secret value"


def test_doctor_passes_a_good_setup_with_exit_0(keygate_bin, tmp_path, fake_upstream):
    config, env, secrets = good_setup(tmp_path, fake_upstream.url)

    result = doctor(keygate_bin, tmp_path, config, env)

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["problems"] == 0
    statuses = {(f["check"], f["status"]) for f in report["checks"]}
    for check in ("config", "secret", "upstream", "audit", "state", "admin", "listen", "landlock"):
        assert any(c == check for c, _ in statuses), f"no {check} check in {report['checks']}"
    secret_findings = [f for f in report["checks"] if f["check"] == "secret"]
    assert [f["status"] for f in secret_findings] == ["ok", "ok"], secret_findings
    assert_no_secret_shown(result, secrets)

    text = doctor(keygate_bin, tmp_path, config, env, json_out=False)
    assert text.returncode == 0
    assert "all checks passed" in text.stdout
    assert_no_secret_shown(text, secrets)


def test_doctor_reports_a_failing_command_and_a_missing_file_with_their_fixes(keygate_bin, tmp_path, fake_upstream):
    config, env, secrets = good_setup(tmp_path, fake_upstream.url)
    missing = tmp_path / "no-such.key"
    text = config.read_text()
    text = text.replace('source = "env"\nname = "OPENAI_API_KEY"', 'source = "command"\nargv = ["/bin/sh", "-c", "exit 1"]')
    text = text.replace(f'path = "{tmp_path}/anthropic.key"', f'path = "{missing}"')
    config.write_text(text)

    result = doctor(keygate_bin, tmp_path, config, env)

    assert result.returncode == 1, result.stdout + result.stderr
    bad = {f["subject"].split()[0]: f for f in failed(result, "secret")}
    assert set(bad) == {"openai", "anthropic"}, findings(result)
    assert "failed" in bad["openai"]["detail"]
    assert "run `/bin/sh` yourself" in bad["openai"]["fix"]
    assert f"create {missing}" in bad["anthropic"]["fix"] and "chmod 600" in bad["anthropic"]["fix"]
    assert_no_secret_shown(result, secrets)


def test_doctor_gives_up_on_a_stalled_command_and_a_stalled_upstream(keygate_bin, tmp_path):
    # Accepts TCP but never answers a TLS hello: only the probe's own deadline ends it.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        config, env, _ = good_setup(tmp_path, f"https://127.0.0.1:{silent.getsockname()[1]}")
        text = config.read_text().replace(
            'source = "env"\nname = "OPENAI_API_KEY"',
            'source = "command"\nargv = ["/bin/sleep", "60"]\ntimeout = "1s"',
        )
        config.write_text(text)

        result = doctor(keygate_bin, tmp_path, config, env)
    finally:
        silent.close()

    assert result.returncode == 1, result.stdout + result.stderr
    [cmd] = [f for f in failed(result, "secret") if f["subject"].startswith("openai")]
    assert "did not finish" in cmd["detail"] and "timeout" in cmd["fix"]
    [up] = failed(result, "upstream")
    assert "no answer within" in up["detail"], up


def test_doctor_reports_a_port_held_by_another_program_and_passes_a_free_one(keygate_bin, tmp_path, fake_upstream):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(4)
    busy = holder.getsockname()[1]
    try:
        config, env, _ = good_setup(tmp_path, fake_upstream.url, listen=f'["127.0.0.1:{busy}"]')
        result = doctor(keygate_bin, tmp_path, config, env)
    finally:
        holder.close()

    assert result.returncode == 1, result.stdout + result.stderr
    [port] = failed(result, "listen")
    assert "not a keygate" in port["detail"]
    assert f"ss -ltnp 'sport = :{busy}'" in port["fix"]

    # The benign neighbour: the same config once the port is free again.
    free = doctor(keygate_bin, tmp_path, config, env)
    assert [f["status"] for f in findings(free) if f["check"] == "listen"] == ["ok"], free.stdout


def test_doctor_tells_a_port_held_by_another_keygate(keygate_bin, keygate, tmp_path, fake_upstream):
    other_env = {"OPENAI_API_KEY": fake_secret("sk-proj-other"), "ANTHROPIC_API_KEY": fake_secret("sk-ant-api03-other"), "KEYGATE_AGENT_TOKEN": new_token()}
    running = keygate(native_config(fake_upstream.url), env=other_env)
    config, env, _ = good_setup(tmp_path, fake_upstream.url, listen=f'["127.0.0.1:{running.port}"]')

    result = doctor(keygate_bin, tmp_path, config, env)

    assert result.returncode == 1, result.stdout + result.stderr
    [port] = failed(result, "listen")
    assert "a keygate already listens there" in port["detail"], port
    assert "stop that keygate" in port["fix"]


def test_doctor_reports_an_open_state_dir_and_secret_file_with_chmod_fixes(keygate_bin, tmp_path, fake_upstream):
    config, env, secrets = good_setup(tmp_path, fake_upstream.url)
    (tmp_path / "state").chmod(0o755)
    (tmp_path / "anthropic.key").chmod(0o644)

    result = doctor(keygate_bin, tmp_path, config, env)

    assert result.returncode == 1, result.stdout + result.stderr
    [state] = failed(result, "state")
    assert "755" in state["detail"] and state["fix"] == f"chmod 700 {tmp_path / 'state'}"
    [key] = failed(result, "secret")
    assert key["fix"] == f"chmod 600 {tmp_path / 'anthropic.key'}"
    text = doctor(keygate_bin, tmp_path, config, env, json_out=False)
    assert "fix: chmod 700" in text.stdout and "2 problems found" in text.stdout, text.stdout
    assert_no_secret_shown(result, secrets)
    assert_no_secret_shown(text, secrets)


def test_doctor_reports_a_bad_config_with_its_line(keygate_bin, tmp_path):
    config = tmp_path / "keygate.toml"
    config.write_text('listen = ["127.0.0.1:0"]\nmode = "sideways"\n')

    result = doctor(keygate_bin, tmp_path, config, {})

    assert result.returncode == 1, result.stdout + result.stderr
    [bad] = failed(result, "config")
    assert f"{config}:2" in bad["detail"]
    assert "keygate check --config" in bad["fix"]


def test_doctor_reports_an_unset_agent_token_variable(keygate_bin, tmp_path, fake_upstream):
    config, env, _ = good_setup(tmp_path, fake_upstream.url)
    del env["KEYGATE_AGENT_TOKEN"]

    result = doctor(keygate_bin, tmp_path, config, env)

    assert result.returncode == 1, result.stdout + result.stderr
    [agents] = failed(result, "agents")
    assert "KEYGATE_AGENT_TOKEN" in agents["detail"] and agents["fix"].startswith("export KEYGATE_AGENT_TOKEN=")


def test_doctor_passes_while_its_own_keygate_runs_on_the_port(keygate_bin, keygate, tmp_path, fake_upstream):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config, env, secrets = good_setup(tmp_path, fake_upstream.url, listen=f'["127.0.0.1:{port}"]')
    anthropic_key = (tmp_path / "anthropic.key").read_text()
    keygate(config.read_text(), env={**env, "ANTHROPIC_API_KEY": anthropic_key}, audit_log=None)

    result = doctor(keygate_bin, tmp_path, config, env)

    assert result.returncode == 0, result.stdout + result.stderr
    [listen] = [f for f in findings(result) if f["check"] == "listen"]
    assert "this config's running keygate" in listen["detail"], listen
    [admin] = [f for f in findings(result) if f["check"] == "admin"]
    assert "is running" in admin["detail"], admin
    assert_no_secret_shown(result, secrets)


def test_doctor_on_the_dry_run_example_without_a_token_warns_as_serve_does(keygate_bin, tmp_path):
    # serve accepts a dry run whose agent token variable is unset (callers need no token), so
    # doctor must not call that a failure; the same agent outside a dry run is one (test above).
    config = Path(__file__).resolve().parents[2] / "examples" / "dry-run.toml"
    text = config.read_text().replace("127.0.0.1:8791", "127.0.0.1:0")
    copy = tmp_path / "dry-run.toml"
    copy.write_text(text)
    result = doctor(keygate_bin, tmp_path, copy, {})

    assert result.returncode == 0, result.stdout + result.stderr
    [agents] = [f for f in findings(result) if f["check"] == "agents"]
    assert agents["status"] == "warn" and "need no token" in agents["detail"], agents
