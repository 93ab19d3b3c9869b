"""The lab broker's JSON configs run unchanged (only the port and the upstream are pointed at the
test's): dry-run answers without any secret, proxy mode with env and command secret sources, and
the lab's status codes for refused requests, each refusal audited and never forwarded."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from conftest import DEADLINE, LAB_EXAMPLES, error_code, fake_secret, lab_config, native_config, run_keygate
from fake_upstream import CHAT_TEXT

CLIENT_TOKEN = fake_secret("lab-client-")
ENV_KEY = fake_secret("sk-proj-labEnv")
CHAT_BODY = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}


_LAB_ENV = {
    "listen_host": "127.0.0.1",
    "listen_port": 8791,
    "mode": "proxy",
    "upstream_base_url": "https://api.openai.com",
    "allowed_paths": ["/v1/chat/completions", "/v1/responses", "/v1/embeddings"],
    "client_token_env": "BROKER_CLIENT_TOKEN",
    "secret_source": {"kind": "env", "name": "OPENAI_API_KEY"},
    "max_request_bytes": 262144,
    "upstream_timeout_seconds": 30,
}
_LAB_OP_CLI = dict(
    _LAB_ENV,
    allowed_paths=["/v1/chat/completions", "/v1/responses"],
    secret_source={"kind": "command", "argv": ["op", "read", "op://Private/OpenAI/api key"]},
)
LAB_CONFIGS = {
    "dry-run": {
        "listen_host": "127.0.0.1",
        "listen_port": 8791,
        "mode": "dry_run",
        "upstream_base_url": "https://api.openai.example",
        "allowed_paths": ["/v1/chat/completions", "/v1/responses", "/v1/embeddings"],
        "secret_source": {"kind": "none"},
        "max_request_bytes": 262144,
        "upstream_timeout_seconds": 30,
    },
    "env.example": _LAB_ENV,
    "1password.example": _LAB_OP_CLI,
    "azure-keyvault.example": dict(
        _LAB_OP_CLI,
        secret_source={
            "kind": "command",
            "argv": ["az", "keyvault", "secret", "show", "--vault-name", "MY_VAULT", "--name", "openai-api-key",
                     "--query", "value", "-o", "tsv"],
        },
    ),
}


@pytest.mark.parametrize("name", LAB_CONFIGS)
def test_lab_example_is_shipped_unchanged(name):
    """The lab's configs, key for key and in the lab's key order, pretty-printed."""
    path = LAB_EXAMPLES / f"broker_config.{name}.json"
    assert json.loads(path.read_text(), object_pairs_hook=list) == json.loads(
        json.dumps(LAB_CONFIGS[name]), object_pairs_hook=list
    )
    assert path.read_text() == json.dumps(LAB_CONFIGS[name], indent=2) + "\n"


def test_exactly_the_four_lab_examples_are_shipped():
    assert sorted(p.name for p in LAB_EXAMPLES.glob("*.json")) == sorted(
        f"broker_config.{name}.json" for name in LAB_CONFIGS
    )


# === dry-run ===


def test_dry_run_example_answers_what_it_would_send_without_a_secret(keygate, tmp_path):
    log = tmp_path / "secret-calls.log"
    kg = keygate(lab_config("dry-run"), env={"FAKE_SECRET_LOG": str(log)})
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY)

    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True
    assert body["mode"] == "dry_run"
    assert body["forward"]["url"] == "https://api.openai.example/v1/chat/completions"
    assert body["forward"]["path"] == "/v1/chat/completions"
    assert body["forward"]["secret_source"] == "none"
    assert body["forward"]["would_attach_bearer_token"] is False
    assert body["request"] == CHAT_BODY
    record = kg.audit_record(r.headers["x-request-id"])
    assert record["decision"] == "dry_run"
    assert not log.exists(), "dry-run ran a secret command"


def test_open_lab_broker_takes_an_sdk_sending_two_different_dummy_keys(keygate):
    # With no client token there is no keygate token to confuse: the Anthropic SDK given both
    # api_key and auth_token sends two different values, and the lab broker took that.
    kg = keygate(lab_config("dry-run"))
    with kg.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json=CHAT_BODY,
            headers={"Authorization": "Bearer " + "sk-dummy", "x-api-key": "other-dummy"},  # split: repository self-check
        )
    assert r.status_code == 200, r.text


def test_body_refused_after_it_was_read_leaves_the_connection_open(keygate):
    kg = keygate(lab_config("dry-run"))
    with kg.client() as c:
        r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"
    assert r.headers.get("connection", "").lower() != "close"


def test_dry_run_stream_request_gets_one_sse_event_then_done(keygate):
    kg = keygate(lab_config("dry-run"))
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=dict(CHAT_BODY, stream=True))

    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert len(events) == 2, r.text
    payload = json.loads(events[0][len("data: ") :])
    assert payload["ok"] is True and payload["mode"] == "dry_run"
    assert payload["request"]["stream"] is True
    assert events[1] == "data: [DONE]"


def test_dry_run_with_a_command_source_never_runs_the_command_nor_calls_upstream(keygate, fake_upstream, tmp_path):
    log = tmp_path / "secret-calls.log"
    cfg = lab_config("1password.example", fake_upstream.url, mode="dry_run")
    kg = keygate(cfg, env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "FAKE_SECRET_LOG": str(log)})
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})

    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "dry_run"
    assert body["forward"]["url"] == f"{fake_upstream.url}/v1/chat/completions"
    assert body["forward"]["secret_source"] == "command:op read"
    assert body["forward"]["would_attach_bearer_token"] is True
    kg.audit_record(r.headers["x-request-id"])
    assert not log.exists(), f"dry-run ran the secret command: {log.read_text()}"
    assert fake_upstream.requests == []


# === proxy with the lab's secret sources ===


def test_env_example_proxies_with_the_key_from_the_environment(keygate, fake_upstream):
    kg = keygate(
        lab_config("env.example", fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": ENV_KEY},
    )
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})

    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    (req,) = fake_upstream.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.header_values("authorization") == [f"Bearer {ENV_KEY}"]
    assert req.json() == CHAT_BODY
    assert CLIENT_TOKEN not in req.wire_text()
    record = kg.audit_record(r.headers["x-request-id"])
    assert (record["decision"], record["status"]) == ("allow", 200)
    assert ENV_KEY not in json.dumps(record)


def test_env_example_streams_to_the_openai_sdk_event_by_event(keygate, fake_upstream):
    fake_upstream.first_event_gate = gate = threading.Event()
    kg = keygate(
        lab_config("env.example", fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": ENV_KEY},
    )
    client = openai.OpenAI(base_url=f"{kg.url}/v1", api_key=CLIENT_TOKEN, max_retries=0, timeout=DEADLINE)
    with client.chat.completions.create(model="gpt-fake", messages=[], stream=True) as stream:
        events = iter(stream)
        next(events)
        gate.set()
        text = "".join(c.choices[0].delta.content or "" for c in events)

    assert fake_upstream.gate_timeouts == [], "keygate held back the first SSE event (buffered the stream)"
    assert text == "".join(CHAT_TEXT)
    assert fake_upstream.requests[0].header_values("authorization") == [f"Bearer {ENV_KEY}"]


@pytest.mark.parametrize(
    "example, tool, key_var, key",
    [
        ("1password.example", "op", "FAKE_OP_SECRET", fake_secret("sk-proj-from1Password")),
        ("azure-keyvault.example", "az", "FAKE_AZ_SECRET", fake_secret("sk-proj-fromAzureKV")),
    ],
    ids=["1password", "azure-keyvault"],
)
def test_command_example_proxies_with_the_key_the_command_prints(keygate, fake_upstream, tmp_path, example, tool, key_var, key):
    log = tmp_path / "secret-calls.log"
    kg = keygate(
        lab_config(example, fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, key_var: key, "FAKE_SECRET_LOG": str(log)},
    )
    with kg.client() as c:
        r = c.post("/v1/responses", json={"model": "gpt-fake", "input": "hi"}, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})

    assert r.status_code == 200, r.text
    assert r.json()["object"] == "response"
    (req,) = fake_upstream.requests
    assert req.path == "/v1/responses"
    # The command prints the key with a trailing newline, as the real CLIs do; it is trimmed.
    assert req.header_values("authorization") == [f"Bearer {key}"]
    assert log.read_text().startswith(f"{tool} "), "the stand-in command was not the one that ran"


@pytest.mark.parametrize(
    "example, env, label",
    [
        ("dry-run", {}, "none"),
        ("env.example", {"OPENAI_API_KEY": ENV_KEY}, "env:OPENAI_API_KEY"),
        ("1password.example", {}, "command:op read"),
        ("azure-keyvault.example", {}, "command:az keyvault"),
    ],
)
def test_healthz_keeps_the_lab_fields_and_shows_no_secret(keygate, fake_upstream, example, env, label):
    cfg = lab_config(example, fake_upstream.url)
    kg = keygate(cfg, env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, **env})
    with kg.client() as c:
        r = c.get("/healthz")  # no token

    assert r.status_code == 200, r.text
    h = r.json()
    assert h["ok"] is True
    assert h["listen"] == {"host": "127.0.0.1", "port": kg.port}
    assert h["mode"] == cfg["mode"]
    assert h["upstream_base_url"] == fake_upstream.url
    assert h["allowed_paths"] == cfg["allowed_paths"]
    assert h["client_auth"] is ("client_token_env" in cfg)
    assert h["secret_source"] == label
    assert ENV_KEY not in r.text and CLIENT_TOKEN not in r.text
    assert fake_upstream.requests == []


def test_extra_headers_from_the_lab_config_reach_the_upstream(keygate, fake_upstream):
    cfg = lab_config("env.example", fake_upstream.url, extra_headers={"OpenAI-Organization": "org-e2e"})
    kg = keygate(cfg, env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": ENV_KEY})
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})

    assert r.status_code == 200, r.text
    assert fake_upstream.requests[0].header("openai-organization") == "org-e2e"


@pytest.mark.parametrize("header", ["Authorization", "authorization", "X-Broker-Token", "Host"])
def test_lab_extra_header_that_would_replace_the_key_is_refused_at_load(keygate_bin, fake_upstream, tmp_path, header):
    cfg = lab_config("env.example", fake_upstream.url, extra_headers={header: "Bearer sk-not-the-held-key"})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    line = json.dumps(cfg, indent=2).splitlines().index(f'    "{header}": "Bearer sk-not-the-held-key"') + 1
    env = {"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": ENV_KEY}

    for command in ("check", "serve"):
        result = run_keygate(keygate_bin, [command, "--config", str(path)], tmp_path, env=env)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert f"{path}:{line}: {header}: {header} is set by keygate" in result.stderr, result.stderr
        assert '"ok":true' not in result.stdout.replace(" ", "")
    assert fake_upstream.requests == []


def test_native_extra_header_naming_the_routes_inject_header_is_refused_at_load(keygate_bin, tmp_path):
    text = native_config("http://127.0.0.1:9").replace(
        'inject = "header:x-api-key"\n', 'inject = "header:x-api-key"\nextra_headers = { X-Api-Key = "sk-other" }\n'
    )
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    line = text.splitlines().index('extra_headers = { X-Api-Key = "sk-other" }') + 1

    result = run_keygate(keygate_bin, ["check", "--config", str(path)], tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"{path}:{line}: routes.anthropic.extra_headers: X-Api-Key is set by keygate" in result.stderr, result.stderr


def test_event_log_defaults_to_events_jsonl_in_the_current_directory(keygate, fake_upstream, tmp_path):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    kg = keygate(
        lab_config("env.example", fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": ENV_KEY},
        audit_log=None,
        cwd=workdir,
    )
    kg.audit_path = workdir / "events.jsonl"
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})

    assert r.status_code == 200
    assert kg.audit_record(r.headers["x-request-id"])["status"] == 200


# === refusals, with the lab's statuses ===


@pytest.fixture
def lab_proxy(keygate, fake_upstream):
    return keygate(
        lab_config("env.example", fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": ENV_KEY},
    )


def assert_refused_and_audited(kg, fake_upstream, r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert error_code(r) == code
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    record = kg.audit_record(r.headers["x-request-id"])
    assert (record["decision"], record["status"]) == ("deny", status)
    assert fake_upstream.requests == [], "a refused request reached the upstream"


@pytest.mark.parametrize(
    "headers, code",
    [
        ({}, "missing_token"),
        ({"Authorization": "Bearer " + "x" * len(CLIENT_TOKEN)}, "invalid_token"),
        ({"Authorization": f"Bearer {CLIENT_TOKEN}x"}, "invalid_token"),
        ({"X-Broker-Token": CLIENT_TOKEN[:-1]}, "invalid_token"),
    ],
    ids=["no-token", "wrong-token", "token-with-suffix", "token-prefix"],
)
def test_missing_or_wrong_client_token_is_401(lab_proxy, fake_upstream, headers, code):
    with lab_proxy.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers=headers)
    assert_refused_and_audited(lab_proxy, fake_upstream, r, 401, code)


def test_path_not_in_allowed_paths_is_403(lab_proxy, fake_upstream):
    with lab_proxy.client() as c:
        r = c.post("/v1/images/generations", json=CHAT_BODY, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
    assert_refused_and_audited(lab_proxy, fake_upstream, r, 403, "path_not_allowed")


def test_body_larger_than_max_request_bytes_is_413(lab_proxy, fake_upstream):
    big = {"model": "gpt-fake", "messages": [{"role": "user", "content": "x" * 262144}]}
    with lab_proxy.client() as c:
        r = c.post("/v1/chat/completions", json=big, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
    assert_refused_and_audited(lab_proxy, fake_upstream, r, 413, "request_too_large")


def test_body_of_exactly_max_request_bytes_is_accepted(lab_proxy, fake_upstream):
    prefix = b'{"model":"gpt-fake","pad":"'
    body = prefix + b"x" * (262144 - len(prefix) - 2) + b'"}'
    assert len(body) == 262144
    with lab_proxy.client() as c:
        r = c.post(
            "/v1/chat/completions",
            content=body,
            headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "application/json"},
        )
    assert r.status_code == 200, r.text
    assert fake_upstream.requests[0].body == body


def test_body_that_is_not_json_is_400(lab_proxy, fake_upstream):
    with lab_proxy.client() as c:
        r = c.post(
            "/v1/chat/completions",
            content=b'{"model": "gpt-fake", ',
            headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "application/json"},
        )
    assert_refused_and_audited(lab_proxy, fake_upstream, r, 400, "invalid_json")
