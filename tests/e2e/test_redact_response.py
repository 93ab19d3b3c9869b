"""Secrets an upstream sends back in shapes a byte-for-byte search misses: split across the text
deltas of separate SSE events (a model streaming the key token by token), and JSON-escaped the way
PHP, .NET or Python write `/`, `+` and non-ASCII characters. Each attack has a benign neighbour
that must reach the agent unchanged. The official SDKs read the streams, as agents do."""

from __future__ import annotations

import json
import re
import secrets

import anthropic
import openai
import pytest

from conftest import DEADLINE, error_code, native_config, new_token

REDACTED = re.compile(r"\[REDACTED:[^\]]+\]")


@pytest.fixture
def setup(keygate, fake_upstream):
    """keygate on the native config; the OpenAI key has `/` and `+`, which JSON encoders
    disagree on, the Anthropic key is an ordinary one."""
    token = new_token()
    keys = {
        "openai": "sk-kg/" + secrets.token_hex(10) + "+" + secrets.token_hex(10),
        "anthropic": "sk-ant-kg-" + secrets.token_hex(16),
    }
    kg = keygate(
        native_config(fake_upstream.url),
        env={"KEYGATE_AGENT_TOKEN": token, "OPENAI_API_KEY": keys["openai"], "ANTHROPIC_API_KEY": keys["anthropic"]},
    )
    oa = openai.OpenAI(base_url=f"{kg.url}/openai/v1", api_key=token, max_retries=0, timeout=DEADLINE)
    an = anthropic.Anthropic(base_url=f"{kg.url}/anthropic", api_key=token, max_retries=0, timeout=DEADLINE)
    return kg, oa, an, keys, token


def pieces(s: str, n: int = 3) -> list[str]:
    return [s[i : i + n] for i in range(0, len(s), n)]


def chat_text(oa) -> str:
    stream = oa.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True)
    with stream:
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def responses_text(oa) -> str:
    stream = oa.responses.create(model="gpt-fake", input="hi", stream=True)
    with stream:
        return "".join(e.delta for e in stream if e.type == "response.output_text.delta")


def anthropic_text(an) -> str:
    with an.messages.stream(model="claude-fake", max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as s:
        return "".join(s.text_stream)


def test_secret_streamed_delta_by_delta_never_reaches_the_agent_joined(setup, fake_upstream):
    kg, oa, an, keys, _ = setup
    for key_name, read in [("openai", chat_text), ("openai", responses_text), ("anthropic", anthropic_text)]:
        key = keys[key_name]
        fake_upstream.deltas = ["Your key is ", *pieces(key), ". Keep it safe."]
        text = read(oa if key_name == "openai" else an)
        assert key not in text, f"{read.__name__}: the joined deltas hold the key"
        assert key[:6] not in text, f"{read.__name__}: the key's first pieces got out: {text!r}"
        assert REDACTED.sub("<R>", text) == "Your key is <R>. Keep it safe.", text
    # The upstream really got each key, so the check is not passing on an empty stream.
    sent = [r.header("authorization") or r.header("x-api-key") for r in fake_upstream.requests]
    assert f"Bearer {keys['openai']}" in sent and keys["anthropic"] in sent


def test_ordinary_streamed_text_reaches_the_agent_unchanged(setup, fake_upstream):
    _, oa, an, _, _ = setup
    # Pieces that look like the start of a key (`sk`, `-`) but are ordinary prose and code.
    deltas = ["pip install sc", "ik", "it-learn; ", "sk", "-", "learn is fine, api_key", " = os.environ"]
    fake_upstream.deltas = deltas
    assert chat_text(oa) == "".join(deltas)
    assert responses_text(oa) == "".join(deltas)
    assert anthropic_text(an) == "".join(deltas)


def php(s: str) -> str:
    return s.replace("/", "\\/")


def dotnet(s: str) -> str:
    return s.replace("+", "\\u002B")


def all_escaped(s: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in s)


def test_json_escaped_secret_in_an_upstream_answer_is_redacted(setup, fake_upstream):
    kg, _, _, keys, token = setup
    key = keys["openai"]
    body = "{" + ",".join(f'"{name}":"bad key {f(key)}"' for name, f in [("php", php), ("dotnet", dotnet), ("all", all_escaped)]) + "}"
    fake_upstream.raw_body = body.encode()
    with kg.client() as c:
        r = c.get("/openai/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    for name, value in r.json().items():
        assert key not in value, f"{name}: {value!r}"
        assert REDACTED.fullmatch(value.removeprefix("bad key ")), f"{name}: {value!r}"


def test_escaped_json_without_a_secret_passes_byte_for_byte(setup, fake_upstream):
    kg, _, _, _, token = setup
    body = b'{"t":"caf\\u00e9 a\\/b \\u002B \\ud83d\\ude00 \\\\u0041"}'
    fake_upstream.raw_body = body
    with kg.client() as c:
        r = c.get("/openai/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.content == body


def test_request_with_a_json_escaped_held_secret_is_refused(setup, fake_upstream):
    kg, _, _, keys, token = setup
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with kg.client() as c:
        # an ordinary request first, so keygate surely holds the key; escaped text passes
        ok = c.post("/openai/v1/chat/completions", content=b'{"model":"gpt-fake","messages":[{"role":"user","content":"caf\\u00e9 a\\/b"}]}', headers=auth)
        assert ok.status_code == 200, ok.text
        content = json.dumps(keys["openai"]).replace("/", "\\/").replace("+", "\\u002b")
        bad = c.post("/openai/v1/chat/completions", content=b'{"model":"gpt-fake","messages":[{"role":"user","content":' + content.encode() + b"}]}", headers=auth)
    assert bad.status_code == 403, bad.text
    assert error_code(bad) == "secret_in_request"
    assert len(fake_upstream.requests) == 1
