"""The OS keychain: the `keychain` source and the `command` source with `secret-tool lookup`, both
against a real Secret Service (gnome-keyring-daemon on its own D-Bus session bus), with keygate
passing only `DBUS_*` (and its base set) to the tool."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import DEADLINE, fake_secret, native_config, new_token, poll

NEEDED = ("dbus-daemon", "gnome-keyring-daemon", "secret-tool")


@pytest.fixture
def secret_service(tmp_path):
    """A session bus and an unlocked gnome-keyring on it; yields the bus address. Both processes
    are stopped at the end, also when the test fails."""
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing under CI: {missing} (scripts/test installs them)")
        pytest.skip(f"not installed: {missing} (scripts/test installs gnome-keyring and libsecret-tools)")
    home = tmp_path / "kc-home"
    home.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_RUNTIME_DIR": str(home)}
    addr_file = home / "bus-address"
    procs: list[subprocess.Popen] = []
    try:
        with open(addr_file, "wb") as out:
            procs.append(
                subprocess.Popen(
                    ["dbus-daemon", "--session", "--nofork", "--print-address=1", f"--address=unix:path={home}/bus"],
                    stdout=out,
                    stderr=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            )
        address = poll(lambda: addr_file.read_text().strip() or None, "the session bus address")
        env["DBUS_SESSION_BUS_ADDRESS"] = address
        keyring = subprocess.Popen(
            ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        procs.append(keyring)
        assert keyring.stdin is not None
        keyring.stdin.write(b"test-keyring-password")
        keyring.stdin.close()

        # Answering on the bus is not enough: the login collection that `store` writes to is
        # created a moment later, so wait until a stored probe item reads back.
        def round_trip_works():
            try:
                stored = subprocess.run(
                    ["secret-tool", "store", "--label", "keygate probe", "service", "keygate-probe"],
                    input=b"probe",
                    env=env,
                    capture_output=True,
                    timeout=DEADLINE,
                )
                if stored.returncode != 0:
                    return False
                found = subprocess.run(
                    ["secret-tool", "lookup", "service", "keygate-probe"], env=env, capture_output=True, timeout=DEADLINE
                )
            except subprocess.TimeoutExpired:
                return False
            return found.returncode == 0 and found.stdout == b"probe"

        poll(round_trip_works, "a store and lookup through the Secret Service")
        yield env
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=DEADLINE)


def store(env: dict, account: str, value: str):
    subprocess.run(
        ["secret-tool", "store", "--label", f"keygate {account}", "service", "keygate", "account", account],
        input=value.encode(),
        env=env,
        check=True,
        timeout=DEADLINE,
    )


def keychain_config(upstream: str, account: str, *, as_command: bool = False) -> str:
    config = native_config(upstream, agent_routes=("openai",))
    if as_command:
        source = f'source = "command"\nargv = ["secret-tool", "lookup", "service", "keygate", "account", "{account}"]\n'
    else:
        source = f'source = "keychain"\nservice = "keygate"\naccount = "{account}"\n'
    return config.replace('[secrets.openai]\nsource = "env"\nname = "OPENAI_API_KEY"\n', f"[secrets.openai]\n{source}")


@pytest.mark.parametrize("as_command", [False, True], ids=["keychain-source", "command-secret-tool"])
def test_keychain_entry_is_attached_and_redacted(keygate, fake_upstream, secret_service, as_command):
    value = fake_secret("sk-proj-keychain")
    store(secret_service, "openai", value)
    token = new_token()
    fake_upstream.echo_key = True
    kg = keygate(
        keychain_config(fake_upstream.url, "openai", as_command=as_command),
        env={"KEYGATE_AGENT_TOKEN": token, "ANTHROPIC_API_KEY": fake_secret("sk-ant-unused"), "DBUS_SESSION_BUS_ADDRESS": secret_service["DBUS_SESSION_BUS_ADDRESS"]},
    )
    with kg.client() as c:
        r = c.post("/openai/v1/chat/completions", json={"model": "gpt-fake"}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert fake_upstream.echoed == [value]
    assert value not in r.text and value not in kg.stderr_text()


def test_keychain_entry_that_is_missing_stops_start_up_naming_the_command(keygate, fake_upstream, secret_service):
    store(secret_service, "openai", fake_secret("sk-proj-keychain"))
    kg = keygate(
        keychain_config(fake_upstream.url, "no-such-account"),
        env={"KEYGATE_AGENT_TOKEN": new_token(), "ANTHROPIC_API_KEY": fake_secret("sk-ant-unused"), "DBUS_SESSION_BUS_ADDRESS": secret_service["DBUS_SESSION_BUS_ADDRESS"]},
        wait=False,
    )
    assert kg.proc.wait(timeout=DEADLINE) == 2
    assert "`secret-tool lookup`" in kg.stderr_text(), kg.stderr_text()
