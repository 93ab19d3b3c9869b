"""`keygate init` and `keygate scan` on a sandbox HOME: keys found in the environment and a
project's `.env` move into 0600 secret files behind a config that serves (the official openai
SDK works through it), the `.env` keeps every other byte, and no key is ever printed; `scan`
finds planted keys with line numbers, never shows a value, and leaves a benign corpus alone."""

from __future__ import annotations

import json
import os
import pty
import stat
import subprocess
from pathlib import Path

import httpx
import openai

from conftest import DEADLINE, base_env, fake_secret, run_keygate

PROVIDER_HOSTS = ("https://api.openai.com", "https://api.anthropic.com", "https://api.mistral.ai")


def project_with_dotenv(tmp_path: Path, body: str) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / ".env").write_text(body)
    return proj


def config_dir(tmp_path: Path) -> Path:
    return tmp_path / "home" / ".config" / "keygate"


def assert_never_shown(keys, *texts: str) -> None:
    for k in keys:
        for t in texts:
            assert k not in t, "a key was printed"


def init(keygate_bin, tmp_path, proj, *args, env=None):
    out = run_keygate(keygate_bin, ["init", "--dir", str(proj), "--listen", "127.0.0.1:0", *args], tmp_path, env=env)
    return out


def test_init_yes_moves_env_and_dotenv_keys_into_a_config_the_openai_sdk_works_through(
    keygate, keygate_bin, fake_upstream, tmp_path, short_tmp
):
    openai_key = fake_secret("sk-proj-init")
    anthropic_key = fake_secret("sk-ant-api03-init")
    mistral_key = fake_secret("Mi5")  # Mistral keys have no prefix: found by variable name
    before = f"# app settings\r\nDEBUG=1\nOPENAI_API_KEY={openai_key}\nexport MISTRAL_API_KEY=\"{mistral_key}\"\nREGION=eu # keep\n"
    proj = project_with_dotenv(tmp_path, before)
    env = {"ANTHROPIC_API_KEY": anthropic_key, "XDG_STATE_HOME": str(short_tmp)}

    out = init(keygate_bin, tmp_path, proj, "--yes", env=env)

    assert out.returncode == 0, out.stderr
    keys = (openai_key, anthropic_key, mistral_key)
    assert_never_shown(keys, out.stdout, out.stderr)
    assert "OPENAI_BASE_URL=http://127.0.0.1:0/openai/v1" in out.stdout
    assert "keygate run --config" in out.stdout and "token issue" in out.stdout
    after = (proj / ".env").read_bytes().decode()
    assert_never_shown(keys, after)
    kept = [line for line in before.splitlines(keepends=True) if "_API_KEY" not in line]
    assert [line for line in after.splitlines(keepends=True) if "_API_KEY" not in line] == kept
    assert not list(proj.glob(".env*backup*")), "no backup holding the keys unless asked for"
    secrets = config_dir(tmp_path) / "secrets"
    for name, key in (("openai", openai_key), ("anthropic", anthropic_key), ("mistral", mistral_key)):
        path = secrets / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() == key
    config = config_dir(tmp_path) / "keygate.toml"
    checked = run_keygate(keygate_bin, ["check", "--fetch", "--config", str(config)], tmp_path, env=env)
    assert checked.returncode == 0, checked.stderr
    assert_never_shown(keys, checked.stdout, checked.stderr)

    text = config.read_text()
    for host in PROVIDER_HOSTS:
        assert host in text
        text = text.replace(host, fake_upstream.url)
    # Issued before serve starts, from the same state_dir (a running keygate would take up to a
    # second to see it).
    issued = run_keygate(keygate_bin, ["token", "issue", "--agent", "coder", "--config", str(config)], tmp_path, env=env)
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    kg = keygate(text, env=env)

    client = openai.OpenAI(base_url=f"{kg.url}/openai/v1", api_key=token, max_retries=0, timeout=DEADLINE)
    completion = client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content
    with httpx.Client(base_url=kg.url, timeout=DEADLINE, trust_env=False) as c:
        r = c.post("/anthropic/v1/messages", json={"model": "m", "max_tokens": 5, "messages": []}, headers={"x-api-key": token})
    assert r.status_code == 200, r.text
    first, second = fake_upstream.requests
    assert first.header_values("authorization") == [f"Bearer {openai_key}"]
    assert second.header_values("x-api-key") == [anthropic_key]
    assert second.header("anthropic-version") == "2023-06-01"
    assert_never_shown(keys, kg.stdout_text(), kg.stderr_text())


