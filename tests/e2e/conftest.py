"""End-to-end fixtures: the whole stack started through the CLI, on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.support.deps import require_binary
from tests.support.models import export_cnn, publish

FERRY = [sys.executable, "-m", "ferry.cli.main"]


def ferry(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one ``ferry`` command to completion."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*FERRY, *args], capture_output=True, text=True, timeout=timeout, env=env)


@dataclass
class RunningStack:
    proc: subprocess.Popen[str]
    root: Path
    lines: list[str]

    @property
    def state_file(self) -> str:
        return str(self.root / "stack.json")

    def stack_args(self) -> list[str]:
        return ["--state-file", self.state_file]


def stack_flags(root: Path) -> list[str]:
    return [
        "--base-port", "0", "--workers", "2", "--store", str(root / "store"),
        "--log-dir", str(root / "logs"), "--state-file", str(root / "stack.json"),
    ]  # fmt: skip


def wait_for_line(proc: subprocess.Popen[str], lines: list[str], needle: str, timeout: float) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if needle in line:
            return
    raise AssertionError(f"never saw {needle!r}:\n{''.join(lines)}")


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _without_redis_url(env: Mapping[str, str]) -> dict[str, str]:
    """The stack under test starts its own redis-server; a Redis URL in the caller's env must not leak in."""
    return {k: v for k, v in env.items() if k not in ("REDIS_URL", "FERRY_UP_REDIS_URL")}


def start_up(root: Path, *extra: str) -> RunningStack:
    """`ferry up --no-demo` in the background, returned once it says it is serving."""
    proc = subprocess.Popen(
        [*FERRY, "up", "--no-demo", *stack_flags(root), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**_without_redis_url(os.environ), "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        wait_for_line(proc, lines, "ferry up: serving", timeout=120)
    except BaseException:
        proc.kill()
        raise
    return RunningStack(proc, root, lines)


@contextlib.contextmanager
def running_stack(root: Path, *extra: str) -> Iterator[RunningStack]:
    """`ferry up --no-demo` with a small CNN in the store, stopped on the way out."""
    require_binary("redis-server")
    onnx = export_cnn(root / "cnn.onnx", channels=1, size=8, classes=10)
    publish(root / "store", "cnn", 1, onnx)
    running = start_up(root, *extra)
    try:
        yield running
    finally:
        if running.proc.poll() is None:
            running.proc.terminate()
            running.proc.wait(60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """One stack shared by the tests that only read from it; a test that breaks one starts its own."""
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running
