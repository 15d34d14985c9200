"""Start and stop real Ferry service processes and a private redis-server for tests.

Services print one ``FERRY_READY service=... port=N`` line on stdout once they
serve; ``ServiceProcess.start`` (the benchmarks' launcher) waits for it, so tests use
the port the service really bound (``--port 0``) and can run in parallel.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks.procs import REPO as REPO
from benchmarks.procs import ServerProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess(ServerProcess):
    """A service run as ``python -m ferry.cli.main serve ...`` (or any argv) in a child process.

    The launcher itself is the benchmark's (``benchmarks.procs``); tests add the shortcuts below.
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        super().__init__(" ".join(argv[-6:]), argv, env)

    @classmethod
    def serve(cls, service: str, *args: str, env: dict[str, str] | None = None) -> ServiceProcess:
        return cls([sys.executable, "-m", "ferry.cli.main", "serve", service, *args], env=env)

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc
        return self.proc.wait(timeout)

    def output(self) -> str:
        return "".join(self.lines)


class RedisServer:
    """A private redis-server on a free loopback port, no persistence."""

    def __init__(self, port: int | None = None, extra: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory",
                "64mb",
                "--maxmemory-policy",
                "allkeys-lru",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
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
