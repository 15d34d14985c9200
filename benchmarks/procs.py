"""Start and stop the benchmarked servers, and a private redis-server, as child processes.

The tests use these launchers too (``tests.support.procs``; ferry code never imports
tests or benchmarks): each server prints ``FERRY_READY service=... port=N`` once it
serves, and ``ServerProcess.start`` waits for that line so the bench uses the real port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ferry.core.grpcserver import parse_ready_line
from ferry.core.netutil import free_port

REPO = Path(__file__).resolve().parents[1]


class ServerProcess:
    """One server run as a child process; ``pid`` is what the bench samples CPU and RSS of."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.lines: list[str] = []
        self._ready = threading.Event()

    @classmethod
    def ferry(cls, name: str, *args: str) -> ServerProcess:
        """``ferry serve <args>`` with this interpreter, from the repository root."""
        return cls(name, [sys.executable, "-m", "ferry.cli.main", "serve", *args])

    @classmethod
    def module(cls, name: str, module: str, *args: str) -> ServerProcess:
        return cls(name, [sys.executable, "-m", module, *args])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not become ready:\n" + "".join(self.lines[-40:]))
        return self

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            if len(self.lines) < 2000:
                self.lines.append(line)
            ready = parse_ready_line(line)
            if ready and not self._ready.is_set():
                self.port = ready[1]
                self._ready.set()

    def stop(self, timeout: float = 20.0) -> int | None:
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


class RedisServer:
    """A private redis-server on a free loopback port, no persistence; ``extra`` goes on its argv."""

    def __init__(self, port: int | None = None, extra: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start it and return once it answers PING; stopped again if it does not in ``timeout`` s."""
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", *self.extra]
        # its own working directory: a replica's full sync still writes dump.rdb, which must not
        # land in the repository (or wherever the caller runs)
        self._dir = tempfile.TemporaryDirectory(prefix="ferry-redis-")
        self.proc = subprocess.Popen(
            argv, cwd=self._dir.name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
