"""The token-minting sources through the real binary: `oauth2` (client credentials, refresh token
with rotation) and `github-app` (app JWT -> installation token, scoped per route), against the local
fake in fake_token_server.py, which checks what the real providers check."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import error_code, new_token
from fake_token_server import FakeTokenServer


@pytest.fixture
def provider():
    fake = FakeTokenServer().start()
    yield fake
    fake.stop()


def rsa_pem() -> tuple[bytes, bytes]:
    """A fresh RSA key: (private PEM in GitHub's PKCS#1 form, public PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def private_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def oauth_config(provider: FakeTokenServer, state_dir: Path, *, grant: str = "client_credentials", extra: str = "") -> str:
    refresh = 'refresh_token = "crm_refresh"\n' if grant == "refresh_token" else ""
    return f"""\
listen = ["127.0.0.1:0"]
state_dir = "{state_dir}"

[secrets.crm_client_secret]
source = "env"
name = "CRM_CLIENT_SECRET"

[secrets.crm_refresh]
source = "env"
name = "CRM_REFRESH_TOKEN"

[secrets.crm]
source = "oauth2"
token_url = "{provider.url}/oauth/token"
grant = "{grant}"
client_id = "{provider.client_id}"
client_secret = "crm_client_secret"
{refresh}scope = "contacts.read"
{extra}
[routes.crm]
prefix = "/crm"
upstream = "{provider.url}"
secret = "crm"
allow = ["GET /**"]

[agents.coder]
token_env = "KEYGATE_AGENT_TOKEN"
"""


def oauth_env(provider: FakeTokenServer, token: str, refresh: str | None = None) -> dict:
    return {
        "KEYGATE_AGENT_TOKEN": token,
        "CRM_CLIENT_SECRET": provider.client_secret,
        "CRM_REFRESH_TOKEN": refresh or provider.issued_refresh_tokens[0],
    }


def get(kg, token: str, path: str):
    with kg.client() as c:
        return c.get(path, headers={"Authorization": f"Bearer {token}"})


def test_oauth2_client_credentials_token_is_attached_and_reused_until_shortly_before_expiry(keygate, provider, tmp_path):
    token = new_token()
    kg = keygate(oauth_config(provider, tmp_path / "state"), env=oauth_env(provider, token))
    for _ in range(3):
        r = get(kg, token, "/crm/contacts")
        assert r.status_code == 200, r.text
    assert provider.grant_count("client_credentials") == 1
    first = provider.token_requests[0]
    assert first["basic"] and first["form"]["scope"] == "contacts.read" and "client_secret" not in first["form"]
    sent = {rr["token"] for rr in provider.resource_requests}
    assert sent == {provider.access_tokens[0]}
    # key id names the secret, never the token
    record = kg.audit_record(r.headers["x-request-id"])
    assert record["key_id"].startswith("crm#") and provider.access_tokens[0] not in str(record)


def test_oauth2_status_shows_key_id_last_fetch_and_the_token_expiry_never_a_token(keygate, keygate_bin, provider, tmp_path):
    import json

    from conftest import run_keygate

    token = new_token()
    env = oauth_env(provider, token)
    kg = keygate(oauth_config(provider, tmp_path / "state"), env=env)
    assert get(kg, token, "/crm/contacts").status_code == 200
    out = run_keygate(keygate_bin, ["status", "--config", str(kg.config_path), "--json"], tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    (crm,) = [x for x in json.loads(out.stdout)["secrets"] if x["name"] == "crm"]
    assert crm["source"] == f"oauth2:{provider.url}/oauth/token"
    assert crm["key_id"].startswith("crm#") and crm["last_fetch"] and crm["expires"], crm
    assert provider.access_tokens[0] not in out.stdout and provider.client_secret not in out.stdout


def test_oauth2_token_that_expires_within_the_renewal_margin_is_fetched_for_every_request(keygate, provider, tmp_path):
    provider.expires_in = 20  # inside keygate's 30 s margin: never fresh enough to reuse
    token = new_token()
    kg = keygate(oauth_config(provider, tmp_path / "state"), env=oauth_env(provider, token))
    for _ in range(3):
        assert get(kg, token, "/crm/contacts").status_code == 200
    assert provider.grant_count("client_credentials") == 3
    assert len({rr["token"] for rr in provider.resource_requests}) == 3


def test_oauth2_wrong_client_secret_is_a_503_naming_the_source_and_the_provider_error_code_only(keygate, provider, tmp_path):
    token = new_token()
    env = oauth_env(provider, token)
    wrong = "cs-wrong-" + os.urandom(8).hex()
    env["CRM_CLIENT_SECRET"] = wrong
    kg = keygate(oauth_config(provider, tmp_path / "state"), env=env)
    r = get(kg, token, "/crm/contacts")
    assert r.status_code == 503, r.text
    assert error_code(r) == "secret_unavailable"
    message = r.json()["error"]["message"]
    assert "secret crm" in message and "invalid_client" in message and "401" in message, message
    # the provider's description repeats the client secret: none of its body is passed on
    everything = r.text + "\n".join(kg.audit_lines()) + kg.stderr_text() + kg.stdout_text()
    assert wrong not in everything and "is unknown" not in everything
    assert provider.resource_requests == []


def test_oauth2_rotated_refresh_token_is_kept_in_the_state_store_across_a_restart(keygate, provider, tmp_path):
    token = new_token()
    state = tmp_path / "state"
    config = oauth_config(provider, state, grant="refresh_token")
    first_rt = provider.issued_refresh_tokens[0]
    kg = keygate(config, env=oauth_env(provider, token))
    assert get(kg, token, "/crm/contacts").status_code == 200
    assert provider.token_requests[-1]["form"]["refresh_token"] == first_rt
    kg.stop()
    # The provider retired the first refresh token when it rotated it; a keygate that forgot the
    # rotation would now get invalid_grant.
    kg2 = keygate(config, env=oauth_env(provider, token))
    r = get(kg2, token, "/crm/contacts")
    assert r.status_code == 200, r.text
    assert provider.token_requests[-1]["form"]["refresh_token"] == provider.issued_refresh_tokens[1]
    assert provider.grant_count("refresh_token") == 2
    # stored, but never in the clear where a log reader looks
    for rt in provider.issued_refresh_tokens:
        assert rt not in kg2.stderr_text() + "\n".join(kg2.audit_lines())


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/test installs it)")
def test_oauth2_rotated_refresh_token_is_kept_in_a_shared_redis_store_across_a_restart(keygate, provider, tmp_path):
    from test_shared_state import Redis

    redis = Redis(tmp_path).start()
    try:
        token = new_token()
        config = oauth_config(provider, tmp_path / "state", grant="refresh_token")
        config = f'state = {{ backend = "redis", url = "{redis.url}" }}\n' + config
        kg = keygate(config, env=oauth_env(provider, token))
        assert get(kg, token, "/crm/contacts").status_code == 200
        kg.stop()
        # Another keygate on the same store (here: the same one restarted) uses the rotation.
        kg2 = keygate(config, env=oauth_env(provider, token))
        r = get(kg2, token, "/crm/contacts")
        assert r.status_code == 200, r.text
        assert provider.token_requests[-1]["form"]["refresh_token"] == provider.issued_refresh_tokens[1]
        kg2.stop()
    finally:
        redis.stop()


def test_oauth2_a_new_configured_refresh_token_wins_over_the_stored_rotation_of_the_old_one(keygate, provider, tmp_path):
    token = new_token()
    state = tmp_path / "state"
    config = oauth_config(provider, state, grant="refresh_token")
    kg = keygate(config, env=oauth_env(provider, token))
    assert get(kg, token, "/crm/contacts").status_code == 200
    kg.stop()
    # The user re-consented elsewhere: the provider's valid refresh token is a new one, which the
    # user put in the configured source.
    provider.refresh_token = "rt-reconsented-" + os.urandom(12).hex()
    kg2 = keygate(config, env=oauth_env(provider, token, refresh=provider.refresh_token))
    r = get(kg2, token, "/crm/contacts")
    assert r.status_code == 200, r.text


def test_oauth2_refresh_refused_with_invalid_grant_is_a_503_with_that_code(keygate, provider, tmp_path):
    token = new_token()
    stale = "rt-stale-" + os.urandom(12).hex()
    kg = keygate(oauth_config(provider, tmp_path / "state", grant="refresh_token"), env=oauth_env(provider, token, refresh=stale))
    r = get(kg, token, "/crm/contacts")
    assert r.status_code == 503 and error_code(r) == "secret_unavailable"
    assert "invalid_grant" in r.json()["error"]["message"]
    assert stale not in r.text + kg.stderr_text() + "\n".join(kg.audit_lines())


def test_oauth2_50_concurrent_requests_cause_one_refresh(keygate, provider, tmp_path):
    provider.token_delay = 0.3  # the refresh is still running when the other 49 arrive
    token = new_token()
    kg = keygate(oauth_config(provider, tmp_path / "state", grant="refresh_token"), env=oauth_env(provider, token))
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(lambda _: get(kg, token, "/crm/contacts").status_code, range(50)))
    assert statuses == [200] * 50
    assert provider.grant_count("refresh_token") == 1
    assert len(provider.token_requests) == 1
    kg.audit_records(50)


