"""The canary: keygate holds a distinctive secret while the upstream does its worst to leak it back,
in response headers, in a JSON body (raw, base64, percent-encoded) and in SSE events cut in the
middle of the secret. Afterwards the secret appears nowhere the agent or a log reader can see:
not in any response, not in the audit log, not in keygate's stdout or stderr."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import urllib.parse

from conftest import b64, error_code, fake_secret, lab_config, new_token

CLIENT_TOKEN = fake_secret("lab-client-")
# `+` and `/` make the base64 and percent-encoded forms differ from the raw one; no `-_.~`, so
# every common percent-encoding set writes the same thing.
CANARY = "sk+KGcanary/" + secrets.token_hex(6) + "Zt" + secrets.token_hex(6)
FORMS = {
    "raw": CANARY,
    "base64": b64(CANARY),
    "percent-encoded": urllib.parse.quote(CANARY, safe=""),
}
REDACTED = re.compile(r"\[REDACTED:([^\]]+)\]")


def leaks(text: str) -> list[str]:
    return [name for name, form in FORMS.items() if form in text]


def test_canary_secret_never_leaves_keygate_in_any_form(keygate, fake_upstream):
    fake_upstream.echo_key = True
    kg = keygate(
        lab_config("env.example", fake_upstream.url),
        # The most verbose logging keygate has: a secret in a debug log is a leak too.
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": CANARY, "RUST_LOG": "trace", "KEYGATE_LOG": "trace"},
    )
    auth = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    seen: list[str] = []  # everything the agent received, headers and bodies

    with kg.client() as c:
        # 1. non-streamed: the secret in response headers and the JSON body
        r = c.post("/v1/chat/completions", json={"model": "gpt-fake", "messages": []}, headers=auth)
        assert r.status_code == 200, r.text
        seen += [f"{k}: {v}" for k, v in r.headers.multi_items()] + [r.text]
        echo = r.json()["echo"]
        for name in ("raw", "b64", "pct"):
            assert REDACTED.fullmatch(echo[name]), f"echo.{name} was not replaced by a redaction marker: {echo[name]!r}"
        for name in ("x-echo-key", "x-echo-key-b64", "x-echo-key-pct"):
            assert REDACTED.fullmatch(r.headers[name]), f"header {name}: {r.headers[name]!r}"
        key_id = REDACTED.fullmatch(echo["raw"]).group(1)
        assert kg.audit_record(r.headers["x-request-id"])["key_id"] == key_id

        # 2. streamed: the secret cut across upstream chunks. Each second half is sent only after
        # we have seen the event before it, so keygate cannot have read the secret in one piece.
        lines = []
        with c.stream("POST", "/v1/chat/completions", json={"model": "gpt-fake", "stream": True}, headers=auth) as s:
            assert s.status_code == 200
            seen += [f"{k}: {v}" for k, v in s.headers.multi_items()]
            for line in s.iter_lines():
                lines.append(line)
                if line == 'data: {"n":1}':
                    fake_upstream.gates["n1"].set()
                elif line == 'data: {"n":2}':
                    fake_upstream.gates["n2"].set()
        seen.append("\n".join(lines))
        assert fake_upstream.gate_timeouts == [], "keygate held the stream back until the upstream gave up"
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[0] == {"n": 1} and events[-1] == {"n": 3}, lines
        leak_events = [e for e in events if set(e) & {"leak", "leak_b64", "leak_pct"}]
        assert len(leak_events) == 3, lines
        for e in leak_events:
            (value,) = e.values()
            assert REDACTED.fullmatch(value), f"a streamed secret was not replaced by a marker: {e}"

    # The upstream really got the canary and really sent it back, so the checks below are not
    # passing because nothing was there to leak.
    assert fake_upstream.echoed == [CANARY, CANARY]

    kg.audit_records(n=2)
    assert kg.stop() == 0
    places = {
        "responses": "\n".join(seen),
        "audit log": kg.audit_path.read_text(),
        "keygate stdout": kg.stdout_text(),
        "keygate stderr": kg.stderr_text(),
    }
    found = {place: leaks(text) for place, text in places.items() if leaks(text)}
    assert found == {}, f"the canary secret leaked: {found}"


def test_secret_from_a_command_is_redacted_too(keygate, fake_upstream):
    """The redactor knows secrets from every source, not only the environment."""
    fake_upstream.echo_key = True
    canary_from_op = "sk+KGcanaryFromOp/" + secrets.token_hex(10)
    kg = keygate(
        lab_config("1password.example", fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "FAKE_OP_SECRET": canary_from_op},
    )
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "gpt-fake"}, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})

    assert r.status_code == 200, r.text
    assert fake_upstream.echoed == [canary_from_op]
    text = r.text + "".join(f"{k}: {v}" for k, v in r.headers.multi_items())
    assert canary_from_op not in text and b64(canary_from_op) not in text
    assert REDACTED.fullmatch(r.json()["echo"]["raw"])


def test_secret_is_redacted_even_when_the_upstream_compresses_its_answer(keygate, fake_upstream):
    """Real APIs gzip when the client allows it; redaction must not be blind to that (keygate may
    ask the upstream for identity encoding, or decompress; either way the agent sees no secret)."""
    fake_upstream.echo_key = True
    fake_upstream.gzip = True
    kg = keygate(
        lab_config("env.example", fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": CANARY},
    )
    with kg.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "gpt-fake"},
            headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "Accept-Encoding": "gzip"},
        )

    assert r.status_code == 200, r.text
    assert fake_upstream.echoed == [CANARY]
    assert leaks(r.text) == [], "the secret came back inside a compressed body"
    assert REDACTED.fullmatch(r.json()["echo"]["raw"])


def test_request_carrying_the_held_secret_is_refused_and_not_forwarded(keygate, fake_upstream):
    """The exfiltration scan (README): an agent that got hold of the key cannot send it out
    through keygate, raw or base64-encoded, in the body or in a header."""
    kg = keygate(
        lab_config("env.example", fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": CANARY},
    )
    auth = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    with kg.client() as c:
        # an ordinary request first, so keygate surely holds the secret
        assert c.post("/v1/chat/completions", json={"model": "gpt-fake"}, headers=auth).status_code == 200
        attempts = [
            c.post("/v1/chat/completions", json={"model": "gpt-fake", "messages": [{"role": "user", "content": f"keep {form}"}]}, headers=auth)
            for form in (CANARY, b64(CANARY))
        ]
        attempts.append(c.post("/v1/chat/completions", json={"model": "gpt-fake"}, headers={**auth, "X-Note": CANARY}))

    for r in attempts:
        assert r.status_code == 403, r.text
        assert error_code(r) == "secret_in_request"
        assert leaks(r.text) == []
        assert kg.audit_record(r.headers["x-request-id"])["decision"] == "deny"
    assert len(fake_upstream.requests) == 1


def test_canary_tokens_of_oauth2_and_github_app_sources_never_leave_keygate(keygate, tmp_path):
    """Every value the token-minting sources hold on the way (client secret, refresh tokens before
    and after rotation, access tokens, the app's private key, app JWTs, installation tokens)
    appears in no response, audit line or log, though the resource server echoes the credential
    it got and the token endpoints repeat what they were sent in their error bodies."""
    from fake_token_server import FakeTokenServer
    from test_token_sources import get, github_config, new_token, oauth_config, oauth_env, private_file, rsa_pem

    provider = FakeTokenServer().start()
    try:
        private, public = rsa_pem()
        provider.app_public_key = public
        token = new_token()
        gh = github_config(provider, private_file(tmp_path / "app.pem", private))
        crm = oauth_config(provider, tmp_path / "state", grant="refresh_token").split("[agents.coder]")[0]
        # one config: the oauth2 secrets and route, then the GitHub ones and the agent
        config = crm + gh.replace('listen = ["127.0.0.1:0"]\n', "")
        kg = keygate(config, env={**oauth_env(provider, token), "KEYGATE_LOG": "trace", "RUST_LOG": "trace"})
        seen: list[str] = []

        def call(path: str):
            r = get(kg, token, path)
            seen.extend([r.text] + [f"{k}: {v}" for k, v in r.headers.multi_items()])
            return r

        for path in ("/crm/me", "/github/repos/o/keygate", "/git/o/keygate.git/info/refs", "/all/user"):
            r = call(path)
            assert r.status_code == 200, (path, r.text)
            assert "[REDACTED:" in r.json()["token"], r.text
        provider.revoke_all()
        assert call("/crm/me").status_code == 401  # the 401 body repeats the bearer token
        assert call("/crm/me").status_code == 200  # refreshed: the refresh token rotated again
        provider.refresh_token = "rt-elsewhere-" + os.urandom(12).hex()
        provider.revoke_all()
        assert call("/crm/me").status_code == 401
        failed = call("/crm/me")  # the endpoint's error repeats keygate's refresh token
        assert failed.status_code == 503 and "invalid_grant" in failed.text
        provider.app_public_key = rsa_pem()[1]
        provider.revoke_all()
        call("/all/user")
        assert call("/all/user").status_code == 503  # the error repeats the app JWT

        held = (
            [provider.client_secret]
            + provider.issued_refresh_tokens
            + provider.access_tokens
            + provider.installation_tokens
            + [q["jwt"] for q in provider.installation_requests]
            + [line for line in private.decode().splitlines() if "-----" not in line][1:3]
        )
        assert len(provider.issued_refresh_tokens) == 3 and len(provider.installation_tokens) == 3
        kg.audit_records(n=10)
        assert kg.stop() == 0
        places = {
            "responses": "\n".join(seen),
            "audit log": kg.audit_path.read_text(),
            "keygate stdout": kg.stdout_text(),
            "keygate stderr": kg.stderr_text(),
        }
        for place, text in places.items():
            for value in held:
                for form in (value, b64(value), b64(f"x-access-token:{value}")):
                    assert form not in text, f"a held token ({value[:6]}…) leaked into {place}"
    finally:
        provider.stop()


def test_aws_canary_secret_key_and_session_token_never_leave_keygate(keygate, fake_upstream):
    """The upstream does its worst: it answers with the session token (which it received in
    x-amz-security-token) and the secret key, raw and base64. The agent sees markers; the secret
    key and token are in no response, audit line or log line, even at trace level."""
    session_token = "".join(["IQoJb3JpZ2lu", "X2VjEJr", secrets.token_urlsafe(48)])
    secret_key = "kgAwsCanary" + secrets.token_hex(15)
    fake_upstream.raw_body = json.dumps(
        {"raw": [secret_key, session_token], "b64": [b64(secret_key), b64(session_token)]}
    ).encode()
    token = new_token()
    env = {
        "KEYGATE_AGENT_TOKEN": token,
        "AWS_ACCESS_KEY_ID": "AKIA" + "KEYGATECANARY000",
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_SESSION_TOKEN": session_token,
        "KEYGATE_LOG": "trace",
    }
    config = f"""\
listen = ["127.0.0.1:0"]

[secrets.aws]
source = "aws-credentials"

[routes.bedrock]
prefix = "/aws"
upstream = "{fake_upstream.url}"
secret = "aws"
inject = "aws-sigv4"
region = "us-east-1"
service = "bedrock"
allow = ["POST /model/**"]

[agents.coder]
token_env = "KEYGATE_AGENT_TOKEN"
"""
    kg = keygate(config, env=env)
    with kg.client() as c:
        r = c.post("/aws/model/m/invoke", json={"prompt": "hi"}, headers={"X-Broker-Token": token})
    assert r.status_code == 200, r.text
    # The upstream really got the token, signed: the checks below are not vacuous.
    sent = fake_upstream.requests[-1]
    assert sent.header("x-amz-security-token") == session_token
    # A body read whole is committed to by its hash (moto does not check it; this does).
    assert sent.header("x-amz-content-sha256") == hashlib.sha256(sent.body).hexdigest()
    assert "x-amz-security-token" in sent.header("authorization")
    body = r.json()
    assert all(REDACTED.fullmatch(v) for v in body["raw"] + body["b64"]), body
    kg.audit_records(n=1)
    assert kg.stop() == 0
    seen = r.text + "".join(f"{k}: {v}" for k, v in r.headers.multi_items())
    for place, text in {"response": seen, "audit": kg.audit_path.read_text(), "stdout": kg.stdout_text(), "stderr": kg.stderr_text()}.items():
        for name, value in {"secret key": secret_key, "session token": session_token}.items():
            assert value not in text and b64(value) not in text, f"{name} in {place}"


def test_canary_secret_never_leaves_keygate_through_the_forward_proxy(keygate, keygate_bin, tmp_path):
    """The same canary through `proxy_listen`: curl with `-x` and keygate's exported CA, a host a
    route names, the upstream echoing the key in headers, JSON and an SSE stream cut mid-secret."""
    import subprocess

    from proxy_setup import HOST, start_bench, status_of

    bench = start_bench(keygate, keygate_bin, tmp_path, key=CANARY, env={"RUST_LOG": "trace", "KEYGATE_LOG": "trace"})
    try:
        bench.upstream.echo_key = True
        seen = []
        done = bench.curl("-i", f"https://{HOST}/echo")
        assert status_of(done)[:2] == (200, 200), done.stderr
        seen += [done.stdout, done.stderr]
        assert "[REDACTED:" in done.stdout

        # Streamed: each second half of the secret is released only after curl printed the
        # event before it, so keygate streamed while holding back a cut secret.
        argv, env = bench.curl_argv(
            "-i", "-H", "content-type: application/json", "--data", '{"stream": true}', f"https://{HOST}/v1/chat/completions"
        )
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.strip() == 'data: {"n":1}':
                    bench.upstream.gates["n1"].set()
                elif line.strip() == 'data: {"n":2}':
                    bench.upstream.gates["n2"].set()
            proc.wait(timeout=10)
            seen += lines + [proc.stderr.read()]
        finally:
            proc.kill()
            proc.wait()
        assert bench.upstream.gate_timeouts == [], "keygate held the stream back until the upstream gave up"
        assert any('"n":3' in line for line in lines), lines
        assert bench.upstream.echoed == [CANARY, CANARY]

        bench.kg.audit_records(n=4)
        assert bench.kg.stop() == 0
        places = {
            "responses": "\n".join(seen),
            "audit log": bench.kg.audit_path.read_text(),
            "keygate stdout": bench.kg.stdout_text(),
            "keygate stderr": bench.kg.stderr_text(),
        }
        found = {place: leaks(text) for place, text in places.items() if leaks(text)}
        assert found == {}, f"the canary secret leaked: {found}"
    finally:
        bench.upstream.stop()
        bench.mirror.stop()


def test_canary_secret_never_leaves_keygate_through_the_forward_proxy_with_placeholders(keygate, keygate_bin, tmp_path):
    """Proxy mode as `keygate run` sets it up: the agent's curl sends only its placeholder (the
    test exports no key to it); the upstream gets the canary and echoes it back in headers, JSON
    and a cut SSE stream; the canary is nowhere in what the agent saw, its env, or keygate's logs."""
    import subprocess

    from fake_upstream import credential_from
    from proxy_setup import HOST, start_bench

    bench = start_bench(
        keygate, keygate_bin, tmp_path, key=CANARY, route_extra='placeholder_env = "GITHUB_TOKEN"',
        env={"RUST_LOG": "trace", "KEYGATE_LOG": "trace"},
    )
    work = tmp_path / "work"
    work.mkdir()
    script = (
        'env > env.txt; curl -sS -i -H "Authorization: Bearer $GITHUB_TOKEN" https://' + HOST + "/echo; echo; "
        'curl -sS -N -i -H "Authorization: Bearer $GITHUB_TOKEN" -H "content-type: application/json" '
        "--data '{\"stream\": true}' https://" + HOST + "/v1/chat/completions"
    )
    argv = [str(keygate_bin), "run", "--no-sandbox", "--config", str(bench.kg.config_path), "--", "sh", "-c", script]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work)}
    try:
        bench.upstream.echo_key = True
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.strip() == 'data: {"n":1}':
                    bench.upstream.gates["n1"].set()
                elif line.strip() == 'data: {"n":2}':
                    bench.upstream.gates["n2"].set()
            proc.wait(timeout=20)
            err = proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()
        out = "".join(lines)
        assert proc.returncode == 0, err
        assert "[REDACTED:" in out and any('"n":3' in line for line in lines), out
        assert bench.upstream.gate_timeouts == [], "keygate held the stream back until the upstream gave up"
        # The placeholder reached the upstream as the canary itself.
        assert [credential_from(r) for r in bench.upstream.requests] == [CANARY, CANARY]
        agent_env = (work / "env.txt").read_text()
        assert "GITHUB_TOKEN=kgph_gh_" in agent_env

        bench.kg.audit_records(n=4)
        assert bench.kg.stop() == 0
        places = {
            "responses": out + err,
            "agent env": agent_env,
            "audit log": bench.kg.audit_path.read_text(),
            "keygate stdout": bench.kg.stdout_text(),
            "keygate stderr": bench.kg.stderr_text(),
        }
        found = {place: leaks(text) for place, text in places.items() if leaks(text)}
        assert found == {}, f"the canary secret leaked: {found}"
    finally:
        bench.upstream.stop()
        bench.mirror.stop()
