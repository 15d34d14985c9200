"""The gateway in front of two real workers and a private redis-server, driven by tritonclient.

Every v2 RPC goes through the gateway; errors match the worker's; the result cache,
single-flight, coalescing and a version rollout under load are read back from the
workers' own statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry._proto.ferry.v1 import admin_pb2, admin_pb2_grpc
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client.inference import build_request
from ferry.core import codec
from tests.support.deps import require_binary, require_module
from tests.support.gate import HELD_ROWS, held_config, until_metric
from tests.support.models import export_mlp, ort_run, publish
from tests.support.procs import RedisServer, ServiceProcess, free_port

tc = require_module("tritonclient.grpc")


# -- helpers shared by the gateway test modules -------------------------------------------------
def start_workers(store: Path, n: int, *extra: str) -> list[ServiceProcess]:
    procs = [
        ServiceProcess.serve(
            "worker", "--store", str(store), "--port", "0", "--poll-interval-s", "0.3", *extra
        )
        for _ in range(n)
    ]
    started: list[ServiceProcess] = []
    try:
        for p in procs:
            started.append(p.start())
    except Exception:
        for p in started:
            p.stop()
        raise
    return started


def start_gateway(
    workers: Sequence[ServiceProcess], *extra: str, env: dict[str, str] | None = None
) -> ServiceProcess:
    return ServiceProcess.serve(
        "gateway",
        "--workers",
        ",".join(w.address for w in workers),
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--index-interval-s",
        "0.2",
        "--http-port",  # off: many gateways run at once; a caller's own --http-port (later) wins
        "0",
        *extra,
        env=env,
    ).start()


def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def worker_and_gateway(
    store: Path, models: Sequence[str]
) -> Iterator[tuple[dict[str, str], list[ServiceProcess]]]:
    """One worker and a gateway in front of it, returned once both serve ``models``."""
    procs = start_workers(store, 1)
    try:
        procs.append(start_gateway(procs[:1]))
        addresses = {"worker": procs[0].address, "gateway": procs[1].address}
        for address in addresses.values():
            client = tc.InferenceServerClient(address)
            for model in models:
                wait_until(lambda c=client, m=model: c.is_model_ready(m), 30, f"{model} ready at {address}")
        yield addresses, procs
    finally:
        for p in reversed(procs):
            p.stop()


def mlp_request(rows: int = 1, seed: int = 0, model: str = "mlp", **params: Any) -> pb.ModelInferRequest:
    x = np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)
    return build_request(model, {"input": x}, parameters=params or None)


def stats(address: str, model: str, version: str = "") -> pb.ModelStatistics:
    with grpc.insecure_channel(address) as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name=model, version=version), timeout=10
        )
    return resp.model_stats[0]


def worker_totals(workers: Sequence[ServiceProcess], model: str) -> tuple[int, int, int]:
    """(requests, rows, executions) the workers served for ``model``, all versions."""
    reqs = rows = runs = 0
    for w in workers:
        with grpc.insecure_channel(w.address) as ch:
            resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
                pb.ModelStatisticsRequest(name=model), timeout=10
            )
        for s in resp.model_stats:
            reqs += s.inference_stats.success.count
            rows += s.inference_count
            runs += s.execution_count
    return reqs, rows, runs


# A count for a load that must outlast an event of unknown length (a failover, a roll-out): the
# scenario's own deadlines stop it. A fast machine sends a default load's 4000 requests in about
# two seconds, sooner than a Sentinel failover ends.
OUTLAST = 1_000_000


class Load:
    """A bounded concurrent load: ``concurrency`` callers, each sending until stopped or ``limit``."""

    def __init__(
        self,
        address: str,
        make: Callable[[int], pb.ModelInferRequest],
        concurrency: int = 8,
        limit: int = 4000,
        timeout: float = 20.0,
    ) -> None:
        self.address = address
        self.make = make
        self.concurrency = concurrency
        self.limit = limit
        self.timeout = timeout
        self.ok = 0
        self.failures: list[str] = []
        self.responses: list[tuple[float, pb.ModelInferResponse]] = []  # (sent at, answer)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _caller(self, stub: pb_grpc.GRPCInferenceServiceStub, n: int) -> None:
        i = 0
        while not self._stop.is_set() and self.ok + len(self.failures) < self.limit:
            started = time.monotonic()
            try:
                resp = await stub.ModelInfer(self.make(n * 100_000 + i), timeout=self.timeout)
                self.ok += 1
                self.responses.append((started, resp))
            except grpc.aio.AioRpcError as err:
                self.failures.append(f"{err.code().name}: {err.details()}")
            i += 1

    async def __aenter__(self) -> Load:
        self._channel = grpc.aio.insecure_channel(self.address)
        stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._tasks = [asyncio.ensure_future(self._caller(stub, n)) for n in range(self.concurrency)]
        return self

    async def until(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` more requests have been answered (bounded in time)."""
        target = self.ok + len(self.failures) + count
        deadline = time.monotonic() + timeout
        while self.ok + len(self.failures) < target and time.monotonic() < deadline:
            if not self.running:
                break
            await asyncio.sleep(0.02)

    @property
    def running(self) -> bool:
        """Some caller is still sending (none has reached the limit, and the load was not stopped)."""
        return not all(t.done() for t in self._tasks)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._channel.close()


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    return {
        "mlp": export_mlp(d / "mlp.onnx"),
        "mlp2": export_mlp(d / "mlp2.onnx", seed=1),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, onnx_files: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("store")
    publish(root, "mlp", 1, onnx_files["mlp"], {"max_batch_size": 64})
    publish(
        root, "uncached", 1, onnx_files["mlp"], {"max_batch_size": 64, "response_cache": {"enable": False}}
    )
    publish(root, "roll", 1, onnx_files["mlp"], {"max_batch_size": 64})
    publish(root, "spare", 1, onnx_files["mlp"], {"max_batch_size": 64})
    publish(root, "held", 1, onnx_files["mlp"], held_config(max_batch_size=64))
    return root


@pytest.fixture(scope="module")
def cluster(store: Path) -> Iterator[dict[str, Any]]:
    require_binary("redis-server")
    redis = RedisServer().start()
    workers: list[ServiceProcess] = []
    gateway = None
    try:
        # the gateway logs in as an ACL user with a password, given in the URL
        with socket.create_connection(("127.0.0.1", redis.port), 5) as s:
            s.sendall(b"ACL SETUSER ferry on >s3cret ~ferry:* +@all\r\n")
            assert s.recv(16).startswith(b"+OK")
        url = f"redis://ferry:s3cret@127.0.0.1:{redis.port}/0"
        workers = start_workers(store, 2)
        gateway = start_gateway(workers, "--redis-url", url, "--cache-timeout-ms", "2000")
        yield {"gateway": gateway, "workers": workers, "redis": redis, "store": store, "redis_url": url}
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers:
            w.stop()
        redis.stop()


@pytest.fixture(scope="module")
def triton(cluster: dict[str, Any]) -> Any:
    client = tc.InferenceServerClient(cluster["gateway"].address)
    wait_until(lambda: client.is_model_ready("mlp"), what="mlp ready through the gateway")
    return client


@pytest.fixture(scope="module")
def held(cluster: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A gateway of its own over one worker, one upstream call at a time, with a metrics port.

    While a call to the held model occupies that one upstream slot, every other request for the
    model waits in the gateway's coalescer; a release sent straight to the worker lets them go.
    """
    port = free_port()
    worker = cluster["workers"][0]
    gateway = start_gateway(
        [worker], "--upstream-per-worker", "1", "--metrics-port", str(port),
        "--redis-url", cluster["redis_url"], "--cache-timeout-ms", "2000",
    )  # fmt: skip
    try:
        client = tc.InferenceServerClient(gateway.address)
        wait_until(lambda: client.is_model_ready("held"), what="held ready through its gateway")
        yield {"gateway": gateway, "worker": worker, "port": port}
    finally:
        gateway.stop()


def held_request(rows: int, seed: int, cache: bool = False) -> pb.ModelInferRequest:
    x = np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)
    return build_request("held", {"input": x}, parameters=None if cache else {"ferry_cache": False})


async def hold_then_release(
    held: dict[str, Any], first: pb.ModelInferRequest, rest: Sequence[pb.ModelInferRequest], waiting: int
) -> tuple[Any, list[Any]]:
    """Send ``first`` and let it take the upstream slot, then ``rest``; once ``waiting`` of them
    wait inside the gateway (the others have already been answered), release the held batch.

    Returns the first answer and the others' answers or errors, in order.
    """
    port, worker = held["port"], held["worker"].address
    async with (
        grpc.aio.insecure_channel(held["gateway"].address) as ch,
        grpc.aio.insecure_channel(worker) as direct,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        head = asyncio.ensure_future(stub.ModelInfer(first, timeout=60))
        await until_metric(port, "ferry_gateway_worker_in_flight", 1, worker=worker)
        calls = [asyncio.ensure_future(stub.ModelInfer(r, timeout=60)) for r in rest]
        quick, pending = len(rest) - waiting, set(calls)
        while len(calls) - len(pending) < quick:  # answered without the release: never batched
            finished, pending = await asyncio.wait(pending, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            assert finished, f"only {len(calls) - len(pending)} of {quick} calls were answered"
        assert len(calls) - len(pending) == quick, "a call that should wait was answered"
        assert not head.done(), "the held call finished before its release"
        await until_metric(port, "ferry_gateway_in_flight", 1 + waiting)
        release = held_request(HELD_ROWS - first.inputs[0].shape[0], seed=99)
        await pb_grpc.GRPCInferenceServiceStub(direct).ModelInfer(release, timeout=60)
        answers = await asyncio.gather(*calls, return_exceptions=True)
        return await head, answers


def triton_infer(client: Any, x: np.ndarray, model: str = "mlp", **kw: Any) -> Any:
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], **kw)


# -- every RPC through tritonclient ------------------------------------------------------------
def test_health_and_metadata_rpcs(triton: Any, cluster: dict[str, Any]) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("mlp") and triton.is_model_ready("mlp", "1")
    assert not triton.is_model_ready("mlp", "7") and not triton.is_model_ready("nosuch")
    meta = triton.get_server_metadata()
    assert meta.name == "ferry-gateway" and "model_repository" in meta.extensions
    mm = triton.get_model_metadata("mlp")
    assert mm.versions == ["1"] and mm.inputs[0].name == "input" and list(mm.inputs[0].shape) == [-1, 8]
    cfg = triton.get_model_config("mlp").config
    assert cfg.max_batch_size == 64 and cfg.input[0].dims == [8]
    index = triton.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models} >= {
        ("mlp", "1", "READY"),
        ("uncached", "1", "READY"),  # models no other test rolls, unloads or retires
    }


def test_infer_matches_the_worker(triton: Any, cluster: dict[str, Any]) -> None:
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    direct = tc.InferenceServerClient(cluster["workers"][0].address)
    want = triton_infer(direct, x).as_numpy("output")
    got = triton_infer(triton, x, headers={"x-request-id": "req-123"})
    np.testing.assert_allclose(got.as_numpy("output"), want, rtol=1e-6)
    assert got.get_response().model_version == "1"


def test_stream_infer(triton: Any) -> None:
    results: list[Any] = []
    triton.start_stream(callback=lambda result, error: results.append((result, error)))
    try:
        for n in range(4):
            x = np.full((1, 8), n, np.float32)
            inp = tc.InferInput("input", [1, 8], "FP32")
            inp.set_data_from_numpy(x)
            triton.async_stream_infer("mlp", [inp], request_id=f"s{n}")
        bad = tc.InferInput("input", [1, 4], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 4), np.float32))
        triton.async_stream_infer("mlp", [bad], request_id="bad")
        wait_until(lambda: len(results) == 5, 30, "5 stream answers")
    finally:
        triton.stop_stream()
    ok = sorted(r.get_response().id for r, e in results if e is None)
    errors = [str(e) for _, e in results if e is not None]
    assert ok == ["s0", "s1", "s2", "s3"]
    assert len(errors) == 1 and "input 'input': shape [1, 4] does not match the model's [-1, 8]" in errors[0]


def test_statistics_count_cache_hits_and_misses(triton: Any) -> None:
    x = np.random.default_rng(99).standard_normal((2, 8)).astype(np.float32)
    before = triton.get_inference_statistics("mlp", "1").model_stats[0].inference_stats
    first = triton_infer(triton, x)
    second = triton_infer(triton, x)
    after = triton.get_inference_statistics("mlp", "1").model_stats[0].inference_stats
    assert "ferry_cache_hit" not in first.get_response().parameters
    assert second.get_response().parameters["ferry_cache_hit"].bool_param is True
    np.testing.assert_array_equal(first.as_numpy("output"), second.as_numpy("output"))
    assert after.cache_miss.count - before.cache_miss.count == 1
    assert after.cache_hit.count - before.cache_hit.count == 1


def test_repository_unload_and_load_fan_out(triton: Any, cluster: dict[str, Any]) -> None:
    triton.unload_model("spare")
    wait_until(lambda: not triton.is_model_ready("spare"), 20, "spare unloaded")
    for w in cluster["workers"]:
        assert not tc.InferenceServerClient(w.address).is_model_ready("spare")
    with pytest.raises(tc.InferenceServerException) as err:
        triton_infer(triton, np.zeros((1, 8), np.float32), model="spare")
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert "model 'spare' has no version ready" in err.value.message()
    triton.load_model("spare")
    wait_until(lambda: triton.is_model_ready("spare"), 30, "spare loaded again")
    assert triton_infer(triton, np.zeros((1, 8), np.float32), model="spare").as_numpy("output").shape == (
        1,
        3,
    )
    with pytest.raises(tc.InferenceServerException) as err:
        triton.load_model("nosuch")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "model 'nosuch' is not in the store" in err.value.message()


# -- errors: the same status and message as the worker -------------------------------------------
def _bad_requests() -> dict[str, pb.ModelInferRequest]:
    good = mlp_request(2)
    wrong_dtype = mlp_request(2)
    wrong_dtype.inputs[0].datatype = "FP64"
    wrong_shape = build_request("mlp", {"input": np.zeros((2, 5), np.float32)})
    short = mlp_request(2)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-1]
    unknown_input = build_request(
        "mlp", {"input": np.zeros((1, 8), np.float32), "extra": np.zeros((1, 8), np.float32)}
    )
    missing = pb.ModelInferRequest(model_name="mlp")
    too_big = mlp_request(65)
    unknown_output = mlp_request(1)
    unknown_output.outputs.add(name="nope")
    unknown_model = mlp_request(1, model="nosuch")
    unknown_version = mlp_request(1)
    unknown_version.model_version = "9"
    bad_version = mlp_request(1)
    bad_version.model_version = "abc"
    return {
        "wrong_dtype": wrong_dtype,
        "wrong_shape": wrong_shape,
        "short": short,
        "unknown_input": unknown_input,
        "missing": missing,
        "too_big": too_big,
        "unknown_output": unknown_output,
        "unknown_model": unknown_model,
        "unknown_version": unknown_version,
        "bad_version": bad_version,
        "good": good,
    }


EXPECTED = {
    "wrong_dtype": ("INVALID_ARGUMENT", "input 'input': datatype FP64 does not match the model's FP32"),
    "wrong_shape": ("INVALID_ARGUMENT", "input 'input': shape [2, 5] does not match the model's [-1, 8]"),
    "short": (
        "INVALID_ARGUMENT",
        "tensor 'input': raw content is 63 bytes but shape [2, 8] of FP32 needs 64",
    ),
    "unknown_input": ("INVALID_ARGUMENT", "model 'mlp' has no input 'extra' (inputs: input)"),
    "missing": ("INVALID_ARGUMENT", "model 'mlp': missing input(s) 'input'"),
    "too_big": ("INVALID_ARGUMENT", "input 'input': batch size 65 exceeds the model's max_batch_size 64"),
    "unknown_output": ("INVALID_ARGUMENT", "model 'mlp' has no output 'nope' (outputs: output)"),
    "unknown_model": ("NOT_FOUND", "unknown model 'nosuch'"),
    "unknown_version": ("NOT_FOUND", "model 'mlp' has no version 9"),
    "bad_version": ("INVALID_ARGUMENT", "invalid model version 'abc': versions are positive integers"),
}


def _call(address: str, req: pb.ModelInferRequest) -> tuple[str, str]:
    with grpc.insecure_channel(address) as ch:
        try:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=20)
        except grpc.RpcError as err:
            return err.code().name, err.details()
    return "OK", ""


@pytest.mark.parametrize("case", sorted(set(_bad_requests()) - {"good"}))
def test_errors_match_the_worker(case: str, cluster: dict[str, Any], triton: Any) -> None:
    req = _bad_requests()[case]
    through = _call(cluster["gateway"].address, req)
    direct = _call(cluster["workers"][0].address, req)
    assert through == EXPECTED[case]
    assert through == direct


def test_a_bad_request_in_a_coalesced_batch_fails_alone(held: dict[str, Any]) -> None:
    reqs = [held_request(1, seed=100 + n) for n in range(20)]
    reqs[5].raw_input_contents[0] = reqs[5].raw_input_contents[0][:-1]
    reqs[11].inputs[0].datatype = "FP64"
    before = worker_totals([held["worker"]], "held")
    _, results = asyncio.run(hold_then_release(held, held_request(1, seed=1), reqs, waiting=18))
    after = worker_totals([held["worker"]], "held")
    failed = {n: r for n, r in enumerate(results) if isinstance(r, grpc.aio.AioRpcError)}
    assert sorted(failed) == [5, 11]
    assert failed[5].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed[5].details() == "tensor 'input': raw content is 31 bytes but shape [1, 8] of FP32 needs 32"
    assert failed[11].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed[11].details() == "input 'input': datatype FP64 does not match the model's FP32"
    # the held call and the release ran together; the 18 good ones then went up as one call
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (3, 1 + 7 + 18, 2)


# -- cache semantics -------------------------------------------------------------------------
def _infer(address: str, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=20)


def _hit(resp: pb.ModelInferResponse) -> bool:
    return "ferry_cache_hit" in resp.parameters and resp.parameters["ferry_cache_hit"].bool_param


def test_cache_hit_miss_and_opt_outs(cluster: dict[str, Any], triton: Any) -> None:
    gw = cluster["gateway"].address
    req = mlp_request(3, seed=7)
    assert not _hit(_infer(gw, req))
    hit = _infer(gw, req)
    assert _hit(hit)
    assert codec.decode_outputs(hit)["output"].shape == (3, 3)
    # typed contents of the same tensor hit the same entry
    typed = pb.ModelInferRequest(model_name="mlp")
    t = typed.inputs.add(name="input", datatype="FP32", shape=[3, 8])
    t.contents.fp32_contents.extend(codec.decode_inputs(req)["input"].reshape(-1).tolist())
    assert _hit(_infer(gw, typed))
    # per-request opt-out: executed, not served from the cache
    before = worker_totals(cluster["workers"], "mlp")[0]
    assert not _hit(_infer(gw, mlp_request(3, seed=7, ferry_cache=False)))
    assert worker_totals(cluster["workers"], "mlp")[0] == before + 1
    # per-model opt-out (response_cache.enable false in its config)
    u = mlp_request(1, seed=8, model="uncached")
    assert not _hit(_infer(gw, u)) and not _hit(_infer(gw, u))
    assert worker_totals(cluster["workers"], "uncached")[0] == 2


def test_single_flight_runs_identical_misses_once(held: dict[str, Any]) -> None:
    req = held_request(1, seed=4242, cache=True)
    before = worker_totals([held["worker"]], "held")
    first, answers = asyncio.run(hold_then_release(held, req, [req] * 15, waiting=15))
    after = worker_totals([held["worker"]], "held")
    assert {a.raw_output_contents[0] for a in answers} == {first.raw_output_contents[0]}
    assert after[0] - before[0] == 2  # one upstream request (and the release)
    assert after[2] - before[2] == 1  # one model execution, shared with the release


def test_concurrent_requests_are_coalesced_upstream(
    held: dict[str, Any], onnx_files: dict[str, Path]
) -> None:
    reqs = [held_request(1, seed=200 + n) for n in range(40)]
    before = worker_totals([held["worker"]], "held")
    _, answers = asyncio.run(hold_then_release(held, held_request(1, seed=2), reqs, waiting=40))
    after = worker_totals([held["worker"]], "held")
    assert (after[0] - before[0], after[1] - before[1]) == (3, 1 + 7 + 40)  # 40 rows in one call
    # and each answer holds its own request's row
    for n in (0, 17, 39):
        x = codec.decode_inputs(reqs[n])["input"]
        got = codec.decode_outputs(answers[n])["output"]
        np.testing.assert_allclose(got, ort_run(onnx_files["mlp"], x), atol=1e-5)


def test_admin_service(cluster: dict[str, Any]) -> None:
    gw = cluster["gateway"].address
    with grpc.insecure_channel(gw) as ch:
        stub = admin_pb2_grpc.GatewayAdminStub(ch)
        workers = stub.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=10).workers
        before = stub.CacheStats(admin_pb2.CacheStatsRequest(), timeout=10)
        req = mlp_request(2, seed=4242)  # a request no other test sends
        sent = 0  # the answer is stored just after it is sent: count the misses until the first hit
        deadline = time.monotonic() + 20
        while not _hit(_infer(gw, req)):
            sent += 1
            assert time.monotonic() < deadline, "the answer was never stored"
        after = stub.CacheStats(admin_pb2.CacheStatsRequest(), timeout=10)
    assert sorted(w.address for w in workers) == sorted(w.address for w in cluster["workers"])
    assert all(w.serving and not w.ejected for w in workers)
    assert any(m.model == "mlp" and m.state == "READY" for m in workers[0].models)
    assert after.enabled and after.backend == "redis" and after.breaker_state == "closed"
    assert after.errors == before.errors
    assert after.hits - before.hits == 1
    assert sent >= 1 and after.misses - before.misses == sent


def test_replicas_share_the_cache(cluster: dict[str, Any]) -> None:
    other = start_gateway(
        cluster["workers"], "--redis-url", cluster["redis_url"], "--cache-timeout-ms", "2000"
    )
    try:
        req = mlp_request(2, seed=31337)
        assert not _hit(_infer(cluster["gateway"].address, req))
        wait_until(lambda: _hit(_infer(other.address, req)), 20, "the second replica answers from Redis")
    finally:
        other.stop()


# -- a new version rolled out under load ---------------------------------------------------------
def test_version_rollout_under_load(
    cluster: dict[str, Any], onnx_files: dict[str, Path], triton: Any
) -> None:
    gw = cluster["gateway"].address
    seeds = 8  # a small set of distinct requests, so the cache answers most of them

    async def scenario() -> Load:
        make = lambda n: mlp_request(2, seed=n % seeds, model="roll")  # noqa: E731
        async with Load(gw, make, concurrency=6, limit=OUTLAST) as load:
            await load.until(150)
            publish(cluster["store"], "roll", 2, onnx_files["mlp2"])
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and triton.get_model_metadata("roll").versions != ["2"]:
                await asyncio.sleep(0.05)
            load.switched = time.monotonic()  # type: ignore[attr-defined]
            await load.until(200)
        return load

    load = asyncio.run(scenario())
    assert load.failures == []
    switched = load.switched  # type: ignore[attr-defined]
    assert triton.get_model_metadata("roll").versions == ["2"]
    late = [r for t, r in load.responses if t > switched]
    assert late and all(r.model_version == "2" for r in late)
    # the same requests answer with the new version's results, from v2 entries only
    want = _infer(cluster["workers"][0].address, mlp_request(2, seed=1, model="roll"))
    got = _infer(gw, mlp_request(2, seed=1, model="roll"))
    assert got.model_version == "2" and got.raw_output_contents[0] == want.raw_output_contents[0]


def test_a_stale_index_catches_up_instead_of_failing(
    cluster: dict[str, Any], onnx_files: dict[str, Path]
) -> None:
    """A version unloaded between two of the gateway's index polls: the gateway re-reads the index
    and answers from the version the workers have, or with the worker's own NOT_FOUND when the caller
    pinned the one that went away; never UNAVAILABLE."""
    store, workers = cluster["store"], cluster["workers"]
    config = {"max_batch_size": 64}

    def on_workers(version: str, ready: bool) -> Callable[[], bool]:
        clients = [tc.InferenceServerClient(w.address) for w in workers]
        return lambda: all(c.is_model_ready("stale", version) == ready for c in clients)

    publish(store, "stale", 1, onnx_files["mlp"], config)
    wait_until(on_workers("1", True), what="stale v1 on every worker")
    gateway = start_gateway(workers, "--index-interval-s", "600", "--no-cache-enabled")  # polls once
    try:
        wait_until(lambda: tc.InferenceServerClient(gateway.address).is_model_ready("stale", "1"))
        publish(store, "stale", 2, onnx_files["mlp2"], config)
        wait_until(on_workers("2", True), what="stale v2 on every worker")
        wait_until(on_workers("1", False), what="stale v1 unloaded")
        pinned = mlp_request(1, model="stale")
        pinned.model_version = "1"
        with pytest.raises(grpc.RpcError) as err:
            _infer(gateway.address, pinned)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'stale'" in err.value.details() and "version 1" in err.value.details()

        publish(store, "stale", 3, onnx_files["mlp"], config)
        wait_until(on_workers("3", True), what="stale v3 on every worker")
        wait_until(on_workers("2", False), what="stale v2 unloaded")
        req = mlp_request(2, seed=3, model="stale")
        got = _infer(gateway.address, req)
        assert got.model_version == "3"
        assert got.raw_output_contents[0] == _infer(workers[0].address, req).raw_output_contents[0]
    finally:
        gateway.stop()


# -- discovery by DNS, metrics over HTTP ---------------------------------------------------------
def test_dns_discovery_and_prometheus_metrics(cluster: dict[str, Any]) -> None:
    import urllib.request

    from tests.support.procs import free_port

    worker = cluster["workers"][0]
    metrics_port = free_port()
    gateway = ServiceProcess.serve(
        "gateway",
        "--workers-dns",
        f"localhost:{worker.port}",  # one name, re-resolved; as a headless Service would be
        "--dns-interval-s",
        "0.5",
        "--port",
        "0",
        "--http-port",
        "0",
        "--host",
        "127.0.0.1",
        "--metrics-port",
        str(metrics_port),
        "--no-cache-enabled",
    ).start()
    try:
        client = tc.InferenceServerClient(gateway.address)
        wait_until(lambda: client.is_model_ready("mlp"), 30, "mlp ready via DNS discovery")
        x = np.ones((2, 8), np.float32)
        assert triton_infer(client, x).as_numpy("output").shape == (2, 3)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        gateway.stop()
    for series in (
        'ferry_gateway_requests_total{model="mlp",status="OK"} 1.0',
        "ferry_gateway_request_seconds_bucket",
        "ferry_gateway_upstream_batch_requests_bucket",
        f'ferry_gateway_worker_in_flight{{worker="127.0.0.1:{worker.port}"}} 0.0',
        'ferry_gateway_workers{state="serving"} 1.0',
        "ferry_gateway_cache_breaker_state",
        "ferry_gateway_retries_total",
    ):
        assert series in text, series


def test_server_reflection_lists_the_services(cluster: dict[str, Any]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cluster["gateway"].address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"inference.GRPCInferenceService", "ferry.v1.GatewayAdmin", "grpc.health.v1.Health"} <= names
