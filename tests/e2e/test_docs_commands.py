"""Every ```bash runnable``` block of README.md and docs/*.md runs and exits 0.

Each block runs with ``bash -e`` in a fresh temporary folder, with the checkout's ``.venv/bin``
first on PATH and ``FERRY_REPO`` set to the checkout, within 120 s. A block that starts a server
must stop it itself; whatever is left in the block's process group afterwards is killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
OPEN = re.compile(r"^(\s*)(`{3,}|~{3,})\s*bash\s+runnable\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # line of the opening fence, 1-based
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def runnable_blocks(path: Path) -> list[Block]:
    """The ```bash runnable``` fenced blocks of one Markdown file."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = OPEN.match(lines[i])
        if not match:
            i += 1
            continue
        fence, start = match.group(2), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{path}:{start + 1}: runnable block is never closed"
        blocks.append(Block(path, start + 1, "\n".join(body) + "\n"))
        i += 1
    return blocks


BLOCKS = [block for path in doc_files() if path.exists() for block in runnable_blocks(path)]


def test_the_docs_have_runnable_blocks() -> None:
    assert len(BLOCKS) >= 3, "expected runnable blocks in README.md / docs/*.md; found " + str(BLOCKS)
    assert any("ferry" in block.code for block in BLOCKS)


def _bin_dir() -> Path:
    venv = ROOT / ".venv" / "bin"
    return venv if venv.is_dir() else Path(sys.executable).parent


def _report(block: Block, what: str, output: str) -> str:
    return f"{block.where}: {what}\n--- block ---\n{block.code}--- output ---\n{output}"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_runnable_block(block: Block, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{_bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}",
        "FERRY_REPO": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        ["bash", "-e", "-c", block.code],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(_report(block, f"still running after {TIMEOUT_S} s", output))
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything the block left behind
    assert proc.returncode == 0, _report(block, f"exit {proc.returncode}", output)
