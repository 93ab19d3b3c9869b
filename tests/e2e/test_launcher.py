"""`keygate run -- <agent>`: Claude Code and Codex complete a turn against the fake model API with
nothing but what the launcher sets: the test exports no API key and no base URL. The agent runs in
the sandbox (where the kernel has Landlock), with a token minted for the run and revoked after.

scripts/test installs both CLIs with npm into target/agent-clis (CLAUDE_BIN, CODEX_BIN override)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from conftest import REPO, fake_secret, native_config

CLAUDE = Path(os.environ.get("CLAUDE_BIN", REPO / "target" / "agent-clis" / "bin" / "claude"))
CODEX = Path(os.environ.get("CODEX_BIN", REPO / "target" / "agent-clis" / "bin" / "codex"))


def start(keygate, fake_upstream, tmp_path, extra_routes: str = ""):
    openai_key = fake_secret("sk-proj-e2e")
    anthropic_key = fake_secret("sk-ant-api03-e2e")
    config = f'state_dir = "{tmp_path / "state"}"\n' + native_config(fake_upstream.url, token_env="UNUSED_TOKEN") + extra_routes
    kg = keygate(config, env={"UNUSED_TOKEN": "kg_" + "u" * 40, "OPENAI_API_KEY": openai_key, "ANTHROPIC_API_KEY": anthropic_key})
    return kg, openai_key, anthropic_key


def launch(keygate_bin, kg, argv, env, cwd, timeout=120):
    """`keygate run` with a plain environment: PATH, HOME and the agent's own settings only, plus a
    provider key the launcher must take away."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **env}
    proc = subprocess.Popen(
        [str(keygate_bin), "run", "--config", str(kg.config_path), "--", *argv],
        env=full_env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        # The agent and whatever it started share the launcher's process group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def status_with(kg, token: str) -> int:
    req = urllib.request.Request(
        kg.url + "/anthropic/v1/messages", data=b"{}", headers={"x-api-key": token, "content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def run_records(kg):
    lines = [json.loads(x) for x in kg.audit_path.read_text().splitlines() if x.strip()]
    return [r for r in lines if r.get("request_id")], [r for r in lines if r.get("event") in ("run_start", "run_end")]


def test_claude_code_turn_started_with_keygate_run_needs_no_key_or_base_url_from_the_test(keygate, keygate_bin, fake_upstream, tmp_path):
    assert CLAUDE.exists(), f"Claude Code is not installed at {CLAUDE}; scripts/test installs it"
    kg, _openai_key, anthropic_key = start(keygate, fake_upstream, tmp_path)
    home = tmp_path / "claude-home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env = {
        "HOME": str(home),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        # A key the user had exported: the launcher must not pass it on.
        "ANTHROPIC_API_KEY": anthropic_key,
    }
    run = launch(keygate_bin, kg, [str(CLAUDE), "-p", "say hi"], env, work)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fake upstream" in run.stdout.lower(), run.stdout
    messages = [r for r in fake_upstream.requests if r.path.startswith("/v1/messages")]
    assert messages, [r.path for r in fake_upstream.requests]
    for r in fake_upstream.requests:
        assert r.header("x-api-key") == anthropic_key
    records, runs = run_records(kg)
    allowed = [r for r in records if r["decision"] == "allow" and r["route"] == "anthropic"]
    start_rec = [r for r in runs if r["event"] == "run_start"]
    assert allowed and start_rec, (records, runs)
    assert all(r.get("run_id") == start_rec[0]["run_id"] and r.get("person") for r in allowed), allowed
    assert [r for r in runs if r["event"] == "run_end"], runs
    assert anthropic_key not in run.stdout + run.stderr


def test_codex_turn_started_with_keygate_run_needs_no_key_or_base_url_from_the_test(keygate, keygate_bin, fake_upstream, tmp_path):
    """Codex's provider reads its key from the variable `env_key` names and its base URL from the
    config; keygate's `[routes.openai.env]` fills both in, so the test sets neither."""
    assert CODEX.exists(), f"Codex CLI is not installed at {CODEX}; scripts/test installs it"
    kg, openai_key, _anthropic_key = start(
        keygate,
        fake_upstream,
        tmp_path,
        extra_routes='\n[routes.openai.env]\nCODEX_KEYGATE_TOKEN = "{token}"\nCODEX_KEYGATE_BASE_URL = "{base_url}/v1"\n',
    )
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env = {"HOME": str(tmp_path / "home"), "CODEX_HOME": str(codex_home), "OPENAI_API_KEY": openai_key}
    (tmp_path / "home").mkdir(exist_ok=True)
    # The provider points at what the launcher set, through a one-line wrapper: no URL here.
    (codex_home / "config.toml").write_text(
        """model = "gpt-fake"
model_provider = "keygate"
check_for_update_on_startup = false

[model_providers.keygate]
name = "keygate"
base_url = "http://placeholder.invalid/v1"
env_key = "CODEX_KEYGATE_TOKEN"
wire_api = "responses"

[analytics]
enabled = false

[feedback]
enabled = false
"""
    )
    script = 'exec "$0" -c "model_providers.keygate.base_url=\\"$CODEX_KEYGATE_BASE_URL\\"" exec --skip-git-repo-check "say hi"'
    run = launch(keygate_bin, kg, ["sh", "-c", script, str(CODEX)], env, work)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fake upstream" in run.stdout.lower(), run.stdout + run.stderr
    responses = [r for r in fake_upstream.requests if r.path == "/v1/responses"]
    assert responses, [r.path for r in fake_upstream.requests]
    for r in fake_upstream.requests:
        assert r.header("authorization") == f"Bearer {openai_key}"
    records, runs = run_records(kg)
    assert any(r.get("run_id") and r["route"] == "openai" and r["decision"] == "allow" for r in records), records
    assert openai_key not in run.stdout + run.stderr


def test_agent_keeps_the_terminal_and_gets_one_ctrl_c_as_without_keygate(keygate, keygate_bin, fake_upstream, tmp_path):
    """On a terminal the agent is in the foreground process group: Ctrl-C reaches it once (from
    the terminal, not again from the launcher), and its exit status passes through."""
    import fcntl
    import pty
    import select
    import termios
    import time

    kg, _openai_key, _anthropic_key = start(keygate, fake_upstream, tmp_path)
    script = (
        'n=0; trap \'n=$((n+1)); echo "int$n"\' INT; '
        'if [ "$(ps -o tpgid= -p $$ | tr -d " ")" = "$(ps -o pgid= -p $$ | tr -d " ")" ]; then echo foreground; fi; '
        "echo ready; i=0; while [ $i -lt 40 ]; do sleep 0.05; i=$((i+1)); done; exit $((n+10))"
    )
    master, slave = pty.openpty()

    def controlling_tty():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [str(keygate_bin), "run", "--config", str(kg.config_path), "--no-sandbox", "--", "sh", "-c", script],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
        cwd=tmp_path,
        preexec_fn=controlling_tty,
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 20
    sent = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            if b"ready" in out and not sent:
                os.write(master, b"\x03")
                sent = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    text = out.decode(errors="replace")
    assert "foreground" in text, text
    assert "int1" in text and "int2" not in text, text
    assert code == 11, text
