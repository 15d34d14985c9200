"""Throughput through the gateway vs straight to a worker, measured in one run.

    python -m gateway.bench --worker 127.0.0.1:8001 --gateway 127.0.0.1:8000 --model mlp \
        --input-shape 1,8 --seconds 5 --concurrency 16

Three phases against the same worker: direct (distinct requests), gateway with
the cache opted out per request (``ferry_cache`` false: every request goes
upstream, coalesced), and gateway with every request a cache hit (a small set
of requests, warmed first). Prints one JSON line per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client._channel import DEFAULT_OPTIONS
from ferry.client.inference import build_request


async def measure(
    address: str,
    make: Callable[[int], pb.ModelInferRequest],
    seconds: float,
    concurrency: int,
    channels: int = 4,
) -> dict[str, float]:
    chans = [grpc.aio.insecure_channel(address, options=DEFAULT_OPTIONS) for _ in range(channels)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in chans]
    latencies: list[float] = []
    failures = 0
    stop = time.perf_counter() + seconds

    async def caller(n: int) -> None:
        nonlocal failures
        stub = stubs[n % len(stubs)]
        i = 0
        while time.perf_counter() < stop:
            req = make(n * 1_000_000 + i)
            t0 = time.perf_counter()
            try:
                await stub.ModelInfer(req, timeout=30)
                latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError:
                failures += 1
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - start
    for c in chans:
        await c.close()
    lat = np.array(latencies or [0.0])
    return {
        "requests": len(latencies),
        "failures": failures,
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 2),
    }


async def run(
    worker: str, gateway: str, model: str, shape: Sequence[int], seconds: float, concurrency: int
) -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal(shape).astype(np.float32) for _ in range(256)]

    def distinct(n: int, **params: bool) -> pb.ModelInferRequest:
        x = pool[n % len(pool)] + np.float32(n)  # a new tensor each time: nothing repeats
        return build_request(model, {"input": x}, parameters=params or None)

    def hot(n: int) -> pb.ModelInferRequest:
        return build_request(model, {"input": pool[n % 32]})

    for n in range(32):  # warm the cache
        async with grpc.aio.insecure_channel(gateway) as ch:
            await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(hot(n), timeout=30)
    phases = [
        ("direct to one worker", worker, lambda n: distinct(n)),
        ("gateway, cache off", gateway, lambda n: distinct(n, ferry_cache=False)),
        ("gateway, all cache hits", gateway, hot),
    ]
    out: list[dict[str, object]] = []
    for name, address, make in phases:
        result: dict[str, object] = {"phase": name, "concurrency": concurrency}
        result |= await measure(address, make, seconds, concurrency)
        out.append(result)
        print(json.dumps(result), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench", description=__doc__)
    parser.add_argument("--worker", required=True)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--input-shape", default="1,8")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    shape = [int(d) for d in args.input_shape.split(",")]
    asyncio.run(run(args.worker, args.gateway, args.model, shape, args.seconds, args.concurrency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
