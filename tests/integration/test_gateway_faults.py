"""Faults under a bounded concurrent load through the gateway: zero failed requests.

Redis refusing connections, killed mid-load and answering slowly (SIGSTOPped,
so every call runs into the cache timeout); a worker drained with SIGTERM and
one killed with SIGKILL; no healthy worker at all; an overloaded gateway.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry._proto.ferry.v1 import admin_pb2, admin_pb2_grpc
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client.inference import build_request
from tests.integration.test_gateway import (
    OUTLAST,
    Load,
    mlp_request,
    start_gateway,
    start_workers,
    wait_until,
)
from tests.support.deps import require_binary
from tests.support.gate import HELD_ROWS, held_config, until_metric
from tests.support.models import export_mlp, publish
from tests.support.procs import RedisServer, ServiceProcess, free_port

SEEDS = 16  # distinct requests in the cached loads: most answers come from the cache when it works


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("onnx")
    root = tmp_path_factory.mktemp("store")
    publish(root, "mlp", 1, export_mlp(d / "mlp.onnx"), {"max_batch_size": 64})
    publish(root, "held", 1, root / "models" / "mlp" / "1" / "model.onnx", held_config(max_batch_size=64))
    return root


@pytest.fixture(scope="module")
def cluster(store: Path) -> Iterator[dict[str, Any]]:
    require_binary("redis-server")
    port = free_port()
    redis = RedisServer(port=port)  # not started: the gateway first meets a refusing Redis
    workers: list[ServiceProcess] = []
    gateway = None
    try:
        workers = start_workers(store, 2)
        gateway = start_gateway(
            workers,
            "--redis-url",
            redis.url,
            "--cache-timeout-ms",
            "100",
            "--breaker-reset-s",
            "0.3",
            "--eject-base-s",
            "0.5",
            "--cache-near-bytes",
            "0",  # these tests watch Redis calls fail: repeated requests must reach it
        )
        yield {"gateway": gateway, "workers": workers, "redis": redis}
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers:
            w.stop()
        if redis.proc is not None and redis.proc.poll() is None:
            redis.proc.send_signal(signal.SIGCONT)
        redis.stop()


@pytest.fixture
def own_cluster(store: Path) -> Iterator[dict[str, Any]]:
    """Two workers and a gateway of the test's own: it drains or kills one of them."""
    workers = start_workers(store, 2)
    gateway = None
    try:
        gateway = start_gateway(workers, "--eject-base-s", "0.5")
        yield {"gateway": gateway, "workers": workers}
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers:
            w.stop()


def redis_up(redis: RedisServer) -> None:
    """Each Redis test sets the state it starts from, so the tests run in any order."""
    if redis.proc is None or redis.proc.poll() is not None:
        redis.start()


def admin(address: str) -> admin_pb2_grpc.GatewayAdminStub:
    return admin_pb2_grpc.GatewayAdminStub(grpc.insecure_channel(address))


def cache_stats(cluster: dict[str, Any]) -> admin_pb2.CacheStatsResponse:
    return admin(cluster["gateway"].address).CacheStats(admin_pb2.CacheStatsRequest(), timeout=10)


def cached_load(cluster: dict[str, Any], **kw: Any) -> Load:
    return Load(cluster["gateway"].address, lambda n: mlp_request(1, seed=n % SEEDS), **kw)


def uncached_load(cluster: dict[str, Any], **kw: Any) -> Load:
    return Load(cluster["gateway"].address, lambda n: mlp_request(1, seed=n, ferry_cache=False), **kw)


# -- Redis -----------------------------------------------------------------------------------------
def test_redis_refusing_connections_fails_nothing(cluster: dict[str, Any]) -> None:
    cluster["redis"].stop()
    before = cache_stats(cluster)

    async def scenario() -> Load:
        async with cached_load(cluster, concurrency=6, limit=300) as load:
            await load.until(300)
        return load

    load = asyncio.run(scenario())
    assert load.failures == [] and load.ok >= 300
    stats = cache_stats(cluster)
    assert stats.errors > before.errors and stats.hits == before.hits
    assert stats.skipped > before.skipped  # the breaker stopped asking


def test_redis_killed_mid_load_fails_nothing(cluster: dict[str, Any]) -> None:
    redis: RedisServer = cluster["redis"]
    redis_up(redis)
    before = cache_stats(cluster)

    async def scenario() -> Load:
        async with cached_load(cluster, concurrency=6, limit=OUTLAST) as load:
            # the breaker half-opens, a trial succeeds, the cache fills and answers
            deadline = asyncio.get_running_loop().time() + 30
            while cache_stats(cluster).hits == before.hits and asyncio.get_running_loop().time() < deadline:
                await load.until(20)
            redis.stop()
            await load.until(300)
            assert load.running, "the load ended before Redis was killed"
        return load

    load = asyncio.run(scenario())
    assert load.failures == []
    after = cache_stats(cluster)
    assert after.hits > before.hits  # Redis really served before it died
    assert after.errors > before.errors  # and its death was noticed, not felt


