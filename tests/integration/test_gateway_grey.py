"""Grey failures under a bounded load through the gateway (16 lanes, 2 s deadline, cache off).

A worker frozen with SIGSTOP (the kernel still accepts its connections, nothing answers), a
worker whose network link is cut (it runs in a network namespace of the test's own, behind a
veth pair that the test sets down and up again), and a slow worker (paused and resumed in a
duty cycle). Each must fail no request, and afterwards every worker is back in rotation.
The latency p99 of each load is printed (run with ``-s``), not asserted.

One cluster serves the three tests: a loopback worker, and a second worker inside a namespace
when the machine allows one (root and ``ip``), else on loopback too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry._proto.ferry.v1 import admin_pb2, admin_pb2_grpc
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client.inference import build_request
from tests.integration.test_gateway import start_gateway, start_workers, wait_until
from tests.support.deps import in_ci
from tests.support.models import export_mlp, publish
from tests.support.procs import ServiceProcess, free_port

LANES = 16
DEADLINE_S = 2.0
GATEWAY_FLAGS = ("--no-cache-enabled", "--eject-base-s", "0.5", "--eject-max-s", "2")


def netns_problem() -> str | None:
    """Why this machine cannot make a network namespace for the test; None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    return None


@dataclass
class Netns:
    """A namespace and a veth pair of the test's own: 10.231.N.1 here, 10.231.N.2 inside."""

    tag: int = field(default_factory=lambda: os.getpid() % 250 + 1)

    @property
    def name(self) -> str:
        return f"ferry-grey-{self.tag}"

    @property
    def host_link(self) -> str:
        return f"fgrey{self.tag}h"

    @property
    def inside(self) -> str:
        return f"10.231.{self.tag}.2"

    def _ip(self, *args: str, ns: bool = False) -> None:
        argv = ["ip", "netns", "exec", self.name, "ip", *args] if ns else ["ip", *args]
        subprocess.run(argv, check=True, capture_output=True, timeout=10)

    def create(self) -> Netns:
        peer = f"fgrey{self.tag}n"
        self._ip("netns", "add", self.name)
        self._ip("link", "add", self.host_link, "type", "veth", "peer", "name", peer)
        self._ip("link", "set", peer, "netns", self.name)
        self._ip("addr", "add", f"10.231.{self.tag}.1/30", "dev", self.host_link)
        self._ip("link", "set", self.host_link, "up")
        self._ip("addr", "add", f"{self.inside}/30", "dev", peer, ns=True)
        self._ip("link", "set", peer, "up", ns=True)
        self._ip("link", "set", "lo", "up", ns=True)
        return self

    def link(self, up: bool) -> None:
        self._ip("link", "set", self.host_link, "up" if up else "down")

    def delete(self) -> None:
        for argv in (["ip", "link", "del", self.host_link], ["ip", "netns", "del", self.name]):
            subprocess.run(argv, capture_output=True, timeout=10)


