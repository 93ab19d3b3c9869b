"""Token budgets that hold: a request books what it may cost before it is forwarded (its
max_tokens plus an estimate of its input), so concurrent requests cannot all slip through a
nearly spent budget; the booking is settled to the usage the upstream reports, which keygate asks
OpenAI chat streams for; a stream dropped before its usage is charged its whole booking; every 429
says when to retry; usage is audited for every agent."""

from __future__ import annotations

import json
import threading

import httpx
import openai

from conftest import DEADLINE, NativeSetup, error_code, fake_secret, native_config, new_token, poll
from fake_upstream import CHAT_TEXT, CHAT_USAGE

EXPECTED_TEXT = "".join(CHAT_TEXT)
MESSAGES = [{"role": "user", "content": "hi"}]
# What keygate books for a chat request with MESSAGES and max_tokens=N: N plus the request's text
# ("gpt-fake", "user", "hi": 14 bytes) at 4 bytes a token, i.e. N + 4.
INPUT_ESTIMATE = 4


def budgeted(keygate, fake_upstream, limit: int, extra: str = "", top: str = "") -> NativeSetup:
    """keygate in front of the fake upstream; agent `coder` has `limit` tokens per hour."""
    token = new_token()
    openai_key = fake_secret("sk-proj-e2e")
    anthropic_key = fake_secret("sk-ant-api03-e2e")
    config = top + native_config(
        fake_upstream.url, extra=f'budget_tokens = {{ per = "hour", limit = {limit} }}\n{extra}'
    )
    kg = keygate(
        config,
        env={"KEYGATE_AGENT_TOKEN": token, "OPENAI_API_KEY": openai_key, "ANTHROPIC_API_KEY": anthropic_key},
    )
    return NativeSetup(kg, token, openai_key, anthropic_key)


def openai_client(s: NativeSetup) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.kg.url}/openai/v1", api_key=s.token, max_retries=0, timeout=DEADLINE)


def chat(s: NativeSetup, max_tokens: int, stream: bool = True) -> httpx.Response:
    """A chat completion over plain HTTP, read whole."""
    with s.kg.client() as c:
        return c.post(
            "/openai/v1/chat/completions",
            json={"model": "gpt-fake", "messages": MESSAGES, "max_tokens": max_tokens, "stream": stream},
            headers={"Authorization": f"Bearer {s.token}"},
        )


def assert_budget_refusal(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert error_code(r) == "budget_exhausted"
    # The period is an hour: the budget frees up within it.
    assert 1 <= int(r.headers["retry-after"]) <= 3600, r.headers


def test_concurrent_requests_against_a_budget_with_room_for_one_admit_exactly_one(keygate, fake_upstream):
    # 150 tokens, each request books 104: one fits, two do not.
    s = budgeted(keygate, fake_upstream, limit=150)
    fake_upstream.first_event_gate = gate = threading.Event()
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def one():
        r = chat(s, max_tokens=100)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        # The admitted stream is held open by the gate, so its booking is still in flight while
        # the other seven are decided.
        poll(lambda: len(results) >= 7, "seven refusals while one stream is held open")
    finally:
        gate.set()
        for t in threads:
            t.join(timeout=DEADLINE)
    assert not any(t.is_alive() for t in threads)

    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code != 200]
    assert len(ok) == 1 and len(refused) == 7, [r.status_code for r in results]
    for r in refused:
        assert_budget_refusal(r)
    assert len(fake_upstream.requests) == 1
    records = s.kg.audit_records(n=8)
    assert sorted(r["reason"] for r in records if r["decision"] == "deny") == ["budget_exhausted"] * 7
    (allowed,) = [r for r in records if r["decision"] == "allow"]
    assert allowed["tokens"] == CHAT_USAGE["total_tokens"]

    # Benign neighbour: settled to the 14 tokens used, the budget has room for the next one.
    assert chat(s, max_tokens=100).status_code == 200


def test_openai_sdk_stream_of_a_budgeted_agent_is_metered_without_the_client_seeing_the_usage_chunk(
    keygate, fake_upstream
):
    s = budgeted(keygate, fake_upstream, limit=100_000)
    stream = openai_client(s).chat.completions.create(model="gpt-fake", messages=MESSAGES, max_tokens=50, stream=True)
    with stream:
        chunks = list(stream)
        request_id = stream.response.headers["x-request-id"]

    # The client sees the stream it asked for: no usage-only chunk.
    assert chunks and all(c.choices for c in chunks), chunks
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == EXPECTED_TEXT
    # keygate asked the upstream for usage, and charged and audited what it reported.
    (req,) = fake_upstream.requests
    assert req.json()["stream_options"] == {"include_usage": True}
    assert req.json()["messages"] == MESSAGES and req.json()["max_tokens"] == 50
    assert s.kg.audit_record(request_id)["tokens"] == CHAT_USAGE["total_tokens"]


