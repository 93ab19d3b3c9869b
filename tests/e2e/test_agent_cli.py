"""Real agent CLIs through keygate: Claude Code and Codex CLI each complete a turn offline against
the fake upstream, with the keygate token as their API key. Proves the drop-in claim for the tools
keygate's users run, including Claude Code's ~76 KB request passing the default exfiltration scan.

scripts/test installs both with npm into target/agent-clis (CLAUDE_BIN, CODEX_BIN override)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO

CLAUDE = Path(os.environ.get("CLAUDE_BIN", REPO / "target" / "agent-clis" / "bin" / "claude"))


def test_claude_code_completes_a_turn_through_keygate_and_never_holds_the_key(native, fake_upstream, tmp_path):
    assert CLAUDE.exists(), f"Claude Code is not installed at {CLAUDE}; scripts/test installs it"
    home = tmp_path / "claude-home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": native.kg.url + "/anthropic",
        "ANTHROPIC_API_KEY": native.token,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    run = subprocess.run(
        [str(CLAUDE), "-p", "say hi"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fake upstream" in run.stdout.lower(), run.stdout

    messages = [r for r in fake_upstream.requests if r.path.startswith("/v1/messages")]
    assert messages, [r.path for r in fake_upstream.requests]
    for r in fake_upstream.requests:
        assert r.header("x-api-key") == native.anthropic_key
        assert native.token not in r.wire_text(), "the agent's token reached the upstream"
    # A record is written when its answer ends, which may trail the CLI's exit: wait for one per
    # forwarded request.
    records = native.kg.audit_records(len(fake_upstream.requests))
    allowed = [rec for rec in records if rec["decision"] == "allow" and rec["route"] == "anthropic"]
    assert allowed and all(rec["reason"] == "allowed" for rec in allowed), allowed
    assert native.anthropic_key not in run.stdout + run.stderr


CODEX = Path(os.environ.get("CODEX_BIN", REPO / "target" / "agent-clis" / "bin" / "codex"))


def test_codex_cli_completes_a_turn_through_keygate_and_never_holds_the_key(native, fake_upstream, tmp_path):
    """Codex speaks the Responses API over SSE with `Authorization: Bearer`; its provider's
    `env_key` names the variable holding the keygate token."""
    assert CODEX.exists(), f"Codex CLI is not installed at {CODEX}; scripts/test installs it"
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(
        f"""model = "gpt-fake"
model_provider = "keygate"
check_for_update_on_startup = false

[model_providers.keygate]
name = "keygate"
base_url = "{native.kg.url}/openai/v1"
env_key = "KEYGATE_TOKEN"
wire_api = "responses"

[analytics]
enabled = false

[feedback]
enabled = false
"""
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "CODEX_HOME": str(codex_home),
        "KEYGATE_TOKEN": native.token,
    }
    run = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "say hi"],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fake upstream" in run.stdout.lower(), run.stdout + run.stderr

    responses = [r for r in fake_upstream.requests if r.path == "/v1/responses"]
    assert responses, [r.path for r in fake_upstream.requests]
    for r in fake_upstream.requests:
        assert r.header("authorization") == f"Bearer {native.openai_key}"
        assert native.token not in r.wire_text(), "the agent's token reached the upstream"
    assert native.openai_key not in run.stdout + run.stderr