class NsWorker(ServiceProcess):
    """A worker run inside a namespace with ``ip netns exec``, reached at the namespace's address."""

    def __init__(self, netns: Netns, store: Path) -> None:
        super().__init__(
            ["ip", "netns", "exec", netns.name, sys.executable, "-m", "ferry.cli.main", "serve", "worker",
             "--store", str(store), "--host", netns.inside, "--port", "0", "--insecure",
             "--poll-interval-s", "0.3"]
        )  # fmt: skip
        self.host = netns.inside

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class GreyLoad:
    """``LANES`` closed-loop callers with a ``DEADLINE_S`` deadline, bounded by ``limit`` answers."""

    address: str
    limit: int = 20_000
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> GreyLoad:
        self._channel = grpc.aio.insecure_channel(self.address)
        stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._tasks = [asyncio.ensure_future(self._lane(stub, n)) for n in range(LANES)]
        return self

    async def _lane(self, stub: pb_grpc.GRPCInferenceServiceStub, n: int) -> None:
        rng = np.random.default_rng(n)
        while not self._stop.is_set() and self.ok + len(self.failures) < self.limit:
            req = build_request("mlp", {"input": rng.standard_normal((1, 8)).astype(np.float32)})
            started = time.monotonic()
            try:
                await stub.ModelInfer(req, timeout=DEADLINE_S)
                self.ok += 1
                self.latencies.append(time.monotonic() - started)
            except grpc.aio.AioRpcError as err:
                self.failures.append(f"{err.code().name}: {err.details()}")

    async def until(self, count: int, timeout: float = 30.0) -> None:
        target = self.ok + len(self.failures) + count
        deadline = time.monotonic() + timeout
        while self.ok + len(self.failures) < target and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def until_state(self, check: Any, what: str, timeout: float = 20.0) -> None:
        """Keep the load running until the gateway's view says ``check``; fail past ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await asyncio.to_thread(check):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def p99_ms(self) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else float("nan")

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._channel.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    publish(root, "mlp", 1, export_mlp(tmp_path_factory.mktemp("onnx") / "mlp.onnx"), {"max_batch_size": 64})
    return root


@pytest.fixture(scope="module")
def cluster(store: Path) -> Iterator[dict[str, Any]]:
    netns: Netns | None = None
    workers: list[ServiceProcess] = []
    gateway = None
    try:
        if netns_problem() is None:
            netns = Netns().create()
            workers = start_workers(store, 1)
            workers.append(NsWorker(netns, store).start())
        else:
            workers = start_workers(store, 2)
        gateway = start_gateway(workers, *GATEWAY_FLAGS)
        cluster = {"gateway": gateway, "workers": workers, "netns": netns}
        wait_until(lambda: all_in_rotation(cluster), 30, "both workers in rotation")
        yield cluster
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers:
            w.signal(signal.SIGCONT)
            w.stop()
        if netns is not None:
            netns.delete()


def gateway_view(cluster: dict[str, Any]) -> list[admin_pb2.WorkerInfo]:
    with grpc.insecure_channel(cluster["gateway"].address) as ch:
        stub = admin_pb2_grpc.GatewayAdminStub(ch)
        return list(stub.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=5).workers)


def all_in_rotation(cluster: dict[str, Any]) -> bool:
    view = gateway_view(cluster)
    ready = [w for w in view if w.serving and not w.ejected and any(m.state == "READY" for m in w.models)]
    return len(ready) == len(cluster["workers"])


def out_of_rotation(cluster: dict[str, Any], address: str) -> bool:
    return any(w.address == address and (w.ejected or not w.serving) for w in gateway_view(cluster))


def report(name: str, load: GreyLoad) -> None:
    print(f"\n{name}: {load.ok} answered, {len(load.failures)} failed, p99 {load.p99_ms():.1f} ms")


def test_a_frozen_worker_fails_no_request(cluster: dict[str, Any]) -> None:
    victim: ServiceProcess = cluster["workers"][-1]

    async def scenario() -> GreyLoad:
        async with GreyLoad(cluster["gateway"].address) as load:
            await load.until(300)
            victim.signal(signal.SIGSTOP)
            try:
                await load.until_state(lambda: out_of_rotation(cluster, victim.address), "victim out")
                await load.until(300)
            finally:
                victim.signal(signal.SIGCONT)
            await load.until_state(lambda: all_in_rotation(cluster), "every worker back in rotation")
            await load.until(200)
        return load

    load = asyncio.run(scenario())
    report("SIGSTOP", load)
    assert load.failures == [] and load.ok >= 800


def test_a_slow_worker_in_a_duty_cycle_fails_no_request(cluster: dict[str, Any]) -> None:
    victim: ServiceProcess = cluster["workers"][-1]
    done = threading.Event()

    def duty_cycle() -> None:  # the fault itself: 150 ms frozen, 150 ms running, 12 cycles at most
        for _ in range(12):
            if done.is_set():
                break
            victim.signal(signal.SIGSTOP)
            done.wait(0.15)
            victim.signal(signal.SIGCONT)
            done.wait(0.15)
        done.set()

    async def scenario() -> GreyLoad:
        async with GreyLoad(cluster["gateway"].address) as load:
            await load.until(200)
            cycler = threading.Thread(target=duty_cycle, daemon=True)
            cycler.start()
            try:
                await load.until_state(done.is_set, "the duty cycle to end", timeout=30)
            finally:
                done.set()
                cycler.join(5)
                victim.signal(signal.SIGCONT)
            await load.until_state(lambda: all_in_rotation(cluster), "every worker back in rotation")
            await load.until(200)
        return load

    load = asyncio.run(scenario())
    report("duty cycle", load)
    assert load.failures == [] and load.ok >= 400


def test_a_worker_cut_off_the_network_fails_no_request(cluster: dict[str, Any]) -> None:
    netns: Netns | None = cluster["netns"]
    if netns is None:
        reason = f"needs a network namespace: {netns_problem()}"
        if in_ci():
            pytest.fail(f"CI requires it: {reason}", pytrace=False)
        pytest.skip(reason)
    victim: ServiceProcess = cluster["workers"][-1]

    async def scenario() -> GreyLoad:
        async with GreyLoad(cluster["gateway"].address) as load:
            await load.until(300)
            netns.link(up=False)
            try:
                # keepalive must notice the silence: the worker leaves the pool, not just the router
                await load.until_state(
                    lambda: any(w.address == victim.address and not w.serving for w in gateway_view(cluster)),
                    "the cut-off worker to be seen as not serving",
                )
                await load.until(300)
            finally:
                netns.link(up=True)
            await load.until_state(lambda: all_in_rotation(cluster), "every worker back in rotation")
            await load.until(200)
        return load

    load = asyncio.run(scenario())
    report("link cut", load)
    assert load.failures == [] and load.ok >= 800


def counter(metrics_port: int, series: str) -> float:
    """One series of the gateway's /metrics, summed over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


