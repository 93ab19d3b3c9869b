"""AWS against a real AWS API: `moto_server` started with INITIAL_NO_AUTH_ACTION_COUNT, so after the
set-up calls every request's SigV4 signature is checked against the IAM access key moto issued,
as AWS does (a wrong signature gets 403 SignatureDoesNotMatch).

- the `aws-secrets-manager` source: GetSecretValue signed with keygate's own keys, a JSON field
  as the credential, the secret's VersionId as the audit key id;
- `inject = "aws-sigv4"`: keygate signs the agent's request with its own keys (the agent's
  signature headers dropped), whole bodies by hash, streamed S3 bodies as UNSIGNED-PAYLOAD;
- `keygate check --fetch` reports key id and fetch time, never a value.

The AWS canary (secret key and session token never leave keygate) is in test_canary.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DEADLINE, fake_secret, new_token, poll, run_keygate

MOTO_BIN = Path(sys.executable).parent / "moto_server"
REGION = "us-east-1"

if not MOTO_BIN.exists():
    if os.environ.get("CI") == "true":
        pytest.fail(f"moto_server is missing at {MOTO_BIN} (scripts/test installs it)", pytrace=False)
    pytest.skip(f"moto_server is not installed at {MOTO_BIN}; scripts/test installs it", allow_module_level=True)

import boto3  # noqa: E402 - installed with moto; only needed when moto is


@dataclass
class Moto:
    url: str
    access_key_id: str
    secret_access_key: str

    def client(self, service: str, secret_key: str | None = None):
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=secret_key or self.secret_access_key,
        )

    def env(self) -> dict[str, str]:
        """keygate's own AWS credentials, as the standard chain reads them."""
        return {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}


@pytest.fixture
def moto(tmp_path):
    """A moto_server that checks signatures after three unsigned set-up calls (create a user, give
    it every permission, issue its access key)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "INITIAL_NO_AUTH_ACTION_COUNT": "3",
        "NO_PROXY": "*",
    }
    log = open(tmp_path / "moto.log", "wb")
    proc = subprocess.Popen(
        [str(MOTO_BIN), "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"moto_server exited: {(tmp_path / 'moto.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    return True
            except OSError:
                return None

        poll(ready, "moto_server to answer", timeout=30)
        iam = boto3.client("iam", endpoint_url=url, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="keygate")
        iam.put_user_policy(
            UserName="keygate",
            PolicyName="all",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}),
        )
        key = iam.create_access_key(UserName="keygate")["AccessKey"]
        yield Moto(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=DEADLINE)
        log.close()


def sm_config(moto: Moto, upstream: str, *, secret_id: str, field: str | None = "api_key") -> str:
    field_line = f'field = "{field}"' if field else ""
    return f"""\
listen = ["127.0.0.1:0"]

[secrets.aws_sm]
source = "aws-secrets-manager"
secret_id = "{secret_id}"
region = "{REGION}"
endpoint = "{moto.url}"
{field_line}

[routes.openai]
prefix = "/openai"
upstream = "{upstream}"
secret = "aws_sm"
allow = ["POST /v1/chat/completions"]

[agents.coder]
token_env = "KEYGATE_AGENT_TOKEN"
"""


def sigv4_config(upstream: str, service: str, allow: str, extra: str = "") -> str:
    return f"""\
listen = ["127.0.0.1:0"]

[secrets.aws]
source = "aws-credentials"

