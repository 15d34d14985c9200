"""A service's life on a cluster, against real processes: health that means ready, a gateway
that drains under load, connections that age out, load gauges, a store that is not there yet,
and a CUDA worker that will not quietly serve on CPU.

One worker (``slow_worker``) serves the module: its "heavy" model takes a while to load and
warm up (six sessions), which is the window the health test watches; "slow" runs one request
at a time, slowly enough that requests visibly wait in its queue.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client.inference import build_request
from ferry.core.store import Store
from tests.support.models import export_slow, publish
from tests.support.procs import ServiceProcess, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WORKER_SERVICE = "inference.GRPCInferenceService"
WIDTH = 256


def until(check: Callable[[], object], deadline_s: float = 30.0, what: str = "condition") -> object:
    """Poll ``check`` until it returns something truthy, or fail after the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def health(address: str, service: str = "") -> int | None:
    """The health status, or None while nobody answers yet."""
    with grpc.insecure_channel(address) as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                .status
            )
        except grpc.RpcError:
            return None


def scrape(port: int) -> dict[str, float]:
    """The samples of a /metrics page, by name with labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def slow_request(request_id: str = "") -> pb.ModelInferRequest:
    return build_request("slow", {"input": np.ones((1, WIDTH), np.float32)}, request_id=request_id)


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_slow(tmp_path_factory.mktemp("onnx") / "slow.onnx", width=WIDTH, rows=1024, depth=48)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, slow_onnx: Path) -> Path:
    root = tmp_path_factory.mktemp("store")
    publish(root, "heavy", 1, slow_onnx, {"max_batch_size": 1, "instance_count": 6})
    publish(root, "slow", 1, slow_onnx, {"max_batch_size": 1, "dynamic_batching": {"max_queue_size": 64}})
    return root


class Launch:
    """A worker started on a port chosen up front, so a test can talk to it before it is ready."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.proc = ServiceProcess.serve(
            "worker",
            "--store",
            str(store),
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--intra-op-threads",
            "1",
            "--max-connection-age-s",
            "1",
            "--grace-s",
            "5",
        )
        self.started: futures.Future[ServiceProcess] = futures.Future()
        # What the port said from its first answer until SERVING, watched from the spawn on, so
        # the health test sees the loading window whichever test first needs the worker.
        self.observed: futures.Future[list[tuple[int | None, int | None, bool]]] = futures.Future()
        threading.Thread(target=self._start, daemon=True).start()
        threading.Thread(target=self._observe, daemon=True).start()

    def _start(self) -> None:
        try:
            self.started.set_result(self.proc.start(timeout=120))
        except BaseException as err:
            self.started.set_exception(err)

    def _snapshot(self) -> tuple[int | None, int | None, bool] | None:
        overall = health(self.address)
        if overall is None:
            return None
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        return overall, health(self.address, WORKER_SERVICE), ready

    def _observe(self) -> None:
        try:
            first = until(self._snapshot, 120, "the port to answer")
            assert isinstance(first, tuple)
            seen = [first]
            end = time.monotonic() + 120
            while seen[-1][:2] != (SERVING, SERVING) and time.monotonic() < end:
                snapshot = until(self._snapshot, 120, "the port to answer again")
                assert isinstance(snapshot, tuple)
                seen.append(snapshot)
            self.observed.set_result(seen)
        except BaseException as err:
            self.observed.set_exception(err)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def launch(store: Path) -> Iterator[Launch]:
    started = Launch(store)
    yield started
    started.proc.stop()


@pytest.fixture(scope="module")
def slow_worker(launch: Launch) -> Launch:
    launch.started.result(timeout=120)
    return launch


# --------------------------------------------------------------------------- health means ready


