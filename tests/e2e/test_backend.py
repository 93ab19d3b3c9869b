"""keygate as a shared backend broker: the lab's backend companion config (`server_config.*.json`)
answers as the companion does, a trusted front end names the person (audited, and keying
per-person limits), allow rules constrain the query string (a lab config refuses any), and the
TLS listener serves the official SDK over HTTPS, reloads its certificate, and with `client_ca`
takes the agent from the client certificate."""

from __future__ import annotations

import json
import shutil
import signal
import ssl
from pathlib import Path

import httpx
import openai
import pytest
import trustme

from conftest import DEADLINE, REPO, error_code, fake_secret, lab_config, new_token, poll, run_keygate
from fake_upstream import CHAT_TEXT

COMPANION = REPO / "tests" / "fixtures" / "backend" / "server_config.dry-run.json"
CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}


# === the backend companion's config, unchanged but for the port ===


@pytest.fixture
def companion(keygate):
    token = new_token()
    cfg = json.loads(COMPANION.read_text())
    cfg["listen_port"] = 0
    kg = keygate(cfg, env={"BACKEND_TOKEN": token, "OPENAI_API_KEY": fake_secret("sk-proj-backend")})
    return kg, token


def test_companion_config_answers_with_the_companion_statuses_and_audits_the_person(companion):
    kg, token = companion
    auth = {"X-Backend-Token": token}
    with kg.client() as c:
        no_token = c.post("/v1/chat/completions", json=CHAT, headers={"X-User-Id": "alice"})
        no_user = c.post("/v1/chat/completions", json=CHAT, headers=auth)
        wrong_path = c.post("/v1/embeddings", json=CHAT, headers={**auth, "X-User-Id": "alice"})
        ok = c.post("/v1/chat/completions", json=CHAT, headers={**auth, "X-User-Id": "alice"})
        health = c.get("/healthz")

    assert (no_token.status_code, error_code(no_token)) == (401, "backend_token_required")
    assert (no_user.status_code, error_code(no_user)) == (400, "user_header_required")
    assert (wrong_path.status_code, error_code(wrong_path)) == (403, "path_not_allowed")
    assert ok.status_code == 200, ok.text
    answer = ok.json()
    assert answer["ok"] is True and answer["mode"] == "dry_run" and answer["user_id"] == "alice"
    assert answer["request"] == CHAT
    fwd = answer["forward"]
    assert fwd["path"] == "/v1/chat/completions"
    assert fwd["upstream_base_url"] == "https://api.openai.com"
    assert fwd["secret_source_env"] == "OPENAI_API_KEY"
    assert fwd["would_attach_provider_token"] is True
    h = health.json()
    assert h["ok"] is True and h["mode"] == "dry_run"
    assert h["allowed_paths"] == ["/v1/chat/completions", "/v1/responses"]

    records = {r["request_id"]: r for r in kg.audit_records(5)}
    assert records[ok.headers["x-request-id"]]["person"] == "alice"
    assert records[ok.headers["x-request-id"]]["decision"] == "dry_run"
    assert records[wrong_path.headers["x-request-id"]]["person"] == "alice"
    # An unauthenticated request names no person, whatever its X-User-Id says.
    assert records[no_token.headers["x-request-id"]]["person"] != "alice"


def test_companion_config_refuses_a_query_string_as_the_lab_does(companion):
    kg, token = companion
    headers = {"X-Backend-Token": token, "X-User-Id": "alice"}
    with kg.client() as c:
        refused = [c.post(f"/v1/chat/completions{q}", json=CHAT, headers=headers) for q in ("?x=1", "?")]
        plain = c.post("/v1/chat/completions", json=CHAT, headers=headers)
    for r in refused:
        assert (r.status_code, error_code(r)) == (403, "path_not_allowed"), r.request.url
    assert plain.status_code == 200


