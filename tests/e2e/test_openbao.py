"""The openbao source against a real OpenBao dev server (`bao server -dev`): KV v2 reads with the
version as key id, AppRole and JWT login, keygate's own token renewed, and dynamic credentials
with leases (`jit`), live in OpenBao's lease list while a request uses them and revoked after."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import threading
import time

import pytest

from conftest import DEADLINE, fake_secret, new_token, poll
from openbao_server import openbao  # noqa: F401  (the fixture)

KV_READ = 'path "secret/data/*" { capabilities = ["read"] }\n'


def config(upstream: str, secret: str, *, jit: str | None = None, extra: str = "") -> str:
    jit_line = f'jit = "{jit}"\n' if jit else ""
    return f"""\
listen = ["127.0.0.1:0"]

{secret}

[routes.openai]
prefix = "/openai"
upstream = "{upstream}"
secret = "vaulted"
{jit_line}allow = ["POST /v1/chat/completions"]

[agents.coder]
token_env = "KEYGATE_AGENT_TOKEN"
{extra}"""


def kv_secret(addr: str, *, auth: str = 'token_env = "BAO_TOKEN"', ttl: str | None = None) -> str:
    ttl_line = f'ttl = "{ttl}"\n' if ttl else ""
    return f"""\
[secrets.vaulted]
source = "openbao"
address = "{addr}"
{auth}
mount = "secret"
path = "openai"
field = "api_key"
{ttl_line}"""


def chat(kg, token: str):
    with kg.client() as c:
        return c.post(
            "/openai/v1/chat/completions",
            json={"model": "gpt-fake", "messages": []},
            headers={"Authorization": f"Bearer {token}"},
        )


def sent_key(fake) -> str:
    return fake.requests[-1].header("authorization").removeprefix("Bearer ")


def lease_fingerprint(lease_id: str) -> str:
    return hashlib.sha256(b"keygate lease-id v1\0" + lease_id.encode()).hexdigest()[:8]


def test_openbao_kv_field_is_attached_and_its_version_is_the_key_id(keygate, fake_upstream, openbao):
    value = fake_secret("sk-proj-bao")
    assert openbao.kv_put("openai", {"api_key": value, "other": "x"}) == 1
    token = new_token()
    kg = keygate(
        config(fake_upstream.url, kv_secret(openbao.addr)),
        env={"KEYGATE_AGENT_TOKEN": token, "BAO_TOKEN": openbao.root},
    )
    r = chat(kg, token)
    assert r.status_code == 200, r.text
    assert sent_key(fake_upstream) == value
    assert kg.audit_record(r.headers["x-request-id"])["key_id"] == "vaulted#v1"


def test_openbao_new_kv_version_is_used_after_its_ttl(keygate, fake_upstream, openbao):
    openbao.kv_put("openai", {"api_key": fake_secret("sk-proj-one")})
    token = new_token()
    kg = keygate(
        config(fake_upstream.url, kv_secret(openbao.addr, ttl="1s")),
        env={"KEYGATE_AGENT_TOKEN": token, "BAO_TOKEN": openbao.root},
    )
    assert chat(kg, token).status_code == 200
    second = fake_secret("sk-proj-two")
    assert openbao.kv_put("openai", {"api_key": second}) == 2

    def uses_v2():
        r = chat(kg, token)
        assert r.status_code == 200, r.text
        return sent_key(fake_upstream) == second and r.headers["x-request-id"]

    rid = poll(uses_v2, "the second KV version to be used once the TTL ended")
    assert kg.audit_record(rid)["key_id"] == "vaulted#v2"


def test_openbao_new_kv_version_is_used_after_a_reload_and_not_before(keygate, fake_upstream, openbao):
    first = fake_secret("sk-proj-one")
    openbao.kv_put("openai", {"api_key": first})
    token = new_token()
    kg = keygate(
        config(fake_upstream.url, kv_secret(openbao.addr)),
        env={"KEYGATE_AGENT_TOKEN": token, "BAO_TOKEN": openbao.root},
    )
    second = fake_secret("sk-proj-two")
    openbao.kv_put("openai", {"api_key": second})
    assert chat(kg, token).status_code == 200
    assert sent_key(fake_upstream) == first, "without a TTL the fetched version is kept until a reload"
    kg.proc.send_signal(signal.SIGHUP)

    def uses_v2():
        r = chat(kg, token)
        return sent_key(fake_upstream) == second and r.headers["x-request-id"]

    rid = poll(uses_v2, "the reloaded keygate to read the new version")
    assert kg.audit_record(rid)["key_id"] == "vaulted#v2"


def test_openbao_unreadable_path_is_a_clear_503_naming_the_source_and_never_the_token(keygate, fake_upstream, openbao):
    # fetch = "first-use": keygate starts, and the refusal is seen on the wire.
    token = new_token()
    secret = kv_secret(openbao.addr).replace('path = "openai"', 'path = "missing"') + 'fetch = "first-use"\n'
    kg = keygate(
        config(fake_upstream.url, secret),
        env={"KEYGATE_AGENT_TOKEN": token, "BAO_TOKEN": openbao.root},
    )
    r = chat(kg, token)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "secret_unavailable"
    assert "openbao" in r.text and "secret/data/missing answered 404" in r.text, r.text
    assert fake_upstream.requests == []
    for text in (r.text, kg.stderr_text(), "\n".join(kg.audit_lines())):
        assert openbao.root not in text


def test_openbao_approle_login_reads_the_secret(keygate, fake_upstream, openbao):
    value = fake_secret("sk-proj-approle")
    openbao.kv_put("openai", {"api_key": value})
    openbao.policy("kv-read", KV_READ)
    openbao.api("POST", "sys/auth/approle", {"type": "approle"})
    openbao.api("POST", "auth/approle/role/keygate", {"token_policies": ["kv-read"], "token_ttl": "5m"})
    role_id = openbao.api("GET", "auth/approle/role/keygate/role-id")["data"]["role_id"]
    secret_id = openbao.api("POST", "auth/approle/role/keygate/secret-id")["data"]["secret_id"]
    auth = f'auth = "approle"\nrole_id = "{role_id}"\nsecret_id_from = "approle_sid"'
    secret = kv_secret(openbao.addr, auth=auth) + '\n[secrets.approle_sid]\nsource = "env"\nname = "BAO_SECRET_ID"\n'
    token = new_token()
    kg = keygate(
        config(fake_upstream.url, secret),
        # No OpenBao token in keygate's environment at all: the login is the only way in.
        env={"KEYGATE_AGENT_TOKEN": token, "BAO_SECRET_ID": secret_id},
    )
    r = chat(kg, token)
    assert r.status_code == 200, r.text
    assert sent_key(fake_upstream) == value
    # The read used a token from an AppRole login (there is no other token keygate could have).
    accessors = openbao.api("LIST", "auth/token/accessors")["data"]["keys"]
    paths = [openbao.api("POST", "auth/token/lookup-accessor", {"accessor": a})["data"]["path"] for a in accessors]
    assert "auth/approle/login" in paths, paths

    # A token keygate logged in for is its own: revoked when keygate stops.
    assert kg.stop() == 0
    accessors = openbao.api("LIST", "auth/token/accessors")["data"]["keys"]
    paths = [openbao.api("POST", "auth/token/lookup-accessor", {"accessor": a})["data"]["path"] for a in accessors]
    assert "auth/approle/login" not in paths, paths


def approle_tokens(openbao) -> list[str]:
    """The live tokens of AppRole logins; one revoked between the list and its lookup is gone."""
    accessors = openbao.api("LIST", "auth/token/accessors")["data"]["keys"]
    found = [openbao.api("POST", "auth/token/lookup-accessor", {"accessor": a}, ok=False) for a in accessors]
    return [a for a, f in zip(accessors, found) if f.get("data", {}).get("path") == "auth/approle/login"]


def test_openbao_reloads_with_approle_leave_no_token_of_a_replaced_source_behind(keygate, fake_upstream, openbao):
    openbao.kv_put("openai", {"api_key": fake_secret("sk-proj-reload")})
    openbao.policy("kv-read", KV_READ)
    openbao.api("POST", "sys/auth/approle", {"type": "approle"})
    openbao.api("POST", "auth/approle/role/keygate", {"token_policies": ["kv-read"], "token_ttl": "5m"})
    role_id = openbao.api("GET", "auth/approle/role/keygate/role-id")["data"]["role_id"]
    secret_id = openbao.api("POST", "auth/approle/role/keygate/secret-id")["data"]["secret_id"]
    auth = f'auth = "approle"\nrole_id = "{role_id}"\nsecret_id_from = "approle_sid"'
    secret = kv_secret(openbao.addr, auth=auth) + '\n[secrets.approle_sid]\nsource = "env"\nname = "BAO_SECRET_ID"\n'
    token = new_token()
    kg = keygate(config(fake_upstream.url, secret), env={"KEYGATE_AGENT_TOKEN": token, "BAO_SECRET_ID": secret_id})
    assert chat(kg, token).status_code == 200
    assert len(approle_tokens(openbao)) == 1
    for _ in range(3):
        before = set(approle_tokens(openbao))
        kg.proc.send_signal(signal.SIGHUP)
        # The reloaded keygate logs in afresh at its first read: a token not seen before.
        poll(lambda: chat(kg, token).status_code == 200 and set(approle_tokens(openbao)) - before, "a read through the reloaded source")
    poll(lambda: len(approle_tokens(openbao)) == 1, "the replaced sources' tokens to be revoked, leaving the live one")
    assert kg.stop() == 0
    assert approle_tokens(openbao) == []


def test_openbao_token_at_its_max_ttl_is_replaced_by_a_fresh_approle_login(keygate, fake_upstream, openbao):
    value = fake_secret("sk-proj-relogin")
    openbao.kv_put("openai", {"api_key": value})
    openbao.policy("kv-read", KV_READ)
    openbao.api("POST", "sys/auth/approle", {"type": "approle"})
    # Tokens that cannot outlive 3 s however often they are renewed.
    openbao.api("POST", "auth/approle/role/keygate", {"token_policies": ["kv-read"], "token_ttl": "2s", "token_max_ttl": "3s"})
    role_id = openbao.api("GET", "auth/approle/role/keygate/role-id")["data"]["role_id"]
    secret_id = openbao.api("POST", "auth/approle/role/keygate/secret-id", {"num_uses": 50})["data"]["secret_id"]
    auth = f'auth = "approle"\nrole_id = "{role_id}"\nsecret_id_from = "approle_sid"'
    secret = kv_secret(openbao.addr, auth=auth, ttl="1s") + '\n[secrets.approle_sid]\nsource = "env"\nname = "BAO_SECRET_ID"\n'
    token = new_token()
    kg = keygate(config(fake_upstream.url, secret), env={"KEYGATE_AGENT_TOKEN": token, "BAO_SECRET_ID": secret_id})
    start = time.monotonic()
    while time.monotonic() - start < 5:  # past the first token's max TTL, reading every second
        r = chat(kg, token)
        assert r.status_code == 200, r.text
        assert sent_key(fake_upstream) == value
        time.sleep(0.25)
    left = openbao.api("POST", "auth/approle/role/keygate/secret-id/lookup", {"secret_id": secret_id})["data"]["secret_id_num_uses"]
    assert left <= 48, f"keygate logged in {50 - left} time(s); its first token died at 3 s"


def test_openbao_jwt_login_with_the_jwt_from_another_source(keygate, fake_upstream, openbao, tmp_path):
    jwt = pytest.importorskip("jwt")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    value = fake_secret("sk-proj-jwt")
    openbao.kv_put("openai", {"api_key": value})
    openbao.policy("kv-read", KV_READ)
    openbao.api("POST", "sys/auth/jwt", {"type": "jwt"})
    openbao.api("POST", "auth/jwt/config", {"jwt_validation_pubkeys": [public], "bound_issuer": "https://ci.example"})
    openbao.api(
        "POST",
        "auth/jwt/role/keygate",
        {
            "role_type": "jwt",
            "user_claim": "sub",
            "bound_audiences": ["openbao"],
            "bound_claims": {"repo": "keygate"},
            "token_policies": ["kv-read"],
        },
    )
    now = int(time.time())
    claims = {"iss": "https://ci.example", "sub": "agent-1", "aud": "openbao", "repo": "keygate", "iat": now, "exp": now + 600}
    token_file = tmp_path / "ci.jwt"
    token_file.write_text(jwt.encode(claims, key, algorithm="ES256"))
    token_file.chmod(0o600)
    auth = 'auth = "jwt"\nrole = "keygate"\njwt_from = "ci_jwt"'
    secret = kv_secret(openbao.addr, auth=auth) + f'\n[secrets.ci_jwt]\nsource = "file"\npath = "{token_file}"\n'
    token = new_token()
    kg = keygate(config(fake_upstream.url, secret), env={"KEYGATE_AGENT_TOKEN": token})
    r = chat(kg, token)
    assert r.status_code == 200, r.text
    assert sent_key(fake_upstream) == value

    # Its benign neighbour's opposite: a JWT for another repo is refused by OpenBao, and keygate
    # does not start (every secret is fetched at start-up), saying which step failed.
    claims["repo"] = "other"
    token_file.write_text(jwt.encode(claims, key, algorithm="ES256"))
    from conftest import StartupFailed

    with pytest.raises(StartupFailed) as failed:
        keygate(config(fake_upstream.url, secret), env={"KEYGATE_AGENT_TOKEN": token})
    assert "auth/jwt/login answered 400" in failed.value.stderr or "auth/jwt/login answered 403" in failed.value.stderr, failed.value.stderr


def test_openbao_keygates_own_token_is_renewed_before_it_expires(keygate, fake_upstream, openbao):
    value = fake_secret("sk-proj-renew")
    openbao.kv_put("openai", {"api_key": value})
    openbao.policy("kv-read", KV_READ)
    # A short-lived token: without renewal it is dead four seconds after keygate starts.
    short = openbao.api("POST", "auth/token/create", {"policies": ["kv-read"], "ttl": "4s", "renewable": True, "explicit_max_ttl": "1h"})
    bao_token = short["auth"]["client_token"]
    token = new_token()
    kg = keygate(
        config(fake_upstream.url, kv_secret(openbao.addr, ttl="1s")),
        env={"KEYGATE_AGENT_TOKEN": token, "BAO_TOKEN": bao_token},
    )
    created = time.monotonic()

    def renewed():
        data = openbao.api("POST", "auth/token/lookup", {"token": bao_token})["data"]
        return data.get("last_renewal_time") or data.get("last_renewal")

    poll(renewed, "keygate to renew its OpenBao token", timeout=DEADLINE)
    # Past the token's first expiry, keygate still reads with it (the secret's TTL forces a read).
    while time.monotonic() - created < 5:
        time.sleep(0.2)
    r = chat(kg, token)
    assert r.status_code == 200, r.text
    assert sent_key(fake_upstream) == value
    assert openbao.api("POST", "auth/token/lookup", {"token": bao_token}, ok=False).get("data"), "the token is still alive"


def enable_pki(openbao) -> None:
    """A PKI engine whose certificates come with leases: dynamic credentials with no other
    service (`generate_lease`)."""
    openbao.api("POST", "sys/mounts/pki", {"type": "pki", "config": {"max_lease_ttl": "1h"}})
    openbao.api("POST", "pki/root/generate/internal", {"common_name": "keygate test CA", "ttl": "1h"})
    openbao.api(
        "POST",
        "pki/roles/agent",
        {"allowed_domains": ["example.com"], "allow_subdomains": True, "generate_lease": True, "ttl": "5m", "max_ttl": "10m"},
    )


def dynamic_secret(addr: str) -> str:
    return f"""\