def test_health_is_not_serving_until_models_are_loaded_and_warm(launch: Launch) -> None:
    seen = launch.observed.result(timeout=120)
    # The port is bound while six sessions of "heavy" load and warm up: not ready yet, for the
    # overall status and the service's own name, and ServerReady says false.
    assert seen[0] == (NOT_SERVING, NOT_SERVING, False)
    assert seen[-1] == (SERVING, SERVING, True)
    launch.started.result(timeout=60)
    with grpc.insecure_channel(launch.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(pb.ModelReadyRequest(name="heavy"), timeout=5).ready


# --------------------------------------------------------------------------- connection age


def _goaway_seen(address: str) -> None:
    """A channel with one call made stays READY until the server ends the connection (idle
    timeout on the client side is 30 minutes); then it leaves READY and a new call reconnects."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        states: list[grpc.ChannelConnectivity] = []
        left = threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            states.append(state)
            if states.count(grpc.ChannelConnectivity.READY) and state != grpc.ChannelConnectivity.READY:
                left.set()

        channel.subscribe(watch, try_to_connect=False)
        assert left.wait(15), f"the connection was never closed by the server: {states}"
        channel.unsubscribe(watch)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live


def test_the_worker_closes_connections_after_their_max_age(slow_worker: Launch) -> None:
    _goaway_seen(slow_worker.address)


# --------------------------------------------------------------------------- load gauges


def test_queue_gauges_show_requests_waiting_then_zero(slow_worker: Launch) -> None:
    port = slow_worker.metrics_port
    before = scrape(port)
    assert before['ferry_worker_queue_depth{model="slow"}'] == 0
    assert before["ferry_worker_in_flight"] == 0
    with grpc.insecure_channel(slow_worker.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(slow_request(str(i)), timeout=60) for i in range(8)]
        snapshots: list[dict[str, float]] = []

        def waiting_behind_a_run() -> bool:
            # One scrape can fall between two runs (one queued, none running), so the test
            # waits for a scrape that shows both; every scrape counts each queued request in flight.
            snapshot = scrape(port)
            snapshots.append(snapshot)
            queued = snapshot['ferry_worker_queue_depth{model="slow"}']
            return queued > 0 and snapshot["ferry_worker_in_flight"] > queued

        until(waiting_behind_a_run, 30, "requests queued behind a running one")
        seen = snapshots[-1]
        assert all(
            s["ferry_worker_in_flight"] >= s['ferry_worker_queue_depth{model="slow"}'] for s in snapshots
        )
        assert seen['ferry_worker_queue_time_seconds{model="slow"}'] > 0
        assert [c.result().id for c in calls] == [str(i) for i in range(8)]
    after = scrape(port)
    assert after['ferry_worker_queue_depth{model="slow"}'] == 0
    assert after['ferry_worker_queue_time_seconds{model="slow"}'] == 0
    assert after["ferry_worker_in_flight"] == 0


# --------------------------------------------------------------------------- gateway drain


def test_a_gateway_sigtermed_under_load_loses_no_request_and_exits_0(slow_worker: Launch) -> None:
    """Lanes of unary infers through a real gateway; each lane's last request is held by the
    slow worker when the gateway gets SIGTERM. Health goes first, the server drains with its
    grace, and only then do the worker channels close: every request succeeds, the exit is 0."""
    metrics_port = free_port()
    gateway = ServiceProcess.serve(
        "gateway",
        "--workers",
        slow_worker.address,
        "--port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        str(metrics_port),
        "--max-connection-age-s",
        "1",
        "--no-cache-enabled",
    ).start(timeout=60)
    lanes, rounds = 4, 2
    try:
        _goaway_seen(gateway.address)  # the gateway's connections age out too
        warmed = threading.Barrier(lanes + 1, timeout=60)
        last_round = threading.Event()
        with grpc.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def lane(n: int) -> list[str]:
                answered = [stub.ModelInfer(slow_request(f"{n}-{r}"), timeout=60).id for r in range(rounds)]
                warmed.wait()
                assert last_round.wait(60)
                answered.append(stub.ModelInfer(slow_request(f"{n}-last"), timeout=60).id)
                return answered

            with futures.ThreadPoolExecutor(lanes) as pool:
                runs = [pool.submit(lane, n) for n in range(lanes)]
                warmed.wait()
                last_round.set()
                # Every lane's last request is inside the gateway (the worker runs them one at
                # a time, slowly): stop now, while they are in flight.
                until(lambda: scrape(metrics_port)["ferry_gateway_in_flight"] >= lanes, 30, "in flight")
                gateway.signal(signal.SIGTERM)
                results = [r.result(timeout=60) for r in runs]
        assert results == [[f"{n}-0", f"{n}-1", f"{n}-last"] for n in range(lanes)]
        assert gateway.wait(30) == 0
    finally:
        gateway.stop()


# --------------------------------------------------------------------------- a store not there yet


def test_a_reader_store_creates_nothing_and_reads_as_empty(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet"
    store = Store(missing, create=False)
    assert store.list_models() == []
    assert store.list_versions("any") == []
    assert not missing.exists()


def _can_mount_read_only() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind /tmp /tmp && mount -o remount,ro,bind /tmp"],
        capture_output=True,
        timeout=10,
    )
    return probe.returncode == 0


def test_a_worker_on_an_empty_read_only_store_is_ready_and_serves_models_once_published(
    tmp_path: Path, slow_onnx: Path
) -> None:
    """The cluster case: the store is a read-only mount, still empty. Where this machine allows
    a private read-only bind mount (root, ``unshare -m``) the worker runs on one; elsewhere on a
    path that does not exist yet. Asked for CUDA first with CPU fallback allowed, it serves on CPU."""
    root = tmp_path / "store"
    args = [
        "--port",
        "0",
        "--poll-interval-s",
        "0.2",
        "--providers",
        "CUDAExecutionProvider,CPUExecutionProvider",
    ]
    args += ["--allow-cpu-fallback", "--intra-op-threads", "1"]
    command = [sys.executable, "-m", "ferry.cli.main", "serve", "worker", "--store", str(root), *args]
    read_only = _can_mount_read_only()
    if read_only:
        root.mkdir()
        mount = f'mount --bind {root} {root} && mount -o remount,ro,bind {root} && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", mount, "sh", *command]
    else:
        assert not root.exists()
    worker = ServiceProcess(command).start(timeout=60)
    try:
        assert health(worker.address) == SERVING
        with grpc.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert list(stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models) == []
            if not read_only:
                assert not root.exists()  # the worker created nothing
            publish(root, "slow", 1, slow_onnx, {"max_batch_size": 1})
            until(
                lambda: stub.ModelReady(pb.ModelReadyRequest(name="slow"), timeout=5).ready,
                60,
                "the published model to load",
            )
            assert stub.ModelInfer(slow_request("x"), timeout=30).id == "x"
        assert "holds no models" in worker.output()
    finally:
        assert worker.stop() == 0


# --------------------------------------------------------------------------- CUDA or nothing


def test_a_worker_asked_for_cuda_without_it_refuses_to_start(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: nothing to refuse")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ferry.cli.main",
            "serve",
            "worker",
            "--store",
            str(tmp_path),
            "--port",
            "0",
            "--providers",
            "CUDAExecutionProvider,CPUExecutionProvider",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(r"error: CUDAExecutionProvider was asked for .* allow_cpu_fallback", result.stderr)
    assert "FERRY_READY" not in result.stdout


# --------------------------------------------------------------------------- the pure rules


def test_the_cpu_fallback_rule() -> None:
    from services.inference.runner import fallback_problem

    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    # Explicit CUDA that did not load: refused, naming the provider and the way out.
    problem = fallback_problem([cuda, cpu], [cpu], allow_cpu_fallback=False)
    assert problem and cuda in problem and "allow_cpu_fallback" in problem
    assert fallback_problem([cuda, cpu], [cpu], allow_cpu_fallback=True) is None
    assert fallback_problem([cuda, cpu], [cuda, cpu], allow_cpu_fallback=False) is None
    # The default (empty: CUDA when offered, then CPU) and CPU-only lists start anywhere.
    assert fallback_problem([], [cpu], allow_cpu_fallback=False) is None
    assert fallback_problem([cpu], [cpu], allow_cpu_fallback=False) is None


def test_connection_age_options() -> None:
    from ferry.core.grpcserver import connection_age_options

    assert connection_age_options(0, 10) == []
    assert connection_age_options(300, 10) == [
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 10_000),
    ]
    assert connection_age_options(0.0001, 0)[0] == ("grpc.max_connection_age_ms", 1)