def test_init_twice_refuses_without_force_and_with_force_keeps_every_key_and_route(keygate_bin, tmp_path):
    openai_key = fake_secret("sk-proj-twice")
    proj = project_with_dotenv(tmp_path, f"OPENAI_API_KEY={openai_key}\n")
    assert init(keygate_bin, tmp_path, proj, "--yes").returncode == 0
    config = config_dir(tmp_path) / "keygate.toml"
    first = config.read_text()

    again = init(keygate_bin, tmp_path, proj, "--yes")
    assert again.returncode == 2 and "--force" in again.stderr
    assert config.read_text() == first

    # A new key appears; --force rewrites the config with the key already held plus the new one.
    anthropic_key = fake_secret("sk-ant-api03-twice")
    forced = init(keygate_bin, tmp_path, proj, "--yes", "--force", env={"ANTHROPIC_API_KEY": anthropic_key})
    assert forced.returncode == 0, forced.stderr
    text = config.read_text()
    assert text.count("[routes.openai]") == 1 and text.count("[routes.anthropic]") == 1
    assert (config_dir(tmp_path) / "secrets" / "openai").read_text().strip() == openai_key
    assert_never_shown((openai_key, anthropic_key), forced.stdout, forced.stderr)
    checked = run_keygate(keygate_bin, ["check", "--fetch", "--config", str(config)], tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_init_without_a_terminal_and_without_yes_writes_nothing(keygate_bin, tmp_path):
    openai_key = fake_secret("sk-proj-notty")
    before = f"OPENAI_API_KEY={openai_key}\n"
    proj = project_with_dotenv(tmp_path, before)

    out = init(keygate_bin, tmp_path, proj)

    assert out.returncode == 2 and "--yes" in out.stderr
    assert (proj / ".env").read_text() == before
    assert not config_dir(tmp_path).exists()
    assert_never_shown((openai_key,), out.stdout, out.stderr)


def test_init_with_a_source_command_keeps_the_dotenv_key_until_the_command_returns_it(keygate_bin, tmp_path):
    openai_key = fake_secret("sk-proj-vault")
    before = f"A=1\nOPENAI_API_KEY={openai_key}\n"
    proj = project_with_dotenv(tmp_path, before)
    vault = tmp_path / "vault"
    vault.mkdir()
    command = f"cat {vault}/{{name}}"

    # The vault does not hold the key yet: nothing may be removed.
    out = init(keygate_bin, tmp_path, proj, "--yes", "--source-command", command)
    assert out.returncode == 1, out.stderr
    assert (proj / ".env").read_text() == before
    assert not (config_dir(tmp_path) / "secrets").exists(), "a command source writes no secret file"
    assert_never_shown((openai_key,), out.stdout, out.stderr)

    (vault / "openai").write_text(openai_key + "\n")
    out = init(keygate_bin, tmp_path, proj, "--yes", "--force", "--source-command", command)
    assert out.returncode == 0, out.stderr
    assert (proj / ".env").read_text().startswith("A=1\n")
    assert openai_key not in (proj / ".env").read_text()
    assert f'argv = ["cat", "{vault}/openai"]' in (config_dir(tmp_path) / "keygate.toml").read_text()


# === scan ===


def scan(keygate_bin, tmp_path, *args, env=None):
    return run_keygate(keygate_bin, ["scan", *args], tmp_path, env=env)


def plant_tree(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    keys = {"openai": fake_secret("sk-proj-Scan"), "groq": fake_secret("gsk_scan"), "mistral": fake_secret("Ms7")}
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "node_modules" / "dep").mkdir(parents=True)
    (tree / "src" / "settings.py").write_text(f"import os\n\nDEBUG = True\nKEY = \"{keys['openai']}\"\n")
    (tree / ".env").write_text(f"# local\nPORT=8080\nMISTRAL_API_KEY={keys['mistral']}\n")
    (tree / "node_modules" / "dep" / "index.js").write_text(f"const k = '{keys['openai']}'\n")
    (tree / "logo.bin").write_bytes(b"\x00\x01" + keys["openai"].encode())
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / ".bash_history").write_text(f"ls\ncd src\nexport GROQ_API_KEY={keys['groq']}\n")
    return tree, keys


