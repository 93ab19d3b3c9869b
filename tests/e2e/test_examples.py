"""Every shipped example config (examples/*.toml, examples/lab/*.json) passes `check` and
`serve`, with the variables it names set to dummy values and the stand-in `op`/`az` on PATH;
`/healthz` answers. The only change made to a file is its port (to a free one), so tests running
side by side do not collide."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from conftest import DEADLINE, EXAMPLES, LAB_EXAMPLES, fake_secret, new_token, run_keygate

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.toml")) + sorted(LAB_EXAMPLES.glob("*.json"))


def dummy_env(text: str) -> dict[str, str]:
    """A dummy value for every variable the config names (`name`, `token_env`, `*_env` keys)."""
    names = set(re.findall(r'(?:name|token_env|_env)"?\s*[=:]\s*"([A-Z][A-Z0-9_]*)"', text))
    env = {n: (new_token() if "TOKEN" in n and "BAO" not in n else fake_secret("dummy-value-")) for n in names}
    env["FAKE_OP_SECRET"] = fake_secret("sk-proj-example")
    env["FAKE_AZ_SECRET"] = fake_secret("sk-proj-example")
    return env


def on_a_free_port(path, text: str) -> str:
    if path.suffix == ".json":
        cfg = json.loads(text)
        cfg["listen_port"] = 0
        return json.dumps(cfg)
    return text.replace("127.0.0.1:8791", "127.0.0.1:0")


def test_every_example_file_is_covered():
    names = {p.name for p in EXAMPLE_FILES}
    assert {"keygate.toml", "dry-run.toml", "broker_config.dry-run.json", "broker_config.env.example.json"} <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_config_passes_check_and_serves_healthz(keygate, keygate_bin, tmp_path, path):
    text = path.read_text()
    env = dummy_env(text)
    checked = run_keygate(keygate_bin, ["check", "--config", str(path)], tmp_path, env=env)
    assert checked.returncode == 0, checked.stderr

    kg = keygate(on_a_free_port(path, text), env=env, suffix=path.suffix)
    health = httpx.get(f"{kg.url}/healthz", timeout=DEADLINE, trust_env=False)
    assert health.status_code == 200, health.text
    assert health.json()["ok"] is True
    output = kg.stdout_text() + kg.stderr_text() + health.text
    assert [n for n, v in env.items() if v in output] == []


def test_dry_run_example_serves_without_a_token_variable_and_answers_unauthenticated_callers(keygate):
    text = on_a_free_port(EXAMPLES / "dry-run.toml", (EXAMPLES / "dry-run.toml").read_text())
    kg = keygate(text)  # KEYGATE_AGENT_TOKEN is not in the test's environment
    with kg.client() as c:
        r = c.post("/openai/v1/chat/completions", json={"model": "gpt-x", "messages": []})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["mode"] == "dry_run"
    assert answer["forward"]["url"] == "https://api.openai.com/v1/chat/completions"
    assert kg.audit_record(r.headers["x-request-id"])["agent"] == "coder"
    assert "KEYGATE_AGENT_TOKEN" in kg.stderr_text()  # the warning names the variable


def test_dry_run_with_the_token_variable_set_still_requires_the_token(keygate):
    token = new_token()
    text = on_a_free_port(EXAMPLES / "dry-run.toml", (EXAMPLES / "dry-run.toml").read_text())
    kg = keygate(text, env={"KEYGATE_AGENT_TOKEN": token})
    with kg.client() as c:
        without = c.post("/openai/v1/chat/completions", json={"model": "gpt-x", "messages": []})
        with_token = c.post(
            "/openai/v1/chat/completions",
            json={"model": "gpt-x", "messages": []},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert without.status_code == 401
    assert with_token.status_code == 200, with_token.text


def test_proxy_mode_with_an_unset_token_variable_still_refuses_to_start(keygate_bin, tmp_path):
    text = (EXAMPLES / "dry-run.toml").read_text().replace('mode = "dry_run"', 'mode = "proxy"')
    config = tmp_path / "proxy.toml"
    config.write_text(on_a_free_port(config, text))
    result = run_keygate(keygate_bin, ["serve", "--config", str(config)], tmp_path, env={"OPENAI_API_KEY": fake_secret("sk-proj-")})
    assert result.returncode != 0
    assert "KEYGATE_AGENT_TOKEN is not set" in result.stderr