def test_oauth2_upstream_401_refreshes_once_and_the_next_request_uses_the_new_token(keygate, provider, tmp_path):
    token = new_token()
    kg = keygate(oauth_config(provider, tmp_path / "state", grant="refresh_token"), env=oauth_env(provider, token))
    assert get(kg, token, "/crm/contacts").status_code == 200
    provider.revoke_all()
    r = get(kg, token, "/crm/contacts")
    assert r.status_code == 401  # the upstream's answer, passed on
    assert provider.grant_count("refresh_token") == 1
    for _ in range(2):
        assert get(kg, token, "/crm/contacts").status_code == 200
    assert provider.grant_count("refresh_token") == 2
    assert [rr["token"] for rr in provider.resource_requests] == [
        provider.access_tokens[0],
        provider.access_tokens[0],
        provider.access_tokens[1],
        provider.access_tokens[1],
    ]


def github_config(provider: FakeTokenServer, key_file: Path, extra_secret: str = "") -> str:
    return f"""\
listen = ["127.0.0.1:0"]

[secrets.gh_key]
source = "file"
path = "{key_file}"

[secrets.gh]
source = "github-app"
app_id = {provider.app_id}
installation_id = {provider.installation_id}
private_key = "gh_key"
api_url = "{provider.url}"
{extra_secret}
[routes.github]
prefix = "/github"
upstream = "{provider.url}"
secret = "gh"
allow = ["GET /**"]
repositories = ["keygate"]
permissions = {{ contents = "read", pull_requests = "write" }}

[routes.git]
prefix = "/git"
upstream = "{provider.url}"
secret = "gh"
inject = "basic"
basic_username = "x-access-token"
allow = ["GET /**"]
permissions = {{ contents = "read" }}

[routes.all]
prefix = "/all"
upstream = "{provider.url}"
secret = "gh"
allow = ["GET /**"]

[agents.coder]
token_env = "KEYGATE_AGENT_TOKEN"
"""