def test_scan_finds_planted_keys_in_a_tree_and_in_history_with_line_numbers_and_never_shows_them(keygate_bin, tmp_path):
    tree, keys = plant_tree(tmp_path)

    out = scan(keygate_bin, tmp_path, str(tree))

    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert f"{tree}/src/settings.py:4:8: openai_key (sk-p…)" in lines
    assert f"{tree}/.env:3:17: mistral_key" in lines
    history = tmp_path / "home" / ".bash_history"
    assert f"{history}:3:21: groq_key (gsk_…)" in lines
    assert len(lines) == 3, "node_modules and binaries are skipped"
    assert_never_shown(keys.values(), out.stdout, out.stderr)

    as_json = scan(keygate_bin, tmp_path, str(tree), "--json", "--no-history")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["found"] == 2 and report["errors"] == []
    by_kind = {f["kind"]: f for f in report["findings"]}
    assert by_kind["openai_key"] == {
        "source": "file", "path": f"{tree}/src/settings.py", "variable": None, "line": 4, "column": 8,
        "kind": "openai_key", "hint": "sk-p…", "fixed": None,
    }
    assert by_kind["mistral_key"]["line"] == 3 and by_kind["mistral_key"]["hint"] == ""
    assert_never_shown(keys.values(), as_json.stdout, as_json.stderr)


def test_scan_of_a_benign_corpus_finds_nothing_and_exits_0(keygate_bin, tmp_path):
    tree = tmp_path / "docs"
    tree.mkdir()
    aws_doc_id = "AKIA" + "IOSFODNN7EXAMPLE"
    (tree / "README.md").write_text(
        f"Set `OPENAI_API_KEY=sk-...` first.\naws_access_key_id = {aws_doc_id}\n"
        "export ANTHROPIC_API_KEY=your-key-here\n"
    )
    (tree / "client.py").write_text(
        "api_key = os.environ['OPENAI_API_KEY']\nclient = OpenAI(api_key=api_key)\nheaders = {'x-api-key': api_key}\n"
    )
    (tree / "package-lock.json").write_text(
        json.dumps({"packages": {"node_modules/a": {"integrity": "sha512-" + "Qm9v" * 20 + "==", "resolved": "https://r/a.tgz"}}})
    )
    (tree / ".env.example").write_text("OPENAI_API_KEY=\nMISTRAL_API_KEY=${MISTRAL_API_KEY}\nGITHUB_TOKEN=<token>\n")

    out = scan(keygate_bin, tmp_path, str(tree))

    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == ""


def test_scan_names_a_key_in_the_environment_by_variable_only(keygate_bin, tmp_path):
    key = fake_secret("sk-ant-api03-envscan")
    empty = tmp_path / "empty"
    empty.mkdir()

    out = scan(keygate_bin, tmp_path, str(empty), env={"ANTHROPIC_API_KEY": key})
    clean = scan(keygate_bin, tmp_path, str(empty), "--no-env", env={"ANTHROPIC_API_KEY": key})

    assert out.returncode == 1
    assert out.stdout.splitlines() == ["env:ANTHROPIC_API_KEY: anthropic_key (sk-a…)"]
    assert_never_shown((key,), out.stdout, out.stderr)
    assert clean.returncode == 0 and clean.stdout == ""


def test_scan_finds_a_value_the_config_holds_though_it_has_no_known_shape(keygate_bin, tmp_path):
    held = fake_secret("plainvalue")
    (tmp_path / "held").write_text(held)
    os.chmod(tmp_path / "held", 0o600)
    config = tmp_path / "kg.toml"
    config.write_text(f'[secrets.internal]\nsource = "file"\npath = "{tmp_path}/held"\n')
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "notes.txt").write_text(f"one\nthe value: {held}\n")

    out = scan(keygate_bin, tmp_path, str(tree), "--config", str(config), "--no-env", "--no-history")
    without = scan(keygate_bin, tmp_path, str(tree), "--no-env", "--no-history")

    assert out.returncode == 1
    assert out.stdout.splitlines() == [f"{tree}/notes.txt:2:12: held:internal"]
    assert_never_shown((held,), out.stdout, out.stderr)
    assert without.returncode == 0


