"""`keygate check` accepts every shipped example without fetching or printing a secret, and points
at the file, line and key of a mistake with exit 2."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from conftest import EXAMPLES, LAB_EXAMPLES, fake_secret, new_token, run_keygate

SECRETS = {
    "OPENAI_API_KEY": fake_secret("sk-proj-check"),
    "ANTHROPIC_API_KEY": fake_secret("sk-ant-api03-check"),
    "BROKER_CLIENT_TOKEN": fake_secret("lab-client-"),
    "BAO_TOKEN": fake_secret("hvs.check"),
    "KEYGATE_AGENT_TOKEN": new_token(),
    "FAKE_OP_SECRET": fake_secret("sk-proj-fromOp"),
    "FAKE_AZ_SECRET": fake_secret("sk-proj-fromAz"),
}

EXAMPLE_FILES = sorted(LAB_EXAMPLES.glob("*.json")) + sorted(EXAMPLES.glob("*.toml"))


def test_every_example_is_covered():
    names = {p.name for p in EXAMPLE_FILES}
    assert {"keygate.toml", "dry-run.toml", "broker_config.dry-run.json"} <= names
    assert len(EXAMPLE_FILES) == 6


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_check_accepts_the_example_without_fetching_or_printing_secrets(keygate_bin, tmp_path, path):
    log = tmp_path / "secret-calls.log"
    result = run_keygate(keygate_bin, ["check", "--config", str(path)], tmp_path, env={**SECRETS, "FAKE_SECRET_LOG": str(log)})

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "check printed no effective policy"
    output = result.stdout + result.stderr
    leaked = [name for name, value in SECRETS.items() if value in output]
    assert leaked == [], f"check printed the values of {leaked}"
    assert not log.exists(), f"check ran a secret command: {log.read_text()}"


def test_check_json_output_is_machine_readable(keygate_bin, tmp_path):
    result = run_keygate(keygate_bin, ["check", "--json", "--config", str(EXAMPLES / "keygate.toml")], tmp_path, env=SECRETS)
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_points_at(result, path, line: int, key: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    pattern = rf"{re.escape(str(path))}:{line}: (?:[\w.\-\[\]\"]*\.)?{re.escape(key)}\b"
    assert re.search(pattern, result.stderr), f"expected `{path}:{line}: {key}: ...` in stderr:\n{result.stderr}"


def test_check_names_file_line_and_unknown_key_in_json(keygate_bin, tmp_path):
    path = write(
        tmp_path,
        "typo.json",
        '{\n  "listen_host": "127.0.0.1",\n  "listen_prot": 8791,\n  "mode": "dry_run",\n'
        '  "upstream_base_url": "https://api.openai.example",\n  "allowed_paths": ["/v1/chat/completions"],\n'
        '  "secret_source": {"kind": "none"}\n}\n',
    )
    result = run_keygate(keygate_bin, ["check", "--config", str(path)], tmp_path)
    assert_points_at(result, path, 3, "listen_prot")


def test_check_names_file_line_and_bad_value_in_json(keygate_bin, tmp_path):
    path = write(
        tmp_path,
        "badmode.json",
        '{\n  "listen_host": "127.0.0.1",\n  "listen_port": 8791,\n  "mode": "yolo",\n'
        '  "upstream_base_url": "https://api.openai.example",\n  "allowed_paths": ["/v1/chat/completions"],\n'
        '  "secret_source": {"kind": "none"}\n}\n',
    )
    result = run_keygate(keygate_bin, ["check", "--config", str(path)], tmp_path)
    assert_points_at(result, path, 4, "mode")


def test_check_names_file_line_and_unknown_key_in_toml(keygate_bin, tmp_path):
    text = (EXAMPLES / "dry-run.toml").read_text().replace('prefix = "/anthropic"', 'prefx = "/anthropic"')
    path = write(tmp_path, "typo.toml", text)
    line = text.splitlines().index('prefx = "/anthropic"') + 1
    result = run_keygate(keygate_bin, ["check", "--config", str(path)], tmp_path)
    assert_points_at(result, path, line, "prefx")


def test_check_refuses_a_route_naming_an_undefined_secret(keygate_bin, tmp_path):
    text = (EXAMPLES / "dry-run.toml").read_text().replace('secret = "anthropic"', 'secret = "anthropc"')
    path = write(tmp_path, "dangling.toml", text)
    result = run_keygate(keygate_bin, ["check", "--config", str(path)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and "anthropc" in result.stderr


AWS_CREDENTIALS_CONFIG = """\
[secrets.aws]
source = "aws-credentials"
{profile}
[routes.s3]
prefix = "/s3"
upstream = "https://s3.amazonaws.com"
secret = "aws"
inject = "aws-sigv4"
region = "us-east-1"
service = "s3"
"""


def aws_key_id(access_key_id: str) -> str:
    return "aws#ak-" + hashlib.sha256(access_key_id.encode()).hexdigest()[:8]


def test_check_fetch_reads_aws_keys_of_a_named_profile_from_the_shared_files(keygate_bin, tmp_path):
    akid = "".join(["AKIA", "PROFILEKEYGATE00"])
    secret_key = fake_secret("profileSecret")
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_access_key_id = AKIDOTHER\naws_secret_access_key = other-other-other\n")
    (home / ".aws" / "config").write_text(f"[profile keygate]\nregion = us-east-1\naws_access_key_id = {akid}\naws_secret_access_key = {secret_key}\n")
    path = write(tmp_path, "aws.toml", AWS_CREDENTIALS_CONFIG.format(profile='profile = "keygate"'))
    # The environment's keys are not used when config names a profile.
    env = {"AWS_ACCESS_KEY_ID": "AKIDFROMENV", "AWS_SECRET_ACCESS_KEY": "from-env-from-env"}
    result = run_keygate(keygate_bin, ["check", "--fetch", "--json", "--config", str(path)], tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (aws,) = json.loads(result.stdout)["fetch"]
    assert aws["key_id"] == aws_key_id(akid) and aws["error"] is None
    assert secret_key not in result.stdout + result.stderr

    missing = write(tmp_path, "aws-missing.toml", AWS_CREDENTIALS_CONFIG.format(profile='profile = "nope"'))
    result = run_keygate(keygate_bin, ["check", "--fetch", "--json", "--config", str(missing)], tmp_path, env=env)
    assert result.returncode == 1
    (aws,) = json.loads(result.stdout)["fetch"]
    assert "profile nope" in aws["error"] and aws["key_id"] is None


def test_check_fetch_reads_temporary_aws_keys_and_their_expiry_from_the_container_endpoint(keygate_bin, tmp_path, fake_upstream):
    akid = "".join(["ASIA", "CONTAINERKEYGATE"])
    secret_key = fake_secret("containerSecret")
    auth = fake_secret("containerAuth")
    fake_upstream.raw_body = json.dumps(
        {"AccessKeyId": akid, "SecretAccessKey": secret_key, "Token": fake_secret("containerToken"), "Expiration": "2030-01-02T03:04:05Z"}
    ).encode()
    path = write(tmp_path, "aws.toml", AWS_CREDENTIALS_CONFIG.format(profile=""))
    env = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{fake_upstream.url}/creds", "AWS_CONTAINER_AUTHORIZATION_TOKEN": auth}
    result = run_keygate(keygate_bin, ["check", "--fetch", "--json", "--config", str(path)], tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (aws,) = json.loads(result.stdout)["fetch"]
    assert aws["key_id"] == aws_key_id(akid)
    assert aws["expires"] == "2030-01-02T03:04:05Z"
    assert fake_upstream.requests[-1].header("authorization") == auth
    assert secret_key not in result.stdout + result.stderr and auth not in result.stdout + result.stderr