def test_github_app_mints_installation_tokens_scoped_per_route_as_bearer_and_git_basic(keygate, provider, tmp_path):
    private, public = rsa_pem()
    provider.app_public_key = public
    token = new_token()
    kg = keygate(github_config(provider, private_file(tmp_path / "app.pem", private)), env={"KEYGATE_AGENT_TOKEN": token})
    for path in ("/github/repos/o/keygate", "/github/repos/o/keygate", "/git/o/keygate.git/info/refs", "/all/user"):
        r = get(kg, token, path)
        assert r.status_code == 200, (path, r.text)
    minted = [q for q in provider.installation_requests if q["ok"]]
    # one token per scope, reused within its lifetime
    assert [q["body"] for q in minted] == [
        {"repositories": ["keygate"], "permissions": {"contents": "read", "pull_requests": "write"}},
        {"permissions": {"contents": "read"}},
        {},
    ]
    seen = provider.resource_requests
    assert seen[0]["auth"] == f"Bearer {minted[0]['token']}" and seen[1]["auth"] == seen[0]["auth"]
    basic = base64.b64encode(f"x-access-token:{minted[1]['token']}".encode()).decode()
    assert seen[2]["auth"] == f"Basic {basic}"
    assert seen[3]["auth"] == f"Bearer {minted[2]['token']}"
    assert kg.audit_record(r.headers["x-request-id"])["key_id"].startswith("gh#")


def test_github_app_token_expiring_within_five_minutes_is_minted_again(keygate, provider, tmp_path):
    private, public = rsa_pem()
    provider.app_public_key = public
    provider.gh_expires_in = 4 * 60  # GitHub gives an hour; a token this close to its end is replaced
    token = new_token()
    kg = keygate(github_config(provider, private_file(tmp_path / "app.pem", private)), env={"KEYGATE_AGENT_TOKEN": token})
    for _ in range(2):
        assert get(kg, token, "/all/user").status_code == 200
    assert len([q for q in provider.installation_requests if q["ok"]]) == 2


def test_github_app_jwt_signed_with_another_key_is_refused_with_a_503_and_no_provider_body(keygate, provider, tmp_path):
    private, _ = rsa_pem()
    _, other_public = rsa_pem()
    provider.app_public_key = other_public
    token = new_token()
    kg = keygate(github_config(provider, private_file(tmp_path / "app.pem", private)), env={"KEYGATE_AGENT_TOKEN": token})
    r = get(kg, token, "/github/repos/o/keygate")
    assert r.status_code == 503 and error_code(r) == "secret_unavailable"
    message = r.json()["error"]["message"]
    assert "secret gh@github" in message and "401" in message, message
    assert "could not be decoded" not in r.text + kg.stderr_text()
    assert provider.resource_requests == []


def test_github_app_scope_on_a_route_whose_secret_is_not_a_github_app_is_a_config_error(keygate_bin, tmp_path):
    import subprocess

    config = tmp_path / "c.toml"
    config.write_text(
        '[secrets.k]\nsource = "env"\nname = "K"\n[routes.r]\nprefix = "/r"\nupstream = "https://api.github.com"\n'
        'secret = "k"\nrepositories = ["keygate"]\n'
    )
    p = subprocess.run([str(keygate_bin), "check", "--config", str(config)], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2
    assert f"{config}:8: routes.r.repositories:" in p.stderr, p.stderr
