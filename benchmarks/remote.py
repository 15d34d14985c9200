"""Throughput through a running gateway vs straight to a running worker, in one run.

    python -m benchmarks.remote --worker 127.0.0.1:8011 --gateway 127.0.0.1:8001 --model mlp \
        --input-shape 1,8 --seconds 5 --concurrency 16

Unlike ``ferry bench``, which starts its own servers, this measures a deployment that
is already up. Three phases against the same worker, each a closed loop of
``benchmarks.loadgen``: direct to the worker, gateway with the cache opted out per
request (``ferry_cache`` false: every request goes upstream, coalesced), and gateway
with every request a cache hit (a small set of requests, warmed first). The worker's
own answers, fetched once before the phases, are the reference every answer is
checked against. Prints one JSON line per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.loadgen import closed_loop
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client._channel import open_channel
from ferry.client.inference import build_request

POOL = 256  # distinct inputs of the direct and cache-off phases
HOT = 32  # inputs of the all-hits phase


def _requests(model: str, pool: np.ndarray, **params: bool) -> list[pb.ModelInferRequest]:
    return [
        build_request(model, {"input": pool[i]}, parameters=params or None, request_id=str(i))
        for i in range(len(pool))
    ]


def _output(response: pb.ModelInferResponse) -> np.ndarray:
    out = response.outputs[0]
    if out.datatype != "FP32" or not response.raw_output_contents:
        raise SystemExit(f"error: the worker answered {out.datatype} (not raw FP32); cannot check answers")
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(out.shape))


async def reference(stub: Any, requests: Sequence[pb.ModelInferRequest]) -> np.ndarray:
    """The worker's answer to each request, stacked along the batch axis."""
    return np.concatenate([_output(await stub.ModelInfer(r, timeout=30)) for r in requests])


async def run(
    worker: str,
    gateway: str,
    model: str,
    shape: Sequence[int],
    seconds: float,
    concurrency: int,
    channels: int = 4,
    warmup_s: float = 0.5,
) -> list[dict[str, Any]]:
    if not shape or shape[0] != 1:
        raise SystemExit(f"error: --input-shape must be one batch-1 row (1,...), got {list(shape)}")
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((POOL, *shape)).astype(np.float32)
    # A local subchannel pool gives each channel its own TCP connection.
    local = [("grpc.use_local_subchannel_pool", 1)]
    chans = {a: [open_channel(a, options=local) for _ in range(channels)] for a in (worker, gateway)}
    stubs = {a: [pb_grpc.GRPCInferenceServiceStub(c) for c in cs] for a, cs in chans.items()}
    try:
        direct = _requests(model, pool)
        expected = await reference(stubs[worker][0], direct)
        hot = direct[:HOT]
        for request in hot:  # warm the gateway's cache
            await stubs[gateway][0].ModelInfer(request, timeout=30)
        phases = [
            ("direct to one worker", worker, direct, expected),
            ("gateway, cache off", gateway, _requests(model, pool, ferry_cache=False), expected),
            ("gateway, all cache hits", gateway, hot, expected[:HOT]),
        ]
        out: list[dict[str, Any]] = []
        for name, address, requests, want in phases:
            window = await closed_loop(
                stubs[address],
                requests,
                want,
                concurrency=concurrency,
                warmup_s=warmup_s,
                duration_s=seconds,
            )
            w = window.as_dict()
            result: dict[str, Any] = {"phase": name, "concurrency": concurrency}
            result |= {
                "requests": w["requests"],
                "failures": w["errors"],
                "wrong": w["wrong"],
                "hits": w["hits"],
                "rps": round(w["throughput"], 1),
                "p50_ms": round(w["p50_ms"], 2),
                "p99_ms": round(w["p99_ms"], 2),
            }
            out.append(result)
            print(json.dumps(result), flush=True)
        return out
    finally:
        for cs in chans.values():
            for c in cs:
                await c.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remote", description=__doc__)
    parser.add_argument("--worker", required=True, help="a running worker's address")
    parser.add_argument("--gateway", required=True, help="a running gateway's address, in front of it")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--input-shape", default="1,8", help="one request's input shape (batch 1)")
    parser.add_argument("--seconds", type=float, default=5.0, help="recorded seconds per phase")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    shape = [int(d) for d in args.input_shape.split(",")]
    results = asyncio.run(run(args.worker, args.gateway, args.model, shape, args.seconds, args.concurrency))
    return 1 if any(r["failures"] or r["wrong"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
