"""The result cache on a Sentinel-watched Redis, and the near cache across a version roll-out.

Real redis-server processes: a master, a replica and three sentinels on loopback ports.
The master is killed under a bounded load through the gateway: no request fails, the
cache errors and the breaker's open and close show in the metrics, and hits come back
from the promoted replica. Two gateway replicas with near caches in front of that Redis
then see a new model version roll out: neither ever answers with the old version's result.
The cache and the shared rate limiter also run on a real three-node Redis Cluster.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry._proto.ferry.v1 import admin_pb2, admin_pb2_grpc
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.core import codec
from gateway.cache import RedisBackend, ResultCache
from gateway.near_cache import NearCache
from gateway.ratelimit import SharedLimiter
from tests.integration.test_gateway import (
    OUTLAST,
    Load,
    mlp_request,
    start_gateway,
    start_workers,
    wait_until,
)
from tests.support.deps import require_binary
from tests.support.models import export_mlp, ort_run, publish
from tests.support.procs import ClusterSet, SentinelSet, ServiceProcess, free_port

pytestmark = pytest.mark.solo  # its own Redis set, cluster, workers and gateways: the file-order pass only

SEEDS = 16  # distinct requests in the load: once stored, every answer is a hit
RECOVERY_DEADLINE_S = 60.0  # generous: measured failovers take about 3 s (docs/gateway.md)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    return {"v1": export_mlp(d / "v1.onnx"), "v2": export_mlp(d / "v2.onnx", seed=1)}


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory, onnx_files: dict[str, Path]) -> Iterator[dict[str, Any]]:
    require_binary("redis-server")
    store = tmp_path_factory.mktemp("store")
    publish(store, "mlp", 1, onnx_files["v1"], {"max_batch_size": 64})
    publish(store, "roll", 1, onnx_files["v1"], {"max_batch_size": 64})
    redis = SentinelSet(tmp_path_factory.mktemp("sentinel")).start()
    workers: list[ServiceProcess] = []
    try:
        workers = start_workers(store, 1)
        yield {"redis": redis, "workers": workers, "store": store}
    finally:
        for w in workers:
            w.stop()
        redis.stop()


def admin_stats(address: str) -> admin_pb2.CacheStatsResponse:
    with grpc.insecure_channel(address) as ch:
        stub = admin_pb2_grpc.GatewayAdminStub(ch)
        return stub.CacheStats(admin_pb2.CacheStatsRequest(), timeout=10)


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def series(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def is_hit(resp: pb.ModelInferResponse) -> bool:
    return "ferry_cache_hit" in resp.parameters and resp.parameters["ferry_cache_hit"].bool_param


def test_master_killed_under_load_fails_nothing_and_hits_return_from_the_new_master(
    ha: dict[str, Any],
) -> None:
    redis: SentinelSet = ha["redis"]
    metrics_port = free_port()
    gateway = start_gateway(
        ha["workers"],
        "--redis-url",
        redis.url,
        "--cache-timeout-ms",
        "200",
        "--breaker-reset-s",
        "0.3",
        "--metrics-port",
        str(metrics_port),
        # no near cache: every request asks Redis, so its death shows at once
        "--cache-near-bytes",
        "0",
    )
    address = gateway.address
    try:
        before = scrape(metrics_port)

        async def scenario() -> tuple[Load, float, str]:
            make = lambda n: mlp_request(1, seed=n % SEEDS)  # noqa: E731
            async with Load(address, make, concurrency=6, limit=OUTLAST) as load:
                deadline = time.monotonic() + 30
                while admin_stats(address).hits < 50 and time.monotonic() < deadline:
                    await load.until(20, timeout=10)
                assert admin_stats(address).hits >= 50, "Redis never served before the kill"
                old_master = redis.master.port
                errors = admin_stats(address).errors
                redis.master.stop()  # SIGKILL
                killed = time.monotonic()
                deadline = killed + RECOVERY_DEADLINE_S
                while admin_stats(address).errors == errors and time.monotonic() < deadline:
                    await load.until(5, timeout=5)
                s = admin_stats(address)
                dead = s.hits  # from here on, no hit can come from the old master
                while time.monotonic() < deadline:
                    s = admin_stats(address)
                    if s.hits > dead + 20 and s.breaker_state == "closed":
                        break
                    await load.until(10, timeout=5)
                recovered = time.monotonic() - killed
                seen = (
                    f"hits {s.hits} (at the kill's first error {dead}), errors {s.errors}, breaker "
                    f"{s.breaker_state}, sentinels' master {redis.master_port()} (was {old_master}), "
                    f"{load.ok} answers, load {'still running' if load.running else 'ended'}"
                )
                assert load.running, f"the load ended before the failover did: {seen}"
                await load.until(100, timeout=30)
                assert redis.master_port() == redis.replica.port != old_master
            return load, recovered, seen

        load, recovered, seen = asyncio.run(scenario())
        after_stats = admin_stats(address)
        after = scrape(metrics_port)
    finally:
        gateway.stop()
    print(f"hits again from the new master {recovered:.1f} s after the kill")
    assert load.failures == [] and load.ok > 0
    assert recovered < RECOVERY_DEADLINE_S, f"no hits from the promoted replica: {seen}"
    assert after_stats.breaker_state == "closed" and after_stats.hits > 0
    grew = lambda name, **kw: series(after, name, **kw) - series(before, name, **kw)  # noqa: E731
    assert grew("ferry_gateway_cache_errors_total", op="get") > 0
    assert grew("ferry_gateway_cache_breaker_transitions_total", state="open") >= 1
    assert grew("ferry_gateway_cache_breaker_transitions_total", state="closed") >= 1
    assert grew("ferry_gateway_cache_level_hits_total", level="redis") > 0
    assert series(after, "ferry_gateway_cache_breaker_state") == 0


def test_a_version_rollout_never_serves_an_old_answer_from_any_replicas_near_cache(
    ha: dict[str, Any], onnx_files: dict[str, Path]
) -> None:
    redis: SentinelSet = ha["redis"]
    near = ("--redis-url", redis.url, "--cache-timeout-ms", "1000", "--cache-near-bytes", str(1 << 20))
    ports = [free_port(), free_port()]
    replicas = [start_gateway(ha["workers"], *near, "--metrics-port", str(port)) for port in ports]
    seeds = 8
    inputs = [np.random.default_rng(s).standard_normal((1, 8)).astype(np.float32) for s in range(seeds)]
    want = {v: [ort_run(onnx_files[f"v{v}"], x) for x in inputs] for v in (1, 2)}
    try:
        # both replicas hold every v1 answer in their near caches before the roll-out
        for gw in replicas:
            for s in range(seeds):
                wait_until(lambda a=gw.address, s=s: is_hit(infer(a, s)), 20, "a v1 answer in the cache")
        for gw, port in zip(replicas, ports, strict=True):  # and answer them from there, not Redis
            before = cache_stats(gw.address)
            assert all(is_hit(infer(gw.address, s)) for s in range(seeds))
            after = cache_stats(gw.address)
            assert after.hits - before.hits == after.near_hits - before.near_hits == seeds
            assert after.near_entries >= seeds and after.near_bytes > 0 and after.near_evictions == 0
            assert series(scrape(port), "ferry_gateway_cache_level_hits_total", level="near") >= seeds

        async def scenario() -> tuple[list[Load], float]:
            make = lambda n: mlp_request(1, seed=n % seeds, model="roll")  # noqa: E731
            loads = [Load(gw.address, make, concurrency=3, limit=OUTLAST) for gw in replicas]
            for load in loads:
                await load.__aenter__()
            try:
                await loads[0].until(50)
                publish(ha["store"], "roll", 2, onnx_files["v2"])
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline and not all(v2_only(gw.address) for gw in replicas):
                    await asyncio.sleep(0.05)
                switched = time.monotonic()
                for load in loads:
                    await load.until(60)
            finally:
                for load in loads:
                    await load.__aexit__(None, None, None)
            return loads, switched

        loads, switched = asyncio.run(scenario())
    finally:
        for gw in replicas:
            gw.stop()
    for load in loads:
        assert load.failures == []
        late = [r for t, r in load.responses if t > switched]
        assert late and all(r.model_version == "2" for r in late)
        for _, r in load.responses:  # every answer is its own version's result, hit or not
            x = codec.decode_outputs(r)["output"]
            assert any(np.allclose(x, w, rtol=1e-4, atol=1e-5) for w in want[int(r.model_version)])
            assert not any(np.allclose(x, w, rtol=1e-4, atol=1e-5) for w in want[3 - int(r.model_version)])
    assert any(is_hit(r) for load in loads for t, r in load.responses if t > switched)


def cache_stats(address: str) -> admin_pb2.CacheStatsResponse:
    with grpc.insecure_channel(address) as ch:
        return admin_pb2_grpc.GatewayAdminStub(ch).CacheStats(admin_pb2.CacheStatsRequest(), timeout=10)


def infer(address: str, seed: int) -> pb.ModelInferResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
            mlp_request(1, seed=seed, model="roll"), timeout=10
        )


def v2_only(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        meta = pb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(
            pb.ModelMetadataRequest(name="roll"), timeout=10
        )
    return list(meta.versions) == ["2"]


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_binary("redis-cli")
    cluster = ClusterSet(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_cache_and_shared_rate_limits_take_every_url_kind(
    kind: str, ha: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    """One helper builds both clients, so whatever URL the cache takes, the rate limiter takes too."""
    url = ha["redis"].url if kind == "sentinel" else request.getfixturevalue("cluster_url")

    async def scenario() -> tuple[list[bytes | None], list[bytes | None], list[bool], bool]:
        cache = ResultCache(RedisBackend(url, 2.0), timeout_s=2.0, near=NearCache(1 << 20), ttl_s=30)
        answers = [
            (f"ferry:v1:m:1:{kind}{n:060x}", pb.ModelInferResponse(id=str(n)).SerializeToString())
            for n in range(40)
        ]
        await cache.set_many(answers)  # 40 keys over every slot range: one pipeline, split by node
        cache.near.clear()  # type: ignore[union-attr]
        keys = [k for k, _ in answers]
        from_redis = await cache.get_many([*keys, "ferry:v1:m:1:absent"])
        from_near = [cache.get_local(k) for k in keys]
        await cache.close()
        limiter = SharedLimiter(url, timeout_s=2.0)
        taken = [await limiter.take(f"key-{kind}", 0.01, 3) for _ in range(4)]
        shared = limiter.shared
        await limiter.close()
        return from_redis, from_near, taken, shared

    from_redis, from_near, taken, shared = asyncio.run(scenario())
    want = [pb.ModelInferResponse(id=str(n)).SerializeToString() for n in range(40)]
    assert from_redis == [*want, None]
    assert from_near == want  # Redis hits were copied to the near cache
    assert taken == [True, True, True, False] and shared