def test_openai_sdk_stream_that_asked_for_usage_gets_the_usage_chunk(keygate, fake_upstream):
    s = budgeted(keygate, fake_upstream, limit=100_000)
    stream = openai_client(s).chat.completions.create(
        model="gpt-fake", messages=MESSAGES, max_tokens=50, stream=True, stream_options={"include_usage": True}
    )
    with stream:
        chunks = list(stream)

    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == CHAT_USAGE["total_tokens"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == EXPECTED_TEXT


def test_stream_of_an_agent_without_a_budget_is_forwarded_unchanged(native, fake_upstream):
    stream = openai_client(native).chat.completions.create(model="gpt-fake", messages=MESSAGES, stream=True)
    with stream:
        chunks = list(stream)

    assert "".join(c.choices[0].delta.content or "" for c in chunks) == EXPECTED_TEXT
    (req,) = fake_upstream.requests
    assert "stream_options" not in req.json()


def test_stream_dropped_before_its_usage_is_charged_the_whole_reservation(keygate, fake_upstream):
    s = budgeted(keygate, fake_upstream, limit=150)
    fake_upstream.first_event_gate = gate = threading.Event()
    try:
        stream = openai_client(s).chat.completions.create(
            model="gpt-fake", messages=MESSAGES, max_tokens=100, stream=True
        )
        with stream:
            first = next(iter(stream))
            request_id = stream.response.headers["x-request-id"]
        # The client has gone; the upstream has not yet sent the usage chunk.
        assert first.choices[0].delta.role == "assistant"
        record = s.kg.audit_record(request_id)
    finally:
        gate.set()

    assert record["reason"] == "client_disconnected"
    assert "tokens" not in record or record["tokens"] is None
    # Charged 104 of 150: another 104 no longer fits, 14 (max_tokens 10 + input) still does.
    assert_budget_refusal(chat(s, max_tokens=100))
    assert chat(s, max_tokens=10, stream=False).status_code == 200


def test_request_that_could_use_more_than_the_whole_budget_is_refused_with_a_hint(keygate, fake_upstream):
    s = budgeted(keygate, fake_upstream, limit=150)

    r = chat(s, max_tokens=1000)

    assert_budget_refusal(r)
    assert "max_tokens" in r.json()["error"]["message"]
    assert fake_upstream.requests == []
    assert chat(s, max_tokens=100).status_code == 200


def test_body_without_max_tokens_books_the_configured_budget_reserve(keygate, fake_upstream):
    # The agent books 500 output tokens for a body that names no maximum: more than the budget.
    s = budgeted(keygate, fake_upstream, limit=300, extra="budget_reserve = 500\n")
    with s.kg.client() as c:
        r = c.post(
            "/openai/v1/chat/completions",
            json={"model": "gpt-fake", "messages": MESSAGES},
            headers={"Authorization": f"Bearer {s.token}"},
        )

    assert_budget_refusal(r)
    assert chat(s, max_tokens=100, stream=False).status_code == 200


def test_budgeted_request_body_is_still_bounded_by_max_request_bytes(keygate, fake_upstream):
    s = budgeted(keygate, fake_upstream, limit=100_000, top="max_request_bytes = 4096\n")
    body = json.dumps({"model": "gpt-fake", "messages": [{"role": "user", "content": "x" * 8192}], "max_tokens": 10})
    with s.kg.client() as c:
        # Chunked, so no Content-Length announces the size: keygate finds out while reading.
        r = c.post(
            "/openai/v1/chat/completions",
            content=iter([body[:1000].encode(), body[1000:].encode()]),
            headers={"Authorization": f"Bearer {s.token}", "Content-Type": "application/json"},
        )

    assert r.status_code == 413 and error_code(r) == "request_too_large"
    assert fake_upstream.requests == []
    assert chat(s, max_tokens=10, stream=False).status_code == 200


def test_rate_limited_answer_says_when_to_retry(keygate, fake_upstream):
    s = budgeted(keygate, fake_upstream, limit=100_000, extra='rate = "1/hour"\n')

    assert chat(s, max_tokens=10, stream=False).status_code == 200
    r = chat(s, max_tokens=10, stream=False)

    assert r.status_code == 429 and error_code(r) == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 3600


def test_tokens_are_audited_for_an_agent_without_a_budget(native, fake_upstream):
    with native.kg.client() as c:
        headers = {"Authorization": f"Bearer {native.token}"}
        chat_json = c.post(
            "/openai/v1/chat/completions", json={"model": "gpt-fake", "messages": MESSAGES}, headers=headers
        )
        anthropic_stream = c.post(
            "/anthropic/v1/messages",
            json={"model": "claude-fake", "max_tokens": 64, "messages": MESSAGES, "stream": True},
            headers=headers,
        )

    assert chat_json.status_code == 200 and anthropic_stream.status_code == 200
    assert native.kg.audit_record(chat_json.headers["x-request-id"])["tokens"] == 14
    # Anthropic: input 9 (message_start) + output 5 (the final message_delta).
    assert native.kg.audit_record(anthropic_stream.headers["x-request-id"])["tokens"] == 14
