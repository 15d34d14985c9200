"""Start and stop real Ferry service processes and a private redis-server for tests.

``SentinelSet`` adds a Sentinel-watched master and replica for the failover tests.

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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from benchmarks import procs as bench_procs
from benchmarks.procs import REPO as REPO
from benchmarks.procs import ServerProcess
from ferry.core.netutil import free_port as free_port


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


@contextlib.contextmanager
def on_store(service: str, store_root: Path, *args: str) -> Iterator[ServiceProcess]:
    """A trainer or exporter serving ``store_root`` on a free port, stopped on the way out."""
    proc = ServiceProcess.serve(service, "--store", str(store_root), "--port", "0", *args).start()
    try:
        yield proc
    finally:
        proc.stop()


class RedisServer(bench_procs.RedisServer):
    """The benchmarks' private redis-server, capped at 64 MiB with LRU eviction (before ``extra``)."""

    def __init__(self, port: int | None = None, extra: Sequence[str] = ()) -> None:
        super().__init__(port, ["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru", *extra])


def redis_command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One command to a loopback redis-server or sentinel, its raw RESP reply (no client library)."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(payload.encode())
        return s.recv(65536)


class SentinelSet:
    """A master, one replica and ``count`` sentinels watching them, all on free loopback ports.

    ``start`` returns once the replica has synced and every sentinel knows the replica and
    the other sentinels, so a failover can start as soon as the master dies. ``url`` is the
    ``redis+sentinel://`` URL the gateway takes.
    """

    def __init__(self, folder: Path, master_name: str = "ferry", count: int = 3, down_after_ms: int = 1000):
        self.folder = folder
        self.name = master_name
        self.down_after_ms = down_after_ms
        self.master = RedisServer()
        self.replica = RedisServer(extra=["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinel_ports = [free_port() for _ in range(count)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.name}/0"

    def start(self, timeout: float = 30.0) -> SentinelSet:
        deadline = time.monotonic() + timeout
        try:
            self.master.start()
            self.replica.start()
            self._wait(lambda: b"master_link_status:up" in redis_command(self.replica.port, "INFO"), deadline)
            # Each sentinel is told its id, the replica and the other sentinels up front (the lines
            # Sentinel itself writes to its config), instead of finding them over several seconds.
            ids = {port: f"{port:040x}" for port in self.sentinel_ports}
            for port in self.sentinel_ports:
                conf = self.folder / f"sentinel-{port}.conf"
                known = "".join(
                    f"sentinel known-sentinel {self.name} 127.0.0.1 {p} {ids[p]}\n"
                    for p in self.sentinel_ports
                    if p != port
                )
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\nsentinel myid {ids[port]}\n"
                    f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 2\n"
                    f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.name} 10000\n"
                    f"sentinel known-replica {self.name} 127.0.0.1 {self.replica.port}\n{known}"
                )
                self.sentinels.append(
                    subprocess.Popen(
                        ["redis-server", str(conf), "--sentinel"],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            others = len(self.sentinel_ports) - 1
            for port in self.sentinel_ports:
                self._wait(lambda p=port: self._knows_everyone(p, others), deadline)
        except Exception:
            self.stop()
            raise
        return self

    def _knows_everyone(self, port: int, others: int) -> bool:
        reply = redis_command(port, "SENTINEL", "MASTER", self.name).decode(errors="replace").split("\r\n")
        fields = dict(zip(reply[2::4], reply[4::4], strict=False))
        return fields.get("num-slaves") == "1" and fields.get("num-other-sentinels") == str(others)

    @staticmethod
    def _wait(check: Callable[[], bool], deadline: float) -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if check():
                    return
            time.sleep(0.05)
        raise RuntimeError("the sentinel set did not come up in time")

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers sees it."""
        for port in self.sentinel_ports:
            with contextlib.suppress(OSError):
                parts = redis_command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name).split(b"\r\n")
                if len(parts) > 4:
                    return int(parts[4])
        raise RuntimeError("no sentinel answered")

    def stop(self) -> None:
        for p in self.sentinels:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        self.replica.stop()
        self.master.stop()


class ClusterSet:
    """A Redis Cluster of ``count`` masters (no replicas) on free loopback ports; ``url`` is its
    ``redis+cluster://`` URL."""

    def __init__(self, folder: Path, count: int = 3) -> None:
        self.folder = folder
        self.ports = [free_port() for _ in range(count)]
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 30.0) -> ClusterSet:
        try:
            for port in self.ports:
                conf = str(self.folder / f"nodes-{port}.conf")
                # the bus port is picked too: the default, port + 10000, may be taken or past 65535
                bus = ["--cluster-port", str(free_port())]
                node = RedisServer(port, ["--cluster-enabled", "yes", "--cluster-config-file", conf, *bus])
                self.nodes.append(node.start())
            addresses = [f"127.0.0.1:{p}" for p in self.ports]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            deadline = time.monotonic() + timeout
            while not all(b"cluster_state:ok" in redis_command(p, "CLUSTER", "INFO") for p in self.ports):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not reach cluster_state:ok in time")
                time.sleep(0.05)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