[secrets.vaulted]
source = "openbao"
address = "{addr}"
token_env = "BAO_TOKEN"
dynamic = "pki/issue/agent"
params = {{ common_name = "agent.example.com", ttl = "5m" }}
field = "serial_number"
"""


def test_openbao_dynamic_lease_per_request_is_live_while_in_use_and_revoked_after(keygate, fake_upstream, openbao):
    enable_pki(openbao)
    token = new_token()
    kg = keygate(
        config(fake_upstream.url, dynamic_secret(openbao.addr), jit="request"),
        env={"KEYGATE_AGENT_TOKEN": token, "BAO_TOKEN": openbao.root},
    )
    assert openbao.leases("pki/issue/agent") == [], "jit = request fetches nothing at start-up"
    gate = threading.Event()
    fake_upstream.first_event_gate = gate
    with kg.client() as c:
        with c.stream(
            "POST",
            "/openai/v1/chat/completions",
            json={"model": "gpt-fake", "stream": True, "messages": []},
            headers={"Authorization": f"Bearer {token}"},
        ) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            # The answer is still streaming: its credential's lease is live.
            live = openbao.leases("pki/issue/agent")
            assert len(live) == 1, live
            gate.set()
            for _ in lines:
                pass
        rid = s.headers["x-request-id"]
    record = kg.audit_record(rid)
    assert record["key_id"] == f"vaulted#lease-{lease_fingerprint('pki/issue/agent/' + live[0])}"
    poll(lambda: openbao.leases("pki/issue/agent") == [], "the request's lease to be revoked")

    # The next request gets a credential of its own.
    fake_upstream.first_event_gate = None
    first_key = sent_key(fake_upstream)
    r = chat(kg, token)
    assert r.status_code == 200, r.text
    assert sent_key(fake_upstream) != first_key
    assert kg.audit_record(r.headers["x-request-id"])["key_id"] != record["key_id"]
    poll(lambda: openbao.leases("pki/issue/agent") == [], "the second lease to be revoked")


def test_openbao_run_lease_is_shared_by_requests_and_revoked_at_shutdown(keygate, fake_upstream, openbao):
    enable_pki(openbao)
    token = new_token()
    kg = keygate(
        config(fake_upstream.url, dynamic_secret(openbao.addr), jit="run"),
        env={"KEYGATE_AGENT_TOKEN": token, "BAO_TOKEN": openbao.root},
    )
    ids = []
    for _ in range(3):
        r = chat(kg, token)
        assert r.status_code == 200, r.text
        ids.append(kg.audit_record(r.headers["x-request-id"])["key_id"])
    assert len(set(ids)) == 1, ids
    assert len(openbao.leases("pki/issue/agent")) == 1
    assert kg.stop() == 0
    assert openbao.leases("pki/issue/agent") == [], "keygate revokes its leases when it stops"


def test_openbao_run_lease_is_one_per_keygate_run_and_revoked_when_the_run_ends(keygate, keygate_bin, fake_upstream, openbao, tmp_path):
    import subprocess

    enable_pki(openbao)
    token = new_token()
    state = f'state_dir = "{tmp_path / "state"}"\n'
    kg = keygate(
        state + config(fake_upstream.url, dynamic_secret(openbao.addr), jit="run"),
        env={"KEYGATE_AGENT_TOKEN": token, "BAO_TOKEN": openbao.root},
    )
    shared = kg.audit_record(chat(kg, token).headers["x-request-id"])["key_id"]
    assert len(openbao.leases("pki/issue/agent")) == 1, "requests outside a run share one lease"
    call = (
        'curl -s -o /dev/null -w "%{http_code}\\n" -H "Authorization: Bearer $OPENAI_API_KEY" '
        '-H "content-type: application/json" -d \'{"model":"m","messages":[]}\' "$OPENAI_BASE_URL/chat/completions"'
    )

    def one_run() -> set[str]:
        out = subprocess.run(
            [str(keygate_bin), "run", "--config", str(kg.config_path), "--no-sandbox", "--", "sh", "-c",
             f"{call}; {call}"],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, cwd=tmp_path,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=DEADLINE,
        )
        assert out.returncode == 0 and out.stdout.split() == ["200", "200"], (out.stdout, out.stderr)
        records = [r for r in kg.audit_records() if r.get("run_id") and r.get("request_id")]
        last_run = records[-1]["run_id"]
        return {r["key_id"] for r in records if r["run_id"] == last_run}

    first = one_run()
    assert len(first) == 1 and shared not in first, "a run's requests share the run's own lease"
    poll(lambda: len(openbao.leases("pki/issue/agent")) == 1, "the ended run's lease to be revoked")
    second = one_run()
    assert len(second) == 1 and second != first, "the next run gets a lease of its own"
    poll(lambda: len(openbao.leases("pki/issue/agent")) == 1, "the second run's lease to be revoked")
    # The shared lease outside runs was never touched.
    assert kg.audit_record(chat(kg, token).headers["x-request-id"])["key_id"] == shared
    assert kg.stop() == 0
    assert openbao.leases("pki/issue/agent") == []


def test_openbao_ttl_lease_is_cached_then_replaced_and_the_old_one_revoked(keygate, fake_upstream, openbao):
    enable_pki(openbao)
    token = new_token()
    # A 32 s lease is fetched afresh 30 s before it ends: replaced about 2 s after it was issued.
    secret = dynamic_secret(openbao.addr).replace('ttl = "5m"', 'ttl = "32s"')
    kg = keygate(
        config(fake_upstream.url, secret, jit="ttl"),
        env={"KEYGATE_AGENT_TOKEN": token, "BAO_TOKEN": openbao.root},
    )
    first = [chat(kg, token), chat(kg, token)]
    ids = {kg.audit_record(r.headers["x-request-id"])["key_id"] for r in first}
    assert len(ids) == 1, "one lease serves while it is fresh"
    (first_lease,) = openbao.leases("pki/issue/agent")

    def replaced():
        r = chat(kg, token)
        return kg.audit_record(r.headers["x-request-id"])["key_id"] not in ids

    poll(replaced, "a new lease once the first is about to end")
    poll(lambda: first_lease not in openbao.leases("pki/issue/agent"), "the replaced lease to be revoked")
    assert len(openbao.leases("pki/issue/agent")) == 1


@pytest.fixture
def redis_server(tmp_path):
    """A password-protected redis-server for OpenBao's database engine (real dynamic users with
    renewable leases)."""
    import shutil
    import subprocess

    from openbao_server import free_port

    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is missing: scripts/test installs it")
        pytest.skip("redis-server not found (apt-get install redis-server; scripts/test does)")
    port = free_port()
    password = secrets.token_hex(16)
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--requirepass", password],
        stdin=subprocess.DEVNULL,
        stdout=open(tmp_path / "redis.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        poll(lambda: redis_auth(port, "default", password) or proc.poll() is not None, "redis-server to answer")
        yield port, password
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def redis_auth(port: int, user: str, password: str) -> bool:
    """Whether redis accepts AUTH user password (False on WRONGPASS or no answer)."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            cmd = [b"AUTH", user.encode(), password.encode()]
            s.sendall(b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(c), c) for c in cmd))
            return s.recv(64).startswith(b"+OK")
    except OSError:
        return False


