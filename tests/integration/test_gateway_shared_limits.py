"""Two real gateways on one Redis enforce one rate per key; with Redis gone each counts alone.

The rate is measured, not timed: calls alternate between the two gateways for a bounded time
and count, and the admitted total is compared with what one bucket would admit in that time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.core.auth import hash_key
from tests.integration.test_gateway import start_gateway, start_workers, wait_until
from tests.support.deps import require_binary
from tests.support.models import export_mlp, publish
from tests.support.procs import RedisServer, ServiceProcess

require_binary("redis-server")

KEY, RATE, BURST = "shared-limit-secret", 10.0, 5.0
BEARER = (("authorization", f"Bearer {KEY}"),)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("store")
    publish(root, "mlp", 1, export_mlp(tmp_path_factory.mktemp("onnx") / "mlp.onnx"))
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    entry = {"name": "metered", "sha256": hash_key(KEY), "rate_per_s": RATE, "burst": BURST}
    keys.write_text(json.dumps({"keys": [entry]}))
    redis = RedisServer().start()
    procs: list[ServiceProcess] = []
    try:
        procs += start_workers(root, 1)
        common = ["--redis-url", redis.url, "--api-keys-file", str(keys), "--cache-timeout-ms", "200"]
        gateways = [start_gateway(procs[:1], *common) for _ in range(2)]
        procs += gateways
        yield {"gateways": gateways, "redis": redis}
    finally:
        for p in reversed(procs):
            p.stop()
        redis.stop()


def _hammer(stubs: list[Any], seconds: float, limit: int = 2000) -> tuple[int, int, set[str], float]:
    """Alternate calls over the stubs; (admitted, refused, other codes seen, elapsed)."""
    admitted = refused = 0
    other: set[str] = set()
    start = time.monotonic()
    for n in range(limit):
        if time.monotonic() - start > seconds:
            break
        try:
            stubs[n % len(stubs)].ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=5, metadata=BEARER)
            admitted += 1
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refused += 1
            else:
                other.add(err.code().name)
    return admitted, refused, other, time.monotonic() - start


def test_two_gateways_share_one_rate_then_fall_back_when_redis_dies(fleet: dict[str, Any]) -> None:
    channels = [grpc.insecure_channel(g.address) for g in fleet["gateways"]]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in channels]
        for stub in stubs:
            wait_until(lambda s=stub: s.ServerReady(pb.ServerReadyRequest(), timeout=5).ready, 30, "ready")
        time.sleep(BURST / RATE + 0.2)  # a full bucket to start from
        admitted, refused, other, elapsed = _hammer(stubs, 2.0)
        one_bucket = BURST + RATE * elapsed
        print(f"shared: admitted {admitted} of {admitted + refused} in {elapsed:.2f}s; "
              f"one bucket allows {one_bucket:.1f}, two would allow {2 * one_bucket:.1f}")  # fmt: skip
        assert other == set()
        assert refused > 0
        assert 0.6 * one_bucket <= admitted <= 1.3 * one_bucket + 2  # one rate, not two

        fleet["redis"].stop()
        admitted, refused, other, elapsed = _hammer(stubs, 2.0)
        assert other == set(), "no call may fail because Redis is gone"
        assert admitted > 0 and refused > 0  # each replica still limits, on its own
        assert admitted <= 2 * (BURST + RATE * elapsed) * 1.3 + 2
        logs = "".join("".join(g.lines) for g in fleet["gateways"])
        assert "rate limits: Redis unreachable, each replica now counts on its own" in logs
        assert KEY not in logs
    finally:
        for ch in channels:
            ch.close()