def test_lab_broker_config_refuses_a_query_string_and_forwards_the_bare_path(keygate, fake_upstream):
    token = new_token()
    kg = keygate(
        lab_config("env.example", fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": token, "OPENAI_API_KEY": fake_secret("sk-proj-lab")},
    )
    headers = {"X-Broker-Token": token}
    with kg.client() as c:
        with_query = c.post("/v1/chat/completions?x=1", json=CHAT, headers=headers)
        bare = c.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert (with_query.status_code, error_code(with_query)) == (403, "path_not_allowed")
    assert bare.status_code == 200, bare.text
    assert [r.target for r in fake_upstream.requests] == ["/v1/chat/completions"]


def test_companion_answers_another_get_with_401_before_a_token_not_the_lab_404(companion):
    kg, token = companion
    with kg.client() as c:
        anonymous = c.get("/v1/models")
        with_token = c.get("/v1/models", headers={"X-Backend-Token": token, "X-User-Id": "alice"})
    assert (anonymous.status_code, error_code(anonymous)) == (401, "backend_token_required")
    assert (with_token.status_code, error_code(with_token)) == (403, "path_not_allowed")


# === native: query constraints and method-override parameters ===


def native(upstream: str, *, listen='["127.0.0.1:0"]', top="", allow='"POST /v1/chat/completions?beta"', agents=None) -> str:
    agents = agents or '[agents.coder]\ntoken_env = "AGENT_TOKEN"\n'
    return f"""{top}listen = {listen}

[secrets.openai]
source = "env"
name = "OPENAI_API_KEY"

[routes.openai]
prefix = "/openai"
upstream = "{upstream}"
secret = "openai"
allow = [{allow}, "GET /v1/models"]

{agents}"""


@pytest.fixture
def query_rules(keygate, fake_upstream):
    token = new_token()
    kg = keygate(native(fake_upstream.url), env={"AGENT_TOKEN": token, "OPENAI_API_KEY": fake_secret("sk-proj-q")})
    return kg, {"Authorization": f"Bearer {token}"}


def test_native_query_rule_allows_the_named_parameter_and_refuses_another(query_rules, fake_upstream):
    kg, auth = query_rules
    with kg.client() as c:
        named = c.post("/openai/v1/chat/completions?beta=true", json=CHAT, headers=auth)
        other = c.post("/openai/v1/chat/completions?beta=true&debug=1", json=CHAT, headers=auth)
        # A rule without `?` keeps allowing any query (pagination).
        paged = c.get("/openai/v1/models?after=abc&limit=2", headers=auth)
    assert named.status_code == 200, named.text
    assert (other.status_code, error_code(other)) == (403, "path_not_allowed")
    assert paged.status_code == 200
    assert [r.query for r in fake_upstream.requests] == ["beta=true", "after=abc&limit=2"]


@pytest.mark.parametrize("query", ["_method=DELETE", "X-HTTP-Method-Override=DELETE", "beta=1&_method=PUT"])
def test_method_override_query_parameter_is_refused(query_rules, fake_upstream, query):
    kg, auth = query_rules
    with kg.client() as c:
        r = c.post(f"/openai/v1/chat/completions?{query}", json=CHAT, headers=auth)
    assert (r.status_code, error_code(r)) == (400, "method_override_not_allowed")
    assert fake_upstream.requests == []


# === a trusted front end names the person; per-person limits ===

PROVIDER_KEY = fake_secret("sk-proj-person")

FRONT = """[agents.front]
token_env = "AGENT_TOKEN"
person_header = "X-User-Id"
{limits}

[agents.solo]
token_env = "SOLO_TOKEN"
"""


def front_end(keygate, fake_upstream, limits: str):
    token, solo = new_token(), new_token()
    kg = keygate(
        native(fake_upstream.url, allow='"POST /v1/chat/completions"', agents=FRONT.format(limits=limits)),
        env={"AGENT_TOKEN": token, "SOLO_TOKEN": solo, "OPENAI_API_KEY": PROVIDER_KEY},
    )

    def chat(person: str | None, tok: str = token) -> httpx.Response:
        headers = {"Authorization": f"Bearer {tok}"}
        if person is not None:
            headers["X-User-Id"] = person
        with kg.client() as c:
            r = c.post("/openai/v1/chat/completions", json={**CHAT, "max_tokens": 10}, headers=headers)
        # The booking settles when the answer ends, and the record is written then too.
        kg.audit_record(r.headers["x-request-id"])
        return r

    return kg, chat, solo


def test_per_person_budget_stops_one_person_while_another_continues(keygate, fake_upstream):
    # Each request books 14 tokens and the fake reports 14 used: one fits in 20, two do not.
    kg, chat, _ = front_end(keygate, fake_upstream, 'budget_tokens_per_person = { per = "hour", limit = 20 }')
    first = chat("alice")
    again = chat("alice")
    bob = chat("bob")
    assert first.status_code == 200, first.text
    assert (again.status_code, error_code(again)) == (429, "budget_exhausted")
    assert "alice" in again.json()["error"]["message"]
    assert 1 <= int(again.headers["retry-after"]) <= 3600
    assert bob.status_code == 200, bob.text
    people = [(r["person"], r["decision"]) for r in kg.audit_records(3)]
    assert people == [("alice", "allow"), ("alice", "deny"), ("bob", "allow")]


def test_per_person_rate_stops_one_person_while_another_continues(keygate, fake_upstream):
    kg, chat, _ = front_end(keygate, fake_upstream, 'rate_per_person = "1/hour"')
    assert chat("alice").status_code == 200
    r = chat("alice")
    assert (r.status_code, error_code(r)) == (429, "rate_limited")
    assert chat("bob").status_code == 200


def test_person_header_is_required_from_a_front_end_and_ignored_from_other_agents(keygate, fake_upstream):
    kg, chat, solo = front_end(keygate, fake_upstream, "")
    missing = chat(None)
    assert (missing.status_code, error_code(missing)) == (400, "user_header_required")
    named = chat("carol")
    assert named.status_code == 200
    # An agent that is not a trusted front end cannot name a person: the header is just a header.
    other = chat("carol", tok=solo)
    assert other.status_code == 200
    records = {r["request_id"]: r for r in kg.audit_records(3)}
    assert records[named.headers["x-request-id"]]["person"] == "carol"
    assert records[other.headers["x-request-id"]]["person"] != "carol"
    # The front end's person header is not passed upstream.
    assert fake_upstream.requests[0].header("x-user-id") is None


def test_a_held_secret_sent_as_the_person_is_kept_out_of_the_audit_log(keygate, fake_upstream):
    kg, chat, _ = front_end(keygate, fake_upstream, "")
    r = chat(PROVIDER_KEY)
    record = kg.audit_record(r.headers["x-request-id"])
    assert record["person"].startswith("[REDACTED"), record["person"]
    assert PROVIDER_KEY not in kg.audit_path.read_text()
    assert all(req.header("x-user-id") is None for req in fake_upstream.requests)


# === the TLS listener ===


def write_server_cert(ca: trustme.CA, d: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = d / "server.pem", d / "server.key"
    cert.private_key_pem.write_to_path(str(key_path))
    cert_path.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    return cert_path, key_path


def tls_config(upstream: str, d: Path, ca: trustme.CA, client_ca: Path | None = None, agents=None) -> str:
    cert, key = write_server_cert(ca, d)
    extra = f', client_ca = "{client_ca}"' if client_ca else ""
    top = f'tls = {{ cert = "{cert}", key = "{key}"{extra} }}\n'
    return native(upstream, listen='["https://127.0.0.1:0"]', top=top, allow='"POST /v1/chat/completions"', agents=agents)


def https_url(kg) -> str:
    assert kg.url.startswith("https://127.0.0.1:"), kg.url
    return f"https://localhost:{kg.port}"


def client_for(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> httpx.Client:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return httpx.Client(verify=ctx, timeout=DEADLINE, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))


def test_tls_listener_serves_the_openai_sdk_over_https_and_reloads_its_certificate(keygate, fake_upstream, tmp_path):
    ca = trustme.CA()
    token, key = new_token(), fake_secret("sk-proj-tls")
    kg = keygate(tls_config(fake_upstream.url, tmp_path, ca), env={"AGENT_TOKEN": token, "OPENAI_API_KEY": key})
    base = f"{https_url(kg)}/openai/v1"
    with client_for(ca) as http:
        sdk = openai.OpenAI(base_url=base, api_key=token, http_client=http, max_retries=0)
        answer = sdk.chat.completions.create(model="gpt-fake", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "".join(CHAT_TEXT)
    assert fake_upstream.requests[0].header("authorization") == f"Bearer {key}"
    # Plain HTTP to the TLS port gets no answer.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{kg.port}/healthz", timeout=DEADLINE)

    # A renewed certificate (from another CA) is served after a reload, without a restart.
    new_ca = trustme.CA()
    write_server_cert(new_ca, tmp_path)
    kg.proc.send_signal(signal.SIGHUP)
    poll(lambda: any(e.get("event") == "reload" for e in kg.audit_log()), "the reload record")
    with client_for(new_ca) as http:
        assert http.get(f"{https_url(kg)}/healthz").status_code == 200
    with client_for(ca) as http, pytest.raises(httpx.ConnectError):
        http.get(f"{https_url(kg)}/healthz")


def test_tls_listener_delivers_a_large_answer_whole_to_a_slow_reader_and_keeps_the_connection(
    keygate, fake_upstream, tmp_path
):
    # TLS takes bytes it cannot send yet and sends them only when flushed: an answer whose last
    # records waited there would leave a kept-alive client waiting for its end (until the idle
    # check closed the connection). A small receive buffer, a pause before reading and a slow
    # reader make keygate's writes wait on the socket.
    import http.client
    import socket
    import time

    ca = trustme.CA()
    token = new_token()
    kg = keygate(tls_config(fake_upstream.url, tmp_path, ca), env={"AGENT_TOKEN": token, "OPENAI_API_KEY": fake_secret("sk-proj-big")})
    size = 4 * 1024 * 1024
    fake_upstream.raw_body = b'{"data":"' + b"x" * size + b'"}'
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", kg.port))
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        body = json.dumps(CHAT).encode()
        for i in range(2):
            head = (
                f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            tls.sendall(head.encode() + body)
            time.sleep(0.3)
            resp = http.client.HTTPResponse(tls)
            resp.begin()
            got = b""
            while chunk := resp.read(16 * 1024):  # a socket timeout (10 s) here is the defect
                got += chunk
                time.sleep(0.002)
            assert resp.status == 200, (i, got[:200])
            assert len(got) == len(fake_upstream.raw_body), (i, len(got))
            assert not resp.will_close, i
    assert len(fake_upstream.requests) == 2


CERT_AGENTS = """[agents.ci]
client_cert_subject = "CN=ci-runner"
"""


def test_client_ca_refuses_a_client_without_a_certificate_and_maps_a_certificate_to_its_agent(
    keygate, fake_upstream, tmp_path
):
    server_ca, client_ca = trustme.CA(), trustme.CA()
    ca_path = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_path))
    kg = keygate(
        tls_config(fake_upstream.url, tmp_path, server_ca, client_ca=ca_path, agents=CERT_AGENTS),
        env={"OPENAI_API_KEY": fake_secret("sk-proj-mtls")},
    )
    url = f"{https_url(kg)}/openai/v1/chat/completions"
    with client_for(server_ca) as anonymous, pytest.raises(httpx.TransportError):
        anonymous.post(url, json=CHAT)
    # A certificate from another CA is refused at the handshake too.
    with client_for(server_ca, trustme.CA().issue_cert("ci@example", common_name="ci-runner")) as forged:
        with pytest.raises(httpx.TransportError):
            forged.post(url, json=CHAT)
    assert fake_upstream.requests == []

    with client_for(server_ca, client_ca.issue_cert("ci@example", common_name="ci-runner")) as ci:
        ok = ci.post(url, json=CHAT)
    # Benign neighbour: a valid certificate whose subject maps to no agent still needs a token.
    with client_for(server_ca, client_ca.issue_cert("x@example", common_name="someone-else")) as other:
        unmapped = other.post(url, json=CHAT)
    assert ok.status_code == 200, ok.text
    assert (unmapped.status_code, error_code(unmapped)) == (401, "missing_token")
    assert kg.audit_record(ok.headers["x-request-id"])["agent"] == "ci"


# === plaintext beyond loopback ===


def test_plaintext_non_loopback_listener_is_refused_unless_allowed_and_then_check_warns(tmp_path, keygate_bin):
    path = tmp_path / "k.toml"
    path.write_text(native("http://127.0.0.1:9", listen='["0.0.0.0:0"]'))
    refused = run_keygate(keygate_bin, ["check", "--config", str(path)], tmp_path)
    assert refused.returncode == 2
    assert "allow_plaintext_non_loopback" in refused.stderr

    path.write_text(native("http://127.0.0.1:9", listen='["0.0.0.0:0"]', top="allow_plaintext_non_loopback = true\n"))
    allowed = run_keygate(keygate_bin, ["check", "--config", str(path)], tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert "warning" in allowed.stderr and "plaintext" in allowed.stderr

    # Benign neighbour: an https:// listener on every interface needs no such flag.
    ca = trustme.CA()
    (tmp_path / "tls").mkdir()
    cert, key = write_server_cert(ca, tmp_path / "tls")
    path.write_text(
        native("http://127.0.0.1:9", listen='["https://0.0.0.0:0"]', top=f'tls = {{ cert = "{cert}", key = "{key}" }}\n')
    )
    https = run_keygate(keygate_bin, ["check", "--config", str(path)], tmp_path)
    assert https.returncode == 0, https.stderr
    assert "warning" not in https.stderr
    # ... and check reads its certificate files as serve would.
    key.write_text("not a key\n")
    broken = run_keygate(keygate_bin, ["check", "--config", str(path)], tmp_path)
    assert broken.returncode == 2
    assert ": tls: " in broken.stderr and "not a key" not in broken.stderr