def test_openbao_dynamic_redis_user_is_renewed_while_its_request_streams_and_revoked_after(keygate, fake_upstream, openbao, redis_server):
    port, password = redis_server
    openbao.api("POST", "sys/mounts/database", {"type": "database"})
    openbao.api(
        "POST",
        "database/config/redis",
        {"plugin_name": "redis-database-plugin", "host": "127.0.0.1", "port": port, "username": "default", "password": password, "tls": False, "allowed_roles": ["agent"]},
    )
    # A 4 s lease: a request streaming longer than that needs it renewed.
    openbao.api("POST", "database/roles/agent", {"db_name": "redis", "creation_statements": ['["~*","+@read"]'], "default_ttl": "4s", "max_ttl": "5m"})
    secret = f"""\
[secrets.vaulted]
source = "openbao"
address = "{openbao.addr}"
token_env = "BAO_TOKEN"
dynamic = "database/creds/agent"
field = "password"
"""
    token = new_token()
    kg = keygate(config(fake_upstream.url, secret, jit="request"), env={"KEYGATE_AGENT_TOKEN": token, "BAO_TOKEN": openbao.root})
    gate = threading.Event()
    fake_upstream.first_event_gate = gate
    with kg.client() as c:
        with c.stream(
            "POST",
            "/openai/v1/chat/completions",
            json={"model": "gpt-fake", "stream": True, "messages": []},
            headers={"Authorization": f"Bearer {token}"},
        ) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            (lease,) = openbao.leases("database/creds/agent")
            lease_id = "database/creds/agent/" + lease

            def renewed():
                return openbao.api("PUT", "sys/leases/lookup", {"lease_id": lease_id})["data"].get("last_renewal")

            poll(renewed, "keygate to renew the lease of the credential its request uses")
            (user,) = [u for u in redis_acl_users(port, password) if u != "default"]
            assert redis_auth(port, user, sent_key(fake_upstream)), "the injected password is the live user's"
            gate.set()
            for _ in lines:
                pass
    # The credential is a real redis user: it worked while leased, and not after revocation.
    poll(lambda: openbao.leases("database/creds/agent") == [], "the lease to be revoked after the answer")
    assert not redis_auth(port, user, sent_key(fake_upstream)), "WRONGPASS once the lease is revoked"
    assert [u for u in redis_acl_users(port, password) if u != "default"] == []