def test_scan_of_a_missing_path_exits_2(keygate_bin, tmp_path):
    out = scan(keygate_bin, tmp_path, str(tmp_path / "nope"), "--no-env", "--no-history")
    assert out.returncode == 2 and "nope" in out.stderr


def test_scan_fix_moves_a_dotenv_key_into_a_secret_file_that_init_then_serves(keygate_bin, tmp_path):
    key = fake_secret("sk-proj-fix")
    proj = project_with_dotenv(tmp_path, f"# keep me\r\nA=1\nOPENAI_API_KEY=\"{key}\" # prod\nB=2")

    fixed = scan(keygate_bin, tmp_path, str(proj), "--fix", "--no-env", "--no-history")

    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert_never_shown((key,), fixed.stdout, fixed.stderr)
    assert (proj / ".env").read_bytes().decode() == '# keep me\r\nA=1\nOPENAI_API_KEY="keygate-held:openai" # prod\nB=2'
    secret = config_dir(tmp_path) / "secrets" / "openai"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_text().strip() == key
    again = scan(keygate_bin, tmp_path, str(proj), "--no-env", "--no-history")
    assert again.returncode == 0 and again.stdout == ""

    # The moved key is a held secret `init` picks up: a config whose secret fetches.
    out = init(keygate_bin, tmp_path, proj, "--yes")
    assert out.returncode == 0, out.stderr
    config = config_dir(tmp_path) / "keygate.toml"
    checked = run_keygate(keygate_bin, ["check", "--fetch", "--config", str(config)], tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "[routes.openai]" in config.read_text()


def test_init_asks_on_a_terminal_and_protects_only_the_keys_answered_yes(keygate_bin, tmp_path):
    openai_key = fake_secret("sk-proj-ask")
    anthropic_key = fake_secret("sk-ant-api03-ask")
    proj = project_with_dotenv(tmp_path, f"OPENAI_API_KEY={openai_key}\nANTHROPIC_API_KEY={anthropic_key}\n")
    master, slave = pty.openpty()
    try:
        os.write(master, b"n\n\n")  # no to OpenAI, Enter (yes) to Anthropic
        out = subprocess.run(
            [str(keygate_bin), "init", "--dir", str(proj)],
            stdin=slave, capture_output=True, text=True, env=base_env(tmp_path), cwd=tmp_path,
            timeout=DEADLINE, start_new_session=True,
        )
    finally:
        os.close(slave)
        os.close(master)

    assert out.returncode == 0, out.stderr
    assert out.stderr.count("[Y/n]") == 2
    assert_never_shown((openai_key, anthropic_key), out.stdout, out.stderr)
    text = (config_dir(tmp_path) / "keygate.toml").read_text()
    assert "[routes.anthropic]" in text and "[routes.openai]" not in text
    env_after = (proj / ".env").read_text()
    assert f"OPENAI_API_KEY={openai_key}\n" in env_after and anthropic_key not in env_after


def test_scan_skips_a_shell_history_over_the_file_cap_and_reads_a_small_one(keygate_bin, tmp_path):
    key = fake_secret("gsk_hist")
    home = tmp_path / "home"
    home.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    history = home / ".bash_history"
    # 9 MiB of ordinary commands, then a key: over the 8 MiB cap, so never read whole.
    with history.open("w") as f:
        f.write("ls -la\n" * (9 * 1024 * 1024 // 7))
        f.write(f"export GROQ_API_KEY={key}\n")
    out = scan(keygate_bin, tmp_path, str(empty), "--json", "--no-env")
    report = json.loads(out.stdout)
    assert report["found"] == 0, report
    assert any(s["path"] == str(history) for s in report["skipped"]), report
    # Benign neighbour: the same key in a small history is found.
    history.write_text(f"ls\nexport GROQ_API_KEY={key}\n")
    out = scan(keygate_bin, tmp_path, str(empty), "--json", "--no-env")
    assert json.loads(out.stdout)["found"] == 1, out.stdout
    assert_never_shown([key], out.stdout, out.stderr)
