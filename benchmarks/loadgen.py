"""The closed-loop load generator: ``concurrency`` asyncio tasks, each sending its next
request as soon as the previous answer arrives.

The client is kept cheap so that it measures the server, not itself: requests are
pre-built protobufs sent through the raw generated stub (no numpy on the way out),
and each answer is checked against the in-process ONNX Runtime reference by a
byte comparison first (tolerance only when a batched run rounded differently).
A point runs ``warmup_s`` unrecorded, then records for ``duration_s`` or until
``max_requests`` answers, whichever comes first. Around the recorded window it
samples CPU times of the client and of every server process, and the worker's
ModelStatistics (for the mean executed batch size).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import psutil

from benchmarks.stats import check_output, cpu_us_per_request, latency_summary, mean_batch
from ferry._proto.inference import grpc_service_pb2 as pb

HIT_PARAMETER = "ferry_cache_hit"
StatsFn = Callable[[], Awaitable[tuple[int, int]]]


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


@dataclass
class Window:
    """What one recorded window measured (the bench adds model, scenario and concurrency)."""

    requests: int = 0
    seconds: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    checked: int = 0
    wrong: int = 0
    first_wrong: str | None = None
    hits: int = 0
    mean_batch: float = math.nan
    client_cpu_us: float = math.nan
    server_cpu_us: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "throughput": self.requests / self.seconds if self.seconds > 0 else 0.0,
            **latency_summary(self.latencies_ns),
            "errors": sum(self.errors.values()),
            "error_codes": dict(self.errors),
            "checked": self.checked,
            "wrong": self.wrong,
            "first_wrong": self.first_wrong,
            "hits": self.hits,
            "mean_batch": self.mean_batch,
            "client_cpu_us": self.client_cpu_us,
            "server_cpu_us_by_process": self.server_cpu_us,
            "server_cpu_us": sum(self.server_cpu_us.values()) if self.server_cpu_us else math.nan,
        }
        return out


class Checker:
    """Compares answers with the reference rows, counting checked and wrong ones."""

    def __init__(self, expected: np.ndarray) -> None:
        self.rows = [expected[i : i + 1] for i in range(len(expected))]
        self.raw = [r.tobytes() for r in self.rows]

    def check(self, window: Window, index: int, response: pb.ModelInferResponse) -> None:
        window.checked += 1
        raws = response.raw_output_contents
        if raws and raws[0] == self.raw[index] and len(response.outputs) == 1:
            out = response.outputs[0]
            if out.datatype == "FP32" and len(out.shape) == 2 and out.shape[0] == 1:
                return
        problem = "no raw output"
        if raws and response.outputs:
            out = response.outputs[0]
            problem = check_output(raws[0], list(out.shape), out.datatype, self.rows[index])
        if problem is not None:
            window.wrong += 1
            window.first_wrong = window.first_wrong or f"input {index}: {problem}"


async def closed_loop(
    stubs: Sequence[Any],
    requests: Sequence[pb.ModelInferRequest],
    expected: np.ndarray,
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    max_requests: int = 0,
    server_pids: dict[str, int] | None = None,
    stats: StatsFn | None = None,
    timeout_s: float = 30.0,
    on_tick: Callable[[Window, float], None] | None = None,
    tick_s: float = 0.0,
) -> Window:
    """Run one point; ``requests[i]`` must answer ``expected[i]``."""
    checker = Checker(expected)
    window = Window()
    me = psutil.Process()
    servers = {name: psutil.Process(pid) for name, pid in (server_pids or {}).items()}
    state = {"recording": False, "stop": False, "start": 0, "end": 0}
    done = asyncio.Event()
    n = len(requests)

    async def one_task(k: int) -> None:
        stub = stubs[k % len(stubs)]
        i = k
        while not state["stop"]:
            index = i % n
            i += concurrency
            t0 = time.perf_counter_ns()
            try:
                response = await stub.ModelInfer(requests[index], timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                if state["recording"]:
                    window.errors[err.code().name] += 1
                await asyncio.sleep(0.005)
                continue
            t1 = time.perf_counter_ns()
            if state["recording"] and t0 >= state["start"]:
                window.latencies_ns.append(t1 - t0)
                window.requests += 1
                checker.check(window, index, response)
                if response.parameters and HIT_PARAMETER in response.parameters:
                    window.hits += int(response.parameters[HIT_PARAMETER].bool_param)
                if max_requests and window.requests >= max_requests:
                    done.set()

    tasks = [asyncio.create_task(one_task(k)) for k in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        stats_before = await stats() if stats else None
        cpu_before = cpu_seconds(me)
        server_before = {name: cpu_seconds(p) for name, p in servers.items()}
        state["start"] = time.perf_counter_ns()
        state["recording"] = True
        deadline = time.monotonic() + duration_s
        while not done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            step = min(left, tick_s) if tick_s > 0 else left
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), step)
            if on_tick is not None:
                on_tick(window, (time.perf_counter_ns() - state["start"]) / 1e9)
        state["recording"] = False
        end = time.perf_counter_ns()
        cpu_after = cpu_seconds(me)
        server_after = {name: cpu_seconds(p) for name, p in servers.items()}
        state["stop"] = True
        stats_after = await stats() if stats else None
    finally:
        state["stop"] = True
        await asyncio.gather(*tasks, return_exceptions=True)
    window.seconds = (end - state["start"]) / 1e9
    window.client_cpu_us = cpu_us_per_request(cpu_before, cpu_after, window.requests)
    window.server_cpu_us = {
        name: cpu_us_per_request(server_before[name], server_after[name], window.requests) for name in servers
    }
    if stats_before is not None and stats_after is not None:
        window.mean_batch = mean_batch(stats_before, stats_after)
    return window


def in_process(
    session: Any,
    pool: np.ndarray,
    expected: np.ndarray,
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    max_requests: int = 0,
    input_name: str = "input",
    output_name: str = "output",
) -> Window:
    """The limit: ONNX Runtime called in this process with no transport at all.

    At concurrency c the ideal server would run every c waiting requests as one
    batch, so this runs batches of c rows back to back: throughput is rows per
    second and latency is one batch's run time.
    """
    rows = np.resize(np.arange(len(pool)), concurrency)
    feeds = {input_name: np.ascontiguousarray(pool[rows])}
    want = expected[rows]
    window = Window(mean_batch=float(concurrency))
    me = psutil.Process()
    end_warm = time.monotonic() + warmup_s
    while time.monotonic() < end_warm:
        session.run([output_name], feeds)
    cpu_before = cpu_seconds(me)
    start = time.perf_counter_ns()
    deadline = start + int(duration_s * 1e9)
    while True:
        t0 = time.perf_counter_ns()
        (out,) = session.run([output_name], feeds)
        t1 = time.perf_counter_ns()
        window.latencies_ns.append(t1 - t0)
        window.requests += concurrency
        window.checked += concurrency
        if not np.allclose(out, want, rtol=1e-4, atol=1e-5):
            window.wrong += concurrency
            window.first_wrong = window.first_wrong or "in-process batch differs from batch-1 reference"
        if t1 >= deadline or (max_requests and window.requests >= max_requests):
            break
    window.seconds = (time.perf_counter_ns() - start) / 1e9
    window.client_cpu_us = cpu_us_per_request(cpu_before, cpu_seconds(me), window.requests)
    return window
