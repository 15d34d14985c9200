"""Run the whole Ferry stack on one machine as separate processes (``ferry up``).

The supervisor starts a private redis-server (when the binary is on PATH and no
Redis URL is given; otherwise the gateway uses its in-process cache, and the log
says so), the trainer, the exporter, N workers and the gateway, each as
``python -m ferry.cli.main serve ...`` in its own process session. A child is
ready when it prints its ``FERRY_READY`` line; its output goes to
``<log_dir>/<name>.log``. A child that dies is reported and restarted (a bounded
number of times). Stopping sends SIGTERM to every child (gateway first, so no
new work arrives), waits for them to drain, then kills what is left: no orphan
survives ``ferry up``. That holds when the supervisor itself is killed (SIGKILL
included): every child, redis-server too, is started with ``PR_SET_PDEATHSIG``
armed, so the kernel kills it when the supervisor dies. The ports follow Triton's
layout from ``--base-port``: the gateway's HTTP (KServe v2 REST) port on it, its gRPC
port +1. Addresses are written to a state file for ``ferry status``; a state file
left by a stack that died is reported (with its PID) and replaced, one whose stack
still runs stops the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from ferry.core.errors import FailedPrecondition, Unavailable
from ferry.core.grpcserver import parse_ready_line
from ferry.core.lifetime import die_with_parent
from ferry.core.netutil import free_port
from ferry.core.settings import ServiceSettings
from ferry.pki import ADMIN_KEY_FILE, INFER_KEY_FILE, Secrets, make_secrets

log = logging.getLogger("ferry.stack")


class UpSettings(ServiceSettings):
    """How ``ferry up`` lays the stack out; each field is also ``FERRY_UP_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FERRY_UP_", extra="forbid", populate_by_name=True)

    host: str = Field("127.0.0.1", description="address every service binds")
    base_port: int = Field(
        8000,
        description="gateway HTTP on it, gateway gRPC +1, trainer +2, exporter +3, workers +10.., "
        "redis +379; 0 = free ports",
    )
    workers: int = Field(2, ge=1, description="number of inference worker processes")
    store: str = Field(".ferry/store", description="model store shared by every service")
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("FERRY_UP_REDIS_URL", "REDIS_URL"),
        description="use this Redis (REDIS_URL works too); unset: a private redis-server if installed, "
        "else the in-process cache",
    )
    log_dir: str = Field(".ferry/logs", description="one log file per child process")
    state_file: str = Field(".ferry/stack.json", description="where addresses are written for `ferry status`")
    restart_limit: int = Field(5, description="restarts allowed per child before the stack gives up")
    start_timeout_s: float = Field(90.0, description="how long a child may take to print its ready line")
    grace_s: float = Field(10.0, description="drain time given to each child on stop")
    secure: bool = Field(
        False, description="TLS and API keys on every service, from a local CA made under secrets_dir"
    )
    secrets_dir: str = Field(".ferry/secrets", description="with --secure: the CA, certificates and keys")
    log_level: str = "WARNING"


