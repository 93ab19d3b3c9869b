"""`keygate service install --user` writes a hardened systemd user unit that systemd accepts and
`uninstall` removes; `--print` writes nothing; completions and the man page come out usable."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DEADLINE, base_env, native_config, run_keygate

HARDENING = [
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=read-only",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    "LockPersonality=yes",
    "MemoryDenyWriteExecute=yes",
    "SystemCallFilter=@system-service",
    "UMask=0077",
    "ExecReload=/bin/kill -HUP $MAINPID",
]


def sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A config whose state and audit log live in the sandbox HOME (not under /tmp's own
    subtree rules), and an environment whose XDG dirs are the sandbox's."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    state = home / ".local/state/keygate"
    config = home / "keygate.toml"
    config.write_text(
        f'state_dir = "{state}"\naudit_log = "{state}/audit.jsonl"\n'
        + native_config("http://127.0.0.1:9")
    )
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_RUNTIME_DIR": str(runtime),
        # No session bus: systemctl --user cannot reach a manager, so nothing is started.
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={runtime}/no-bus",
    }
    return config, env


def unit_path(tmp_path: Path) -> Path:
    return tmp_path / "home/.config/systemd/user/keygate.service"


def test_service_install_writes_a_hardened_unit_that_systemd_accepts_and_uninstall_removes_it(keygate_bin, tmp_path):
    config, env = sandbox(tmp_path)

    result = run_keygate(keygate_bin, ["service", "install", "--user", "--no-start", "--config", str(config)], tmp_path, env=env)

    assert result.returncode == 0, result.stderr
    unit = unit_path(tmp_path)
    text = unit.read_text()
    for line in HARDENING:
        assert line in text.splitlines(), f"{line!r} missing from the unit:\n{text}"
    assert f"ExecStart={Path(keygate_bin).resolve()} serve --config {config}" in text
    state = tmp_path / "home/.local/state/keygate"
    assert f"ReadWritePaths={state}" in text.splitlines()
    # A private /tmp would hide state and sockets that live under /tmp (as this test's do).
    if str(state).startswith("/tmp/"):
        assert "PrivateTmp=yes" not in text and "# no PrivateTmp" in text
    else:
        assert "PrivateTmp=yes" in text.splitlines()
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
    assert "systemctl --user enable --now keygate.service" in result.stdout
    # The service gets no shell environment: it is told where the env secrets' variables go.
    assert "OPENAI_API_KEY" in result.stderr and "service.env" in result.stderr

    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        verify = subprocess.run(
            [analyze, "--user", "verify", str(unit)],
            capture_output=True, text=True, timeout=DEADLINE, env=base_env(tmp_path, env), stdin=subprocess.DEVNULL,
        )
        # verify exits 0 even for an unknown key or a bad value; it names them on stderr.
        assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr

    gone = run_keygate(keygate_bin, ["service", "uninstall", "--user", "--no-start"], tmp_path, env=env)
    assert gone.returncode == 0, gone.stderr
    assert not unit.exists()
    again = run_keygate(keygate_bin, ["service", "uninstall", "--user", "--no-start"], tmp_path, env=env)
    assert again.returncode == 0 and "not installed" in again.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_rejects_a_broken_unit_so_the_verify_above_can_fail(tmp_path):
    config, env = sandbox(tmp_path)
    unit = tmp_path / "broken.service"
    unit.write_text("[Service]\nExecStart=/bin/true\nProtectSystem=sometimes\n")
    verify = subprocess.run(
        ["systemd-analyze", "--user", "verify", str(unit)],
        capture_output=True, text=True, timeout=DEADLINE, env=base_env(tmp_path, env), stdin=subprocess.DEVNULL,
    )
    assert "protect system" in verify.stderr.lower() or verify.returncode != 0


def test_service_install_print_shows_the_unit_and_writes_nothing(keygate_bin, tmp_path):
    config, env = sandbox(tmp_path)

    result = run_keygate(keygate_bin, ["service", "install", "--user", "--print", "--config", str(config)], tmp_path, env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Written by `keygate service install`")
    assert "ProtectSystem=strict" in result.stdout
    assert not unit_path(tmp_path).exists()
    assert not (tmp_path / "home/.local/state/keygate").exists()


def test_service_install_refuses_a_bad_config_with_exit_2(keygate_bin, tmp_path):
    _, env = sandbox(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('mode = "sideways"\n')

    result = run_keygate(keygate_bin, ["service", "install", "--user", "--config", str(bad)], tmp_path, env=env)

    assert result.returncode == 2
    assert f"{bad}:1" in result.stderr
    assert not unit_path(tmp_path).exists()


def test_bash_completion_script_parses_and_completes_subcommands(keygate_bin, tmp_path):
    result = run_keygate(keygate_bin, ["completions", "bash"], tmp_path)
    assert result.returncode == 0, result.stderr
    script = tmp_path / "keygate.bash"
    script.write_text(result.stdout)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=DEADLINE)
    assert check.returncode == 0, check.stderr
    assert "doctor" in result.stdout and "service" in result.stdout


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_completions_name_the_subcommands(keygate_bin, tmp_path, shell):
    result = run_keygate(keygate_bin, ["completions", shell], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "doctor" in result.stdout and "keygate" in result.stdout


def test_completions_for_an_unknown_shell_is_a_usage_error(keygate_bin, tmp_path):
    result = run_keygate(keygate_bin, ["completions", "tcsh"], tmp_path)
    assert result.returncode == 2


def test_man_page_is_roff(keygate_bin, tmp_path):
    result = run_keygate(keygate_bin, ["man"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(".ie") or ".TH keygate" in result.stdout
    assert "doctor" in result.stdout
