"""Grey failures through the gateway, measured: a frozen worker under load, and the cost of hedging.

    python -m benchmarks.grey                       # both measurements, gateway defaults
    python -m benchmarks.grey --freeze-s 4 --lanes 16 --deadline-s 2
    python -m benchmarks.grey --skip-hedge --gateway-arg=--try-timeout-ms=0

*freeze*: two workers behind one gateway (result cache off), ``lanes`` closed-loop callers with a
``deadline_s`` deadline each; after a warm-up one worker is SIGSTOPped for ``freeze_s`` seconds,
then resumed. It prints how many requests failed (by status) and the latency p50/p99.
*hedge*: the same healthy fleet, throughput with hedging off and then on (``--hedge-delay-ms``),
one run each, and their ratio. Extra ``--gateway-arg`` flags go to every gateway started, so the
same script measures the gateway before and after a change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.models import INPUT_NAME, prepare
from benchmarks.procs import ServerProcess
from benchmarks.stats import percentile
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc


@dataclass
class Tally:
    """Outcomes of one load: answers, failures by status, latencies of the answered."""

    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)

    def summary(self, seconds: float) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "ok": self.ok,
            "failed": sum(self.failed.values()),
            "failed_by_status": dict(self.failed),
            "requests_per_s": round(self.ok / seconds, 1) if seconds > 0 else 0.0,
            "p50_ms": round(percentile(lat, 50) * 1000, 2) if lat else None,
            "p99_ms": round(percentile(lat, 99) * 1000, 2) if lat else None,
            "max_ms": round(lat[-1] * 1000, 2) if lat else None,
        }


def requests(pool: np.ndarray) -> list[pb.ModelInferRequest]:
    out = []
    for row in pool:
        req = pb.ModelInferRequest(model_name="mlp")
        req.parameters["ferry_cache"].bool_param = False
        req.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[1, *row.shape])
        req.raw_input_contents.append(np.ascontiguousarray(row[None]).tobytes())
        out.append(req)
    return out


async def load(
    address: str,
    reqs: Sequence[pb.ModelInferRequest],
    lanes: int,
    deadline_s: float,
    stop: asyncio.Event,
    tally: Tally,
) -> None:
    """``lanes`` closed-loop callers until ``stop`` (set by the caller after a fixed time)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def lane(n: int) -> None:
            i = n
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    await stub.ModelInfer(reqs[i % len(reqs)], timeout=deadline_s)
                    tally.ok += 1
                    tally.latencies_s.append(time.perf_counter() - started)
                except grpc.aio.AioRpcError as err:
                    tally.failed[err.code().name] += 1
                i += lanes

        await asyncio.gather(*(lane(n) for n in range(lanes)))


def start_fleet(store: Path, gateway_args: Sequence[str]) -> list[ServerProcess]:
    procs: list[ServerProcess] = []
    try:
        for n in range(2):
            procs.append(
                ServerProcess.ferry(f"worker-{n + 1}", "worker", "--store", str(store), "--port", "0").start()
            )
        workers = ",".join(p.address for p in procs)
        procs.append(
            ServerProcess.ferry(
                "gateway", "gateway", "--workers", workers, "--port", "0", "--http-port", "0",
                "--no-cache-enabled", "--index-interval-s", "0.2", *gateway_args,
            ).start()
        )  # fmt: skip
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise
    return procs


async def freeze(args: argparse.Namespace, store: Path, reqs: list[pb.ModelInferRequest]) -> dict[str, Any]:
    procs = start_fleet(store, args.gateway_arg)
    victim, gateway = procs[0], procs[-1]
    try:
        stop = asyncio.Event()
        tally = Tally()
        started = time.perf_counter()
        task = asyncio.ensure_future(load(gateway.address, reqs, args.lanes, args.deadline_s, stop, tally))
        await asyncio.sleep(args.warmup_s)
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(args.freeze_s)
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(args.after_s)
        stop.set()
        await task
        return {
            "scenario": "freeze",
            "freeze_s": args.freeze_s,
            **tally.summary(time.perf_counter() - started),
        }
    finally:
        for p in reversed(procs):
            p.stop()


async def hedge(args: argparse.Namespace, store: Path, reqs: list[pb.ModelInferRequest]) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": "hedge_overhead", "hedge_delay_ms": args.hedge_delay_ms}
    for label, delay in (("off", 0), ("on", args.hedge_delay_ms)):
        procs = start_fleet(store, [*args.gateway_arg, "--hedge-delay-ms", str(delay)])
        try:
            stop = asyncio.Event()
            warm, tally = Tally(), Tally()
            task = asyncio.ensure_future(
                load(procs[-1].address, reqs, args.lanes, args.deadline_s, stop, warm)
            )
            await asyncio.sleep(args.warmup_s)
            # count only the measured window: swap in a fresh tally the lanes add to from now on
            tally.ok, tally.latencies_s, mark = -warm.ok, warm.latencies_s, len(warm.latencies_s)
            started = time.perf_counter()
            await asyncio.sleep(args.hedge_s)
            tally.ok += warm.ok
            seconds = time.perf_counter() - started
            stop.set()
            await task
            tally.latencies_s = warm.latencies_s[mark : mark + tally.ok]
            tally.failed = warm.failed
            out[label] = tally.summary(seconds)
        finally:
            for p in reversed(procs):
                p.stop()
    out["throughput_on_over_off"] = round(
        out["on"]["requests_per_s"] / max(out["off"]["requests_per_s"], 1e-9), 3
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grey", description=__doc__.split("\n")[0])
    parser.add_argument("--lanes", type=int, default=16)
    parser.add_argument("--deadline-s", type=float, default=2.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--freeze-s", type=float, default=4.0)
    parser.add_argument("--after-s", type=float, default=2.0)
    parser.add_argument("--hedge-s", type=float, default=6.0)
    parser.add_argument("--hedge-delay-ms", type=int, default=20)
    parser.add_argument("--skip-freeze", action="store_true")
    parser.add_argument("--skip-hedge", action="store_true")
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeat)")
    parser.add_argument("--store", type=Path, default=None, help="reuse a store (the model is exported once)")
    args = parser.parse_args(argv)
    store = args.store or Path(tempfile.mkdtemp(prefix="ferry-grey-"))
    model = prepare("mlp", store)
    reqs = requests(model.pool)
    results = []
    if not args.skip_freeze:
        results.append(asyncio.run(freeze(args, store, reqs)))
        print(json.dumps(results[-1]), flush=True)
    if not args.skip_hedge:
        results.append(asyncio.run(hedge(args, store, reqs)))
        print(json.dumps(results[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
