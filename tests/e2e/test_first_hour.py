"""The friction a new user met in the first hour (issue 16), each fixed: clear errors for a
missing file, an empty config and a token-less `vault` source; `--audit-log` leaves the policy
version alone; `route_not_found` names the prefixes (and nothing else); `/healthz` of a native
config says only that keygate is up unless the config asks for detail."""

from __future__ import annotations

import json

from conftest import error_code, fake_secret, native_config, new_token, run_keygate

UPSTREAM = "http://127.0.0.1:9"  # never contacted by these tests


def test_missing_config_file_says_cannot_read_it(keygate_bin, tmp_path):
    for command in ("check", "serve"):
        result = run_keygate(keygate_bin, [command, "--config", "nope.toml"], tmp_path)
        assert result.returncode == 2
        assert "cannot read nope.toml: No such file" in result.stderr, result.stderr
        assert ":0:" not in result.stderr and "(file)" not in result.stderr


def test_empty_config_fails_check_and_serve_with_no_routes(keygate_bin, tmp_path):
    (tmp_path / "empty.toml").write_text("# nothing yet\n")
    for command in ("check", "serve"):
        result = run_keygate(keygate_bin, [command, "--config", "empty.toml"], tmp_path)
        assert result.returncode == 2, result.stdout
        assert "no routes" in result.stderr
        assert "docs/config.md" in result.stderr  # config errors point to the reference


def test_config_with_one_route_and_no_secret_passes_check(keygate_bin, tmp_path):
    (tmp_path / "one.toml").write_text('[routes.r]\nprefix = "/r"\nupstream = "https://example.com"\n')
    result = run_keygate(keygate_bin, ["check", "--config", "one.toml"], tmp_path)
    assert result.returncode == 0, result.stderr


def test_vault_source_without_a_token_names_vault_as_openbao_and_what_to_set(keygate_bin, tmp_path):
    (tmp_path / "v.toml").write_text(
        '[secrets.x]\nsource = "vault"\naddress = "http://127.0.0.1:8200"\npath = "openai"\nfield = "k"\n'
        '[routes.r]\nprefix = "/r"\nupstream = "https://example.com"\nsecret = "x"\n'
    )
    result = run_keygate(keygate_bin, ["check", "--config", "v.toml"], tmp_path)
    assert result.returncode == 2
    assert 'source "vault" (an alias of openbao' in result.stderr, result.stderr
    assert "token_env" in result.stderr and "token_file" in result.stderr


def test_vault_source_with_a_token_variable_is_accepted(keygate_bin, tmp_path):
    (tmp_path / "v.toml").write_text(
        '[secrets.x]\nsource = "vault"\naddress = "http://127.0.0.1:8200"\ntoken_env = "VAULT_TOKEN"\n'
        'path = "openai"\nfield = "k"\n[routes.r]\nprefix = "/r"\nupstream = "https://example.com"\nsecret = "x"\n'
    )
    result = run_keygate(keygate_bin, ["check", "--config", "v.toml"], tmp_path)
    assert result.returncode == 0, result.stderr


def test_audit_log_flag_does_not_change_the_policy_version(keygate, keygate_bin, tmp_path):
    token = new_token()
    text = native_config(UPSTREAM)
    (tmp_path / "same.toml").write_text(text)
    checked = run_keygate(keygate_bin, ["check", "--json", "--config", "same.toml"], tmp_path)
    assert checked.returncode == 0, checked.stderr
    version = json.loads(checked.stdout)["policy_version"]
    env = {"KEYGATE_AGENT_TOKEN": token, "OPENAI_API_KEY": fake_secret("sk-proj-"), "ANTHROPIC_API_KEY": fake_secret("sk-ant-")}
    with_flag = keygate(text, env=env)  # the harness passes --audit-log
    assert with_flag.startup["policy_version"] == version
    assert with_flag.audit_log()[0]["policy_version"] == version


def test_route_not_found_lists_the_prefixes_and_nothing_else(native):
    with native.kg.client() as c:
        r = c.post("/nowhere/v1/x", json={}, headers={"Authorization": f"Bearer {native.token}"})
    assert r.status_code == 404
    assert error_code(r) == "route_not_found"
    message = r.json()["error"]["message"]
    assert "/openai" in message
    assert "127.0.0.1" not in message and "secret" not in message and "upstream" not in message


def test_route_under_a_known_prefix_is_found(native):
    with native.kg.client() as c:
        r = c.post("/openai/v1/chat/completions", json={"model": "m", "messages": []}, headers={"Authorization": f"Bearer {native.token}"})
    assert r.status_code != 404, r.text


def test_native_healthz_shows_only_ok_version_and_mode_by_default(native):
    with native.kg.client() as c:
        body = c.get("/healthz").json()
    assert body["ok"] is True and body["mode"] == "proxy" and body["version"]
    assert set(body) <= {"ok", "version", "mode", "audit", "policy_version"}
    text = json.dumps(body)
    assert "routes" not in body and "127.0.0.1" not in text and "env:" not in text


def test_native_healthz_with_detail_lists_routes(keygate, fake_upstream):
    text = native_config(fake_upstream.url).replace('mode = "proxy"', 'mode = "proxy"\nhealthz = "detail"', 1)
    env = {"KEYGATE_AGENT_TOKEN": new_token(), "OPENAI_API_KEY": fake_secret("sk-proj-"), "ANTHROPIC_API_KEY": fake_secret("sk-ant-")}
    kg = keygate(text, env=env)
    with kg.client() as c:
        body = c.get("/healthz").json()
    assert body["ok"] is True
    assert body["routes"]["openai"]["prefix"] == "/openai"