def _dies_with_us() -> Any:
    """A ``preexec_fn`` that arms PR_SET_PDEATHSIG in the child (before exec, so it holds for
    programs that are not ours, like redis-server): the kernel kills it when we die."""
    supervisor = os.getpid()
    return lambda: die_with_parent(supervisor)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def port_holder(port: int) -> int | None:
    """The PID listening on TCP ``port`` (Linux ``/proc``), None when unknown: it makes "port in
    use" actionable."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return int(pid)
    return None


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    port: int = 0
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    tail: list[str] = field(default_factory=list)
    stopping: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Stack:
    """The supervisor: start in dependency order, watch, restart, stop everything."""

    def __init__(self, settings: UpSettings) -> None:
        self.s = settings
        self.children: dict[str, Child] = {}
        self.redis_url: str | None = settings.redis_url
        self.redis_note = ""
        self.stale_note = ""
        self._redis: asyncio.subprocess.Process | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self.secrets: Secrets | None = make_secrets(settings.secrets_dir) if settings.secure else None
        # The gateway's REST port: --http-port 0 means off, so with free ports the supervisor
        # picks one itself (like the private redis-server's).
        self.http_port = self._port(0) or free_port(settings.host)
        Path(settings.log_dir).mkdir(parents=True, exist_ok=True)

    # --- planning -----------------------------------------------------------------------------

    def _port(self, offset: int) -> int:
        return self.s.base_port + offset if self.s.base_port else 0

    def planned_ports(self) -> dict[str, int]:
        ports = {
            "gateway-http": self._port(0),
            "gateway": self._port(1),
            "trainer": self._port(2),
            "exporter": self._port(3),
        }
        ports.update({f"worker-{i + 1}": self._port(10 + i) for i in range(self.s.workers)})
        if self._wants_private_redis():
            ports["redis"] = self._port(379)
        return ports

    def _wants_private_redis(self) -> bool:
        return not self.s.redis_url and shutil.which("redis-server") is not None

    def check_state_file(self) -> None:
        """A state file names the PID of the stack that wrote it: refuse to start beside a live one;
        one left by a stack that died (SIGKILL, a crash) is reported and replaced."""
        path = Path(self.s.state_file)
        try:
            pid = int(json.loads(path.read_text()).get("pid", 0))
        except FileNotFoundError:
            return
        except (OSError, ValueError, AttributeError):
            pid = 0
        if pid and pid != os.getpid() and pid_alive(pid):
            raise FailedPrecondition(
                f"a stack is already running from {path} (pid {pid}): stop it with `kill {pid}` "
                "(or Ctrl-C where it runs), or pass another --state-file"
            )
        self.stale_note = (
            f"ferry up: {path} was left by a stack that is gone (pid {pid}); replacing it"
            if pid
            else f"ferry up: {path} is unreadable; replacing it"
        )
        print(self.stale_note, file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)

    def check_ports(self) -> None:
        taken = []
        for name, port in self.planned_ports().items():
            if port and not port_is_free(self.s.host, port):
                holder = port_holder(port)
                taken.append(f"{name} port {port}" + (f" (held by pid {holder})" if holder else ""))
        if taken:
            raise FailedPrecondition(
                f"cannot start: {', '.join(taken)} on {self.s.host} already in use; stop what holds it or "
                "pass --base-port (0 picks free ports)"
            )

    def _serve_argv(self, service: str, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ferry.cli.main",
            "serve",
            service,
            "--log-level",
            self.s.log_level,
            *self._secure_args(service),
            *args,
        ]

    def _secure_args(self, service: str) -> list[str]:
        """With --secure: the service's certificate, the key file, and for the gateway the way to
        its workers (TLS against the local CA; its key goes in the environment, never on argv)."""
        s = self.secrets
        if s is None:
            return []
        kind = "worker" if service.startswith("worker") else service
        args = [
            "--api-keys-file",
            str(s.keys_file),
            "--tls-cert",
            str(s.cert(kind)),
            "--tls-key",
            str(s.key(kind)),
        ]
        if kind == "gateway":
            args += ["--worker-tls", "--worker-ca", str(s.ca)]
        return args

    def _child_env(self, name: str) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.secrets is not None and name == "gateway":
            env["FERRY_GATEWAY_WORKER_API_KEY"] = self.secrets.admin_key
        return env

    # --- starting -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.check_state_file()
        self.check_ports()
        try:
            await self._start_redis()
            common = ["--host", self.s.host, "--store", self.s.store]
            await asyncio.gather(
                self._start_child(
                    "trainer", self._serve_argv("trainer", *common, "--port", str(self._port(2)))
                ),
                self._start_child(
                    "exporter", self._serve_argv("exporter", *common, "--port", str(self._port(3)))
                ),
                *(
                    self._start_child(
                        f"worker-{i + 1}",
                        self._serve_argv("worker", *common, "--port", str(self._port(10 + i))),
                    )
                    for i in range(self.s.workers)
                ),
            )
            workers = ",".join(c.address for n, c in self.children.items() if n.startswith("worker-"))
            gateway_args = [
                "--host", self.s.host, "--port", str(self._port(1)), "--http-port", str(self.http_port),
                "--workers", workers,
            ]  # fmt: skip
            if self.redis_url:
                gateway_args += ["--redis-url", self.redis_url]
            await self._start_child("gateway", self._serve_argv("gateway", *gateway_args))
        except BaseException:
            await self.stop()
            raise
        self.write_state()

    async def _start_redis(self) -> None:
        if self.s.redis_url:
            self.redis_note = f"result cache: Redis at {self.s.redis_url}"
            return
        binary = shutil.which("redis-server")
        if binary is None:
            self.redis_note = (
                "result cache: in-process LRU (redis-server is not installed and no Redis URL is set)"
            )
            log.warning(self.redis_note)
            return
        port = self._port(379) or free_port(self.s.host)
        self._redis = await asyncio.create_subprocess_exec(
            binary, "--port", str(port), "--bind", self.s.host, "--save", "", "--appendonly", "no",
            "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_dies_with_us(),
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((self.s.host, port), 0.2):
                break
            await asyncio.sleep(0.05)
        else:
            raise Unavailable(f"private redis-server did not start on port {port}")
        self.redis_url = f"redis://{self.s.host}:{port}/0"
        self.redis_note = f"result cache: private redis-server at {self.redis_url}"

    async def _start_child(self, name: str, argv: list[str]) -> Child:
        child = self.children.get(name) or Child(name, argv, Path(self.s.log_dir) / f"{name}.log")
        self.children[name] = child
        child.ready = asyncio.Event()
        child.tail = []
        child.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_dies_with_us(),
            env=self._child_env(name),
        )
        reader = asyncio.create_task(self._pump(child, child.proc))
        ready = asyncio.create_task(child.ready.wait())
        exited = asyncio.create_task(child.proc.wait())
        done, _ = await asyncio.wait(
            {ready, exited}, timeout=self.s.start_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        for task in (ready, exited):
            task.cancel()
        if ready not in done:
            await asyncio.sleep(0.2)  # let the reader catch the last lines
            reader.cancel()
            tail = "".join(child.tail[-15:])
            raise Unavailable(f"{name} failed to start (see {child.log_path}):\n{tail}")
        self._watchers.append(asyncio.create_task(self._watch(child, child.proc)))
        return child

    async def _pump(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        with open(child.log_path, "a") as out:
            async for raw in proc.stdout:
                line = raw.decode(errors="replace")
                out.write(line)
                out.flush()
                child.tail = [*child.tail[-40:], line]
                ready = parse_ready_line(line)
                if ready and not child.ready.is_set():
                    if not child.port:
                        child.port = ready[1]
                    child.ready.set()

    async def _watch(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if child.stopping:
            return
        print(
            f"ferry up: {child.name} exited with code {code}; see {child.log_path}",
            file=sys.stderr,
            flush=True,
        )
        if child.restarts >= self.s.restart_limit:
            print(
                f"ferry up: {child.name} restarted {child.restarts} times; giving up on it", file=sys.stderr
            )
            return
        child.restarts += 1
        await asyncio.sleep(min(2**child.restarts * 0.25, 5))
        argv = _with_port(child.argv, child.port)
        try:
            await self._start_child(child.name, argv)
            print(f"ferry up: {child.name} restarted at {child.address}", file=sys.stderr, flush=True)
        except Unavailable as err:
            print(f"ferry up: {err}", file=sys.stderr, flush=True)

    # --- stopping -----------------------------------------------------------------------------

    async def stop(self) -> None:
        order = [
            "gateway",
            *sorted(n for n in self.children if n.startswith("worker-")),
            "exporter",
            "trainer",
        ]
        for name in order:
            child = self.children.get(name)
            if child:
                child.stopping = True
        await asyncio.gather(*(self._stop_child(self.children[n]) for n in order if n in self.children))
        for task in self._watchers:
            task.cancel()
        if self._redis and self._redis.returncode is None:
            self._redis.kill()
            await self._redis.wait()
        with contextlib.suppress(FileNotFoundError):
            Path(self.s.state_file).unlink()

    async def _stop_child(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.s.grace_s + 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    # --- reporting ----------------------------------------------------------------------------

    def client_options(self, kind: str = "admin") -> dict[str, Any]:
        """What a Ferry client needs to reach this stack: nothing, or the CA and a key."""
        if self.secrets is None:
            return {}
        key = self.secrets.admin_key if kind == "admin" else self.secrets.infer_key
        return {"api_key": key, "root_certificates": self.secrets.ca.read_bytes(), "tls": True}

    def http_url(self) -> str:
        """The gateway's KServe v2 REST port, as a URL (https with --secure)."""
        scheme = "https" if self.secrets is not None else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def addresses(self) -> dict[str, str]:
        """Each service's address; "gateway" is its gRPC port (what the CLI uses), "gateway-http"
        its REST port's URL."""
        out: dict[str, str] = {}
        for name, child in self.children.items():
            out[name] = child.address
            if name == "gateway":
                out["gateway-http"] = self.http_url()
        if self.redis_url:
            out["redis"] = self.redis_url
        return out

    def write_state(self) -> None:
        state: dict[str, Any] = {
            "pid": os.getpid(),
            "store": str(Path(self.s.store).resolve()),
            "services": self.addresses(),
        }
        if self.secrets is not None:
            state["secure"] = {
                "ca": str(self.secrets.ca.resolve()),
                "admin_key_file": str((self.secrets.folder / ADMIN_KEY_FILE).resolve()),
                "infer_key_file": str((self.secrets.folder / INFER_KEY_FILE).resolve()),
            }
        path = Path(self.s.state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state, indent=2))


def _with_port(argv: list[str], port: int) -> list[str]:
    """The same command, pinned to the port the child had, so its clients keep their address."""
    out = list(argv)
    if port and "--port" in out:
        out[out.index("--port") + 1] = str(port)
    return out