[routes.aws]
prefix = "/aws"
upstream = "{upstream}"
secret = "aws"
inject = "aws-sigv4"
region = "{REGION}"
service = "{service}"
allow = [{allow}]
{extra}
[agents.coder]
token_env = "KEYGATE_AGENT_TOKEN"
"""


def test_aws_secrets_manager_json_field_is_the_credential_and_its_version_the_key_id(keygate, fake_upstream, moto):
    api_key = fake_secret("sk-proj-fromAwsSm")
    created = moto.client("secretsmanager").create_secret(Name="openai", SecretString=json.dumps({"api_key": api_key, "org": "x"}))
    token = new_token()
    kg = keygate(sm_config(moto, fake_upstream.url, secret_id="openai"), env={"KEYGATE_AGENT_TOKEN": token, **moto.env()})
    with kg.client() as c:
        r = c.post("/openai/v1/chat/completions", json={"model": "gpt-fake"}, headers={"X-Broker-Token": token})
    assert r.status_code == 200, r.text
    assert fake_upstream.requests[-1].header("authorization") == f"Bearer {api_key}"
    assert kg.audit_record(r.headers["x-request-id"])["key_id"] == f"aws_sm#{created['VersionId']}"


def test_aws_secrets_manager_missing_secret_fails_start_up_naming_the_error_code_only(keygate, fake_upstream, moto, keygate_bin, tmp_path):
    cfg = tmp_path / "missing.toml"
    cfg.write_text(sm_config(moto, fake_upstream.url, secret_id="no-such-secret"))
    result = run_keygate(keygate_bin, ["serve", "--config", str(cfg)], tmp_path, env={"KEYGATE_AGENT_TOKEN": new_token(), **moto.env()})
    assert result.returncode != 0
    assert "ResourceNotFoundException" in result.stderr, result.stderr
    assert "aws_sm" in result.stderr
    assert moto.secret_access_key not in result.stdout + result.stderr


def test_aws_secrets_manager_with_wrong_keys_is_refused_by_moto_with_403(keygate, fake_upstream, moto, keygate_bin, tmp_path):
    """The control for every signing test here: moto really checks signatures."""
    moto.client("secretsmanager").create_secret(Name="openai", SecretString=json.dumps({"api_key": fake_secret("sk-proj-x")}))
    cfg = tmp_path / "wrong.toml"
    cfg.write_text(sm_config(moto, fake_upstream.url, secret_id="openai"))
    wrong = {**moto.env(), "AWS_SECRET_ACCESS_KEY": "wrong" + moto.secret_access_key[5:]}
    result = run_keygate(keygate_bin, ["check", "--fetch", "--config", str(cfg)], tmp_path, env={"KEYGATE_AGENT_TOKEN": new_token(), **wrong})
    assert result.returncode == 1, result.stderr
    assert "GetSecretValue answered 403" in result.stdout, result.stdout
    assert wrong["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr


def test_check_fetch_reports_key_id_and_fetch_time_of_every_secret_without_a_value(moto, keygate_bin, tmp_path, fake_upstream):
    api_key = fake_secret("sk-proj-checkFetch")
    created = moto.client("secretsmanager").create_secret(Name="openai", SecretString=json.dumps({"api_key": api_key}))
    env_key = fake_secret("sk-ant-api03-cf")
    cfg = tmp_path / "fetch.toml"
    cfg.write_text(
        sm_config(moto, fake_upstream.url, secret_id="openai")
        + '\n[secrets.env_one]\nsource = "env"\nname = "ENV_ONE"\n\n[secrets.missing]\nsource = "env"\nname = "NOT_SET_HERE"\nfetch = "first-use"\n'
    )
    env = {"KEYGATE_AGENT_TOKEN": new_token(), "ENV_ONE": env_key, **moto.env()}
    result = run_keygate(keygate_bin, ["check", "--fetch", "--json", "--config", str(cfg)], tmp_path, env=env)
    assert result.returncode == 1, result.stderr  # `missing` cannot be fetched
    report = {s["name"]: s for s in json.loads(result.stdout)["fetch"]}
    assert report["aws_sm"]["key_id"] == f"aws_sm#{created['VersionId']}"
    assert report["aws_sm"]["last_fetch"] and report["aws_sm"]["error"] is None
    assert report["env_one"]["key_id"].startswith("env_one#") and report["env_one"]["error"] is None
    assert "NOT_SET_HERE" in report["missing"]["error"] and report["missing"]["key_id"] is None
    output = result.stdout + result.stderr
    for value in (api_key, env_key, moto.secret_access_key):
        assert value not in output


def test_check_fetch_exits_0_when_every_secret_is_fetched(moto, keygate_bin, tmp_path, fake_upstream):
    moto.client("secretsmanager").create_secret(Name="openai", SecretString=json.dumps({"api_key": fake_secret("sk-proj-ok")}))
    cfg = tmp_path / "ok.toml"
    cfg.write_text(sm_config(moto, fake_upstream.url, secret_id="openai"))
    result = run_keygate(keygate_bin, ["check", "--fetch", "--config", str(cfg)], tmp_path, env={"KEYGATE_AGENT_TOKEN": new_token(), **moto.env()})
    assert result.returncode == 0, result.stdout + result.stderr


def test_sigv4_route_request_signed_by_keygate_is_accepted_by_moto(keygate, moto):
    moto.client("secretsmanager").create_secret(Name="listed-by-agent", SecretString="value-not-read-here")
    token = new_token()
    kg = keygate(sigv4_config(moto.url, "secretsmanager", '"POST /"'), env={"KEYGATE_AGENT_TOKEN": token, **moto.env()})
    agent_headers = {
        "X-Broker-Token": token,
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "secretsmanager.ListSecrets",
        # An agent's own signature attempt: dropped, or moto would refuse the mix.
        "X-Amz-Date": "19990101T000000Z",
        "X-Amz-Security-Token": "agent-made-up-token",
    }
    agent_headers["Authorization"] = " ".join(
        ["AWS4-HMAC-SHA256", "Credential=AKIDAGENT/20260101/us-east-1/secretsmanager/aws4_request,", "SignedHeaders=host;x-amz-date,", "Signature=" + "0" * 64]
    )
    with kg.client() as c:
        r = c.post("/aws/", content=b"{}", headers=agent_headers)
    assert r.status_code == 200, r.text
    assert [s["Name"] for s in r.json()["SecretList"]] == ["listed-by-agent"]
    record = kg.audit_record(r.headers["x-request-id"])
    assert record["key_id"].startswith("aws#ak-") and record["status"] == 200


def test_sigv4_route_with_keys_moto_does_not_know_gets_moto_403(keygate, moto):
    token = new_token()
    wrong = {**moto.env(), "AWS_SECRET_ACCESS_KEY": "wrong" + moto.secret_access_key[5:]}
    kg = keygate(sigv4_config(moto.url, "secretsmanager", '"POST /"'), env={"KEYGATE_AGENT_TOKEN": token, **wrong})
    with kg.client() as c:
        r = c.post("/aws/", content=b"{}", headers={"X-Broker-Token": token, "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "secretsmanager.ListSecrets"})
    assert r.status_code == 403, r.text


def test_sigv4_s3_streamed_upload_is_signed_unsigned_payload_and_reads_back(keygate, moto):
    moto.client("s3").create_bucket(Bucket="kg-bucket")
    token = new_token()
    kg = keygate(
        sigv4_config(moto.url, "s3", '"PUT /kg-bucket/*", "GET /kg-bucket/*"', extra='request_scan = "off"\n'),
        env={"KEYGATE_AGENT_TOKEN": token, **moto.env()},
    )
    data = os.urandom(96 * 1024).hex().encode()  # 192 KiB (under max_request_bytes), in chunks

    def chunks():
        for i in range(0, len(data), 16 * 1024):
            yield data[i : i + 16 * 1024]

    with kg.client() as c:
        put = c.put("/aws/kg-bucket/blob.txt", content=chunks(), headers={"X-Broker-Token": token})
        assert put.status_code == 200, put.text
        got = c.get("/aws/kg-bucket/blob.txt", headers={"X-Broker-Token": token})
    assert got.status_code == 200, got.text
    assert got.content == data
    # Read through moto directly too: the object is what the agent sent.
    assert moto.client("s3").get_object(Bucket="kg-bucket", Key="blob.txt")["Body"].read() == data


def test_sigv4_s3_streamed_body_goes_unsigned_payload_and_a_whole_one_by_hash(keygate, fake_upstream):
    token = new_token()
    env = {"KEYGATE_AGENT_TOKEN": token, "AWS_ACCESS_KEY_ID": "AKIA" + "KEYGATESTREAM000", "AWS_SECRET_ACCESS_KEY": "s" * 40}
    streamed = keygate(sigv4_config(fake_upstream.url, "s3", '"PUT /b/*"', extra='request_scan = "off"\n'), env=env)
    whole = keygate(sigv4_config(fake_upstream.url, "s3", '"PUT /b/*"'), env=env)
    for kg, want in ((streamed, "UNSIGNED-PAYLOAD"), (whole, hashlib.sha256(b"abc" * 1000).hexdigest())):
        with kg.client() as c:
            r = c.put("/aws/b/k", content=iter([b"abc" * 500, b"abc" * 500]), headers={"X-Broker-Token": token})
        assert r.status_code == 200, r.text
        sent = fake_upstream.requests[-1]
        assert sent.body == b"abc" * 1000
        assert sent.header("x-amz-content-sha256") == want
        assert "x-amz-content-sha256" in sent.header("authorization")
    # S3 refuses a chunked upload (411 MissingContentLength): a streamed body the agent gave a
    # length keeps it on the way out.
    with streamed.client() as c:
        r = c.put("/aws/b/k", content=b"xyz" * 1000, headers={"X-Broker-Token": token})
    assert r.status_code == 200, r.text
    sent = fake_upstream.requests[-1]
    assert (sent.header("content-length"), sent.header("transfer-encoding")) == ("3000", None)
    assert sent.header("x-amz-content-sha256") == "UNSIGNED-PAYLOAD" and sent.body == b"xyz" * 1000