def redis_acl_users(port: int, password: str) -> list[str]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(password), password.encode()))
        s.recv(64)
        s.sendall(b"*2\r\n$3\r\nACL\r\n$5\r\nUSERS\r\n")
        data = s.recv(4096).decode()
    return [line for line in data.split("\r\n") if line and line[0] not in "*$"]


def test_openbao_jit_on_a_route_whose_secret_is_not_dynamic_is_refused_at_load(keygate, fake_upstream, openbao, tmp_path):
    from conftest import StartupFailed

    with pytest.raises(StartupFailed) as failed:
        keygate(
            config(fake_upstream.url, kv_secret(openbao.addr), jit="request"),
            env={"KEYGATE_AGENT_TOKEN": new_token(), "BAO_TOKEN": openbao.root},
        )
    assert "routes.openai.jit" in failed.value.stderr and "dynamic" in failed.value.stderr, failed.value.stderr


def test_canary_openbao_token_lease_id_and_value_never_leave_keygate(keygate, fake_upstream, openbao):
    """The canary for the openbao source: the upstream echoes the credential back; afterwards
    neither the value, keygate's OpenBao token nor a lease id appears in any response, audit
    line or log line (at trace level)."""
    enable_pki(openbao)
    fake_upstream.echo_key = True
    token = new_token()
    kg = keygate(
        config(fake_upstream.url, dynamic_secret(openbao.addr), jit="run"),
        env={"KEYGATE_AGENT_TOKEN": token, "BAO_TOKEN": openbao.root, "KEYGATE_LOG": "trace", "RUST_LOG": "trace"},
    )
    seen = []
    r = chat(kg, token)
    assert r.status_code == 200, r.text
    seen += [f"{k}: {v}" for k, v in r.headers.multi_items()] + [r.text]
    value = sent_key(fake_upstream)
    assert value and "[REDACTED" in r.text  # the benign half: the upstream got the real value
    leases = ["pki/issue/agent/" + x for x in openbao.leases("pki/issue/agent")]
    assert len(leases) == 1
    with kg.client() as c:  # an error answer too
        bad = c.get("/openai/nope", headers={"Authorization": f"Bearer {token}"})
        seen += [bad.text]
    kg.stop()
    places = {
        "responses": "\n".join(seen),
        "audit": "\n".join(kg.audit_lines()),
        "stderr": kg.stderr_text(),
        "stdout": kg.stdout_text(),
    }
    for where, text in places.items():
        for name, needle in (("value", value), ("openbao token", openbao.root), ("lease id", leases[0])):
            assert needle not in text, f"{name} found in {where}"
        assert leases[0].rsplit("/", 1)[1] not in text, f"lease id suffix found in {where}"
