"""README.md's runnable blocks run as written (the convention is written down at the top of the
README): every fenced block whose info string is `sh`, `bash` or `python` is executed, in order,
in a scratch HOME, from a directory holding a copy of examples/, with the built `keygate` first on
PATH and port 8791 replaced by a free one in the blocks and that copy (so parallel runs do not
collide). Each block has a
deadline; everything a block starts (keygate in the background) is in the block's process group
and killed when the block ends, also when it failed. A failure names the block's line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

from conftest import EXAMPLES, REPO, new_token

RUNNABLE = {"sh", "bash", "python"}
BLOCK_DEADLINE = 30.0
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    info: str
    text: str


def blocks(markdown: str) -> list[Block]:
    found, open_at, info, body = [], None, "", []
    for n, line in enumerate(markdown.split("\n"), start=1):
        m = FENCE.match(line)
        if open_at is None and m:
            open_at, info, body = n, m.group(1), []
        elif open_at is not None and line.strip() == "```":
            found.append(Block(open_at, info, "\n".join(body) + "\n"))
            open_at = None
        elif open_at is not None:
            body.append(line)
    assert open_at is None, f"README.md:{open_at}: a ``` block is never closed"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_block(block: Block, env: dict[str, str], cwd, logs, port: int) -> subprocess.CompletedProcess | str:
    text = block.text.replace("8791", str(port))
    argv = [sys.executable, "-c", text] if block.info == "python" else ["bash", "-e", "-o", "pipefail", "-c", text]
    # Output goes to files, not pipes: a background process the block leaves running would hold
    # a pipe open and hide the block's own end.
    out_path, err_path = logs / f"block-{block.line}.out", logs / f"block-{block.line}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True,
            env=env, cwd=cwd, start_new_session=True,
        )
    try:
        proc.wait(timeout=BLOCK_DEADLINE)
        return subprocess.CompletedProcess(argv, proc.returncode, out_path.read_text(), err_path.read_text())
    except subprocess.TimeoutExpired:
        return f"did not finish within {BLOCK_DEADLINE}s\nstdout:\n{out_path.read_text()}\nstderr:\n{err_path.read_text()}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def test_readme_blocks_are_parsed_with_their_lines():
    parsed = blocks("text\n```sh\necho hi\n```\n\n```toml\nx = 1\n```\n")
    assert [(b.line, b.info, b.text) for b in parsed] == [(2, "sh", "echo hi\n"), (6, "toml", "x = 1\n")]


def test_every_runnable_readme_block_runs_as_written(keygate_bin, tmp_path):
    runnable = [b for b in blocks((REPO / "README.md").read_text()) if b.info in RUNNABLE]
    assert len(runnable) >= 3, "the README lost its runnable quick start"
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    shutil.copytree(EXAMPLES, work / "examples")
    port = free_port()
    for config in (work / "examples").rglob("*.*"):
        if config.suffix in (".toml", ".json"):
            config.write_text(config.read_text().replace("8791", str(port)))
    env = {
        "HOME": str(home),
        "PATH": f"{keygate_bin.parent}:{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "LANG": "C.UTF-8",
        "NO_PROXY": "*",
        # The variable the README's `console` block tells the reader to export for the agent.
        "KEYGATE_TOKEN_CODER": new_token(),
    }
    for block in runnable:
        result = run_block(block, env, work, tmp_path, port)
        if isinstance(result, str):
            raise AssertionError(f"README.md:{block.line}: {block.info} block {result}")
        assert result.returncode == 0, (
            f"README.md:{block.line}: {block.info} block exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