def test_a_hedge_answers_for_a_frozen_worker(cluster: dict[str, Any]) -> None:
    """A hedge after 30 ms wins while the worker it raced is frozen; a set per-try budget of 1.5 s
    keeps retries out of it, so the wins are the hedges' own."""
    victim: ServiceProcess = cluster["workers"][-1]
    metrics_port = free_port()
    gateway = start_gateway(
        cluster["workers"], *GATEWAY_FLAGS, "--hedge-delay-ms", "30", "--try-timeout-ms", "1500",
        "--metrics-port", str(metrics_port),
    )  # fmt: skip
    try:

        async def scenario() -> GreyLoad:
            async with GreyLoad(gateway.address) as load:
                await load.until(200)
                victim.signal(signal.SIGSTOP)
                try:
                    await load.until_state(
                        lambda: counter(metrics_port, 'ferry_gateway_upstream_wins_total{kind="hedge"}') > 0,
                        "a hedge to win",
                    )
                finally:
                    victim.signal(signal.SIGCONT)
                await load.until(200)
            return load

        load = asyncio.run(scenario())
        report("hedged SIGSTOP", load)
        assert load.failures == []
        assert counter(metrics_port, 'ferry_gateway_upstream_tries_total{kind="hedge"}') >= 1
    finally:
        gateway.stop()


@pytest.fixture(autouse=True)
def _resumed(cluster: dict[str, Any]) -> Iterator[None]:
    """Whatever a test did, the next one starts from a running, connected fleet."""
    yield
    for w in cluster["workers"]:
        w.signal(signal.SIGCONT)
    if cluster["netns"] is not None:
        with contextlib.suppress(subprocess.CalledProcessError):
            cluster["netns"].link(up=True)