def test_redis_answering_slowly_fails_nothing(cluster: dict[str, Any]) -> None:
    redis: RedisServer = cluster["redis"]
    redis_up(redis)
    wait_until(
        lambda: cache_stats(cluster).breaker_state == "closed" or _probe(cluster), 30, "breaker closed"
    )
    before = cache_stats(cluster)

    async def scenario() -> Load:
        async with cached_load(cluster, concurrency=6, limit=3000) as load:
            await load.until(100)
            assert redis.proc is not None
            redis.proc.send_signal(signal.SIGSTOP)  # every call now runs into the 100 ms timeout
            try:
                await load.until(300)
            finally:
                redis.proc.send_signal(signal.SIGCONT)
            await load.until(50)
        return load

    load = asyncio.run(scenario())
    assert load.failures == []
    assert cache_stats(cluster).errors > before.errors


def _probe(cluster: dict[str, Any]) -> bool:
    with grpc.insecure_channel(cluster["gateway"].address) as ch:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(mlp_request(1, seed=1), timeout=10)
    return False


# -- the gateway's own limits and the no-worker answer -------------------------------------------
def held_request(rows: int, seed: int) -> pb.ModelInferRequest:
    """A request to the held model: it waits in the worker until a whole batch is queued."""
    x = np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)
    return build_request("held", {"input": x}, parameters={"ferry_cache": False})


def test_overload_answers_resource_exhausted_fast(cluster: dict[str, Any]) -> None:
    port = free_port()
    gateway = start_gateway(
        cluster["workers"], "--max-in-flight", "2", "--no-coalesce", "--metrics-port", str(port)
    )
    try:

        async def scenario() -> tuple[grpc.aio.AioRpcError, list[Any], pb.ModelInferResponse]:
            async with grpc.aio.insecure_channel(gateway.address) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                held = [
                    asyncio.ensure_future(stub.ModelInfer(held_request(1, n), timeout=60)) for n in range(2)
                ]
                await until_metric(port, "ferry_gateway_in_flight", 2)  # the gateway is full
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ModelInfer(mlp_request(1), timeout=10)
                for call in held:
                    call.cancel()
                gone = await asyncio.gather(*held, return_exceptions=True)
                await until_metric(port, "ferry_gateway_in_flight", 0)  # callers that left free their places
                return refused.value, gone, await stub.ModelInfer(mlp_request(1), timeout=10)

        refused, gone, admitted = asyncio.run(scenario())
    finally:
        gateway.stop()
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.details() == (
        "gateway overloaded: 2 requests in flight (limit 2); retry later or on another replica"
    )
    assert all(isinstance(g, asyncio.CancelledError) for g in gone), gone
    assert admitted.outputs[0].shape == [1, 3]


def test_the_callers_deadline_holds_through_the_gateway(cluster: dict[str, Any]) -> None:
    with grpc.insecure_channel(cluster["gateway"].address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:  # one row of a held model waits for seven more
            stub.ModelInfer(held_request(1, seed=1), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stub.ModelInfer(held_request(HELD_ROWS, seed=2), timeout=60).outputs[0].shape == [HELD_ROWS, 3]


def test_no_healthy_worker_is_unavailable_with_a_message() -> None:
    nobody = f"127.0.0.1:{free_port()}"
    gateway = ServiceProcess(
        [
            sys.executable,
            "-m",
            "ferry.cli.main",
            "serve",
            "gateway",
            "--workers",
            nobody,
            "--port",
            "0",
            "--http-port",
            "0",
            "--host",
            "127.0.0.1",
            "--startup-wait-s",
            "0.2",
        ]
    ).start()
    try:
        with grpc.insecure_channel(gateway.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(mlp_request(1), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == f"no healthy worker: 0 of 1 known workers are serving ({nobody})"
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gateway.stop()


# -- workers dying and draining ------------------------------------------------------------------
def test_worker_drained_with_sigterm_under_load_fails_nothing(own_cluster: dict[str, Any]) -> None:
    cluster = own_cluster
    victim: ServiceProcess = cluster["workers"][1]

    async def scenario() -> Load:
        async with uncached_load(cluster, concurrency=8, limit=2000) as load:
            await load.until(100)
            victim.signal(signal.SIGTERM)
            await load.until(200)
        return load

    load = asyncio.run(scenario())
    assert victim.wait(30) == 0, victim.output()[-2000:]  # a drained worker exits cleanly
    assert load.failures == []


def test_worker_killed_with_sigkill_under_load_fails_nothing(own_cluster: dict[str, Any]) -> None:
    cluster = own_cluster
    victim: ServiceProcess = cluster["workers"][0]
    survivor: ServiceProcess = cluster["workers"][1]

    async def scenario() -> Load:
        async with uncached_load(cluster, concurrency=8, limit=2000) as load:
            await load.until(100)
            victim.signal(signal.SIGKILL)
            await load.until(300)
        return load

    load = asyncio.run(scenario())
    assert load.failures == []
    workers = (
        admin(cluster["gateway"].address).ListWorkers(admin_pb2.ListWorkersRequest(), timeout=10).workers
    )
    serving = {w.address for w in workers if w.serving}
    assert serving == {survivor.address}
