"""The request exfiltration scan through the real binary: ordinary agent traffic is never refused
(a generated corpus of 300+ requests), while held secrets in every spelling, real-format provider
keys and private keys are refused before anything is forwarded; generic findings are reported in
the audit record (`scan_findings`) or refused where a route opts in (`refuse-strict`); every
secret is known to the scan from the first request because it is fetched at start-up."""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import pytest

from conftest import REPO, error_code, native_config, new_token, run_keygate

sys.path.insert(0, str(REPO / "tests" / "fixtures" / "scan"))
import corpus  # noqa: E402

CHAT = "/openai/v1/chat/completions"


def chat(text: str) -> dict:
    return {"model": "gpt-fake", "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def scanning(keygate, fake_upstream):
    """Two routes; the anthropic key has no provider format, so only the held-value scan can
    recognise it."""
    token = new_token()
    keys = {
        "OPENAI_API_KEY": "openai-held-" + secrets.token_hex(16),
        "ANTHROPIC_API_KEY": "anthropic-held-" + secrets.token_hex(16),
    }
    extra = '\n[routes.strict]\nprefix = "/strict"\nupstream = "' + fake_upstream.url + '"\n' \
            'request_scan = "refuse-strict"\nallow = ["POST /v1/chat/completions"]\n'
    cfg = native_config(fake_upstream.url, agent_routes=("openai", "anthropic", "strict"), extra="")
    cfg = cfg.replace("[agents.coder]", extra + "\n[agents.coder]")
    kg = keygate(cfg, env={"KEYGATE_AGENT_TOKEN": token, **keys})
    return kg, {"Authorization": f"Bearer {token}"}, keys


def test_benign_corpus_of_agent_traffic_is_never_refused(scanning, fake_upstream):
    kg, auth, _ = scanning
    requests = corpus.benign(320)
    assert len(requests) >= 300
    refused = []
    with kg.client() as c:
        for item in requests:
            if item["kind"] == "chat":
                r = c.post(CHAT, json=chat(item["text"]), headers=auth)
            else:
                r = c.get(f"/openai/v1/models?{item['query']}", headers=auth)
            if r.status_code != 200:
                refused.append((r.status_code, r.text[:200], item))
    assert refused == [], f"{len(refused)} ordinary requests refused, first: {refused[:3]}"
    assert len(fake_upstream.requests) == len(requests)
    records = kg.audit_records(len(requests))
    assert all(rec["decision"] == "allow" for rec in records)
    # Generic findings are not refused but are visible to whoever reads the audit log.
    reported = {label for rec in records for label in rec.get("scan_findings", [])}
    assert reported <= {"password_assignment", "authorization_header", "jwt", "github_token"}, reported


def test_held_secret_of_another_route_is_refused_on_the_very_first_request(scanning, fake_upstream):
    kg, auth, keys = scanning
    with kg.client() as c:
        r = c.post(CHAT, json=chat(f"please forward {keys['ANTHROPIC_API_KEY']} for me"), headers=auth)
        benign = c.post(CHAT, json=chat("please forward the anthropic key for me"), headers=auth)

    assert r.status_code == 403, r.text
    assert error_code(r) == "secret_in_request"
    assert "anthropic#" in r.json()["error"]["message"], "the refusal names the key id"
    assert keys["ANTHROPIC_API_KEY"] not in r.text
    record = kg.audit_record(r.headers["x-request-id"])
    assert record["decision"] == "deny" and any(l.startswith("anthropic#") for l in record["scan_findings"])
    assert keys["ANTHROPIC_API_KEY"] not in json.dumps(record)
    assert benign.status_code == 200, benign.text
    assert len(fake_upstream.requests) == 1, "only the benign neighbour was forwarded"


@pytest.mark.parametrize("spelling", list(corpus.spellings("x" * 8)))
@pytest.mark.parametrize("place", ["body", "query", "header"])
def test_held_secret_in_every_spelling_and_place_is_refused(scanning, fake_upstream, spelling, place):
    kg, auth, keys = scanning
    value = corpus.spellings(keys["OPENAI_API_KEY"])[spelling]
    with kg.client() as c:
        if place == "body":
            r = c.post(CHAT, json=chat(f"here: {value}"), headers=auth)
        elif place == "query":
            r = c.get("/openai/v1/models", params={"q": f"v {value}"}, headers=auth)
        else:
            r = c.post(CHAT, json=chat("hi"), headers={**auth, "X-Note": f"v {value}"})
    assert r.status_code == 403, (spelling, place, r.text)
    assert error_code(r) == "secret_in_request"
    assert value not in r.text and keys["OPENAI_API_KEY"] not in r.text
    assert fake_upstream.requests == []


@pytest.mark.parametrize("label", list(corpus.provider_keys()))
def test_real_format_provider_key_is_refused_with_its_label(scanning, fake_upstream, label):
    kg, auth, _ = scanning
    key = corpus.provider_keys()[label]
    with kg.client() as c:
        r = c.post(CHAT, json=chat(f"config:\n{key}\n"), headers=auth)
        neighbour = c.post(CHAT, json=chat(f"config:\n{label} goes here\n"), headers=auth)
    assert r.status_code == 403, (label, r.text)
    assert error_code(r) == "secret_in_request"
    assert label in r.json()["error"]["message"]
    assert key not in r.text
    assert neighbour.status_code == 200, neighbour.text
    assert len(fake_upstream.requests) == 1


def test_github_token_needs_its_checksum_to_be_refused(scanning, fake_upstream):
    import random

    kg, auth, _ = scanning
    real = corpus.github_token(random.Random(3))
    broken = real[:-6] + ("000000" if real[-6:] != "000000" else "000001")
    with kg.client() as c:
        refused = c.post(CHAT, json=chat(f"token {real}"), headers=auth)
        reported = c.post(CHAT, json=chat(f"token {broken}"), headers=auth)
    assert refused.status_code == 403, refused.text
    assert reported.status_code == 200, reported.text
    assert "github_token" in kg.audit_record(reported.headers["x-request-id"])["scan_findings"]


def test_generic_assignment_is_reported_by_default_and_refused_on_a_strict_route(scanning, fake_upstream):
    kg, auth, _ = scanning
    line = 'db_password = "' + "Xk9#mP2" + "!vL7qR4w" + '"'
    with kg.client() as c:
        default = c.post(CHAT, json=chat(line), headers=auth)
        strict = c.post("/strict/v1/chat/completions", json=chat(line), headers=auth)
        strict_benign = c.post("/strict/v1/chat/completions", json=chat("password = os.environ['DB_PASSWORD']"), headers=auth)

    assert default.status_code == 200, default.text
    record = kg.audit_record(default.headers["x-request-id"])
    assert record["scan_findings"] == ["password_assignment"]
    assert "Xk9#mP2" not in json.dumps(record)
    assert strict.status_code == 403, strict.text
    assert error_code(strict) == "secret_in_request"
    assert "password_assignment" in strict.json()["error"]["message"]
    assert strict_benign.status_code == 200, strict_benign.text


def test_adversarial_256k_body_is_answered_promptly_and_refused_or_passed(scanning, fake_upstream):
    """`authorization=a1` repeated used to cost seconds of CPU; the scan is linear now. The
    answer is a generic finding (reported, forwarded)."""
    kg, auth, _ = scanning
    body = json.dumps(chat("authorization=a1" * 15_000))
    with kg.client() as c:
        r = c.post(CHAT, content=body, headers={**auth, "content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert "authorization_header" in kg.audit_record(r.headers["x-request-id"])["scan_findings"]


# === start-up: every secret is fetched before the ready line ===


def test_missing_env_secret_stops_native_startup_naming_the_secret(keygate_bin, tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(native_config("http://127.0.0.1:9"))
    result = run_keygate(keygate_bin, ["serve", "--config", str(path)], tmp_path,
                         env={"KEYGATE_AGENT_TOKEN": new_token(), "OPENAI_API_KEY": "openai-held-" + secrets.token_hex(8)})
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "anthropic" in result.stderr and "ANTHROPIC_API_KEY" in result.stderr
    assert '"ok":true' not in result.stdout.replace(" ", "")


def test_failing_secret_command_stops_native_startup_without_its_output(keygate_bin, tmp_path):
    would_be = "sk-" + "proj-" + secrets.token_hex(16)
    path = tmp_path / "cfg.toml"
    path.write_text(native_config("http://127.0.0.1:9").replace(
        'source = "env"\nname = "OPENAI_API_KEY"',
        'source = "command"\nargv = ["op", "read", "op://Private/OpenAI/key"]\ntimeout = "2s"'))
    result = run_keygate(keygate_bin, ["serve", "--config", str(path)], tmp_path,
                         env={"KEYGATE_AGENT_TOKEN": new_token(), "ANTHROPIC_API_KEY": "anthropic-held-" + secrets.token_hex(8),
                              "FAKE_SECRET_MODE": "fail", "FAKE_OP_SECRET": would_be})
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "openai" in result.stderr and "op read" in result.stderr
    assert would_be not in result.stderr + result.stdout
