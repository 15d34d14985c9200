"""A chaos soak: minutes of load through the gateway while workers die and freeze, Redis restarts and
a new model version rolls out; it counts failed requests and wrong answers.

    python -m benchmarks.chaos                          # 2 minutes, a random seed (printed)
    python -m benchmarks.chaos --seconds 120 --seed 7   # replay one schedule
    python -m benchmarks.chaos --seconds 22 --json-out /tmp/chaos.json --gateway-arg=--hedge-delay-ms=20

The fleet: a private store holding an MLP as version 1 (version 2, with other weights, is published
mid-run), three workers, one gateway in front of them with its result cache in a private
redis-server (near cache off, so every lookup is a Redis call and a Redis restart touches every
request). ``lanes`` closed-loop callers, each with a ``deadline_s`` deadline, send requests drawn at
random from a pool of ``pool`` distinct inputs, so some answers are cache hits and some misses, for
``seconds`` or ``max_requests`` requests, whichever ends first.

After ``warmup_s`` a schedule drawn from a seeded RNG applies one event after another, each
followed by a pause of ``gap_s`` (min,max) seconds: SIGKILL of a worker and a replacement started
on the same port (the gateway's ``--workers`` list is fixed; the replacement must rejoin it),
SIGSTOP of a worker for ``freeze_s`` (min,max) seconds then SIGCONT, or a SIGKILL of redis-server
and a new one on the same port after ``redis_down_s`` (min,max) seconds. The three kinds are drawn
as shuffled rounds (each round has one of each), so any three events in a row cover them all. The
first event due after ``roll_at`` of the run publishes version 2 into the store (the exporter's
own atomic publish) and waits until the gateway sees only version 2 ready. Each event waits for the
fleet to be whole again (the worker back in rotation, the cache serving hits again) before the
pause, so at most one worker is out at a time and two of three keep serving.

Every answer is checked against in-process ONNX Runtime of the version it names in
``model_version``: an answer that names no published version, or whose output is not that
version's, is wrong. After the roll the last version-1 answer must have been sent before the
gateway saw version 2 alone. The report (JSON on stdout, then a short table) gives requests, failed
requests by status, wrong answers, p50/p99, every event with its time, and the resident memory of
the gateway and of every worker at start and end (``VmRSS`` in ``/proc/<pid>/status``). Exit code
1 when an answer was wrong, 3 when the soak could not run as scheduled (an event not applied, the
fleet not whole again in time, the roll not completed); failed requests are reported, not judged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.procs import RedisServer, ServerProcess
from benchmarks.stats import check_output, latency_summary
from ferry._proto.ferry.v1 import admin_pb2, admin_pb2_grpc
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.core.netutil import free_port
from ferry.core.store import Store

MODEL = "mlp"
FEATURES, HIDDEN, CLASSES = 16, 64, 8
HIT_PARAMETER = "ferry_cache_hit"
KINDS = ("kill", "freeze", "redis")
SAMPLES = 10  # failures and wrong answers kept verbatim in the report


# -- the model: two versions with different weights, so an answer tells which version ran -----------


def export_mlp(path: Path, seed: int) -> Path:
    """A 16 -> 64 -> 8 MLP (MatMul, Add, Relu) with a dynamic batch axis, weights from ``seed``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES),
        "b1": rng.standard_normal(HIDDEN) * 0.1,
        "w2": rng.standard_normal((HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
        "b2": rng.standard_normal(CLASSES) * 0.1,
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h2"]),
            helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
            helper.make_node("Add", ["h3", "b2"], ["output"]),
        ],
        MODEL,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def reference(onnx_file: Path, pool: np.ndarray) -> np.ndarray:
    """In-process ONNX Runtime, one batch-1 run per pool row: what each answer of that version must be."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["output"], {"input": row[None]})[0] for row in pool])


def build_requests(pool: np.ndarray) -> list[pb.ModelInferRequest]:
    """One pre-built request per pool row (the result cache is on: the gateway's default)."""
    out = []
    for row in pool:
        req = pb.ModelInferRequest(model_name=MODEL)
        req.inputs.add(name="input", datatype="FP32", shape=[1, FEATURES])
        req.raw_input_contents.append(np.ascontiguousarray(row[None]).tobytes())
        out.append(req)
    return out


class Answers:
    """The reference rows of every published version, and the check of one answer against them."""

    def __init__(self) -> None:
        self.rows: dict[str, list[np.ndarray]] = {}

    def add(self, version: int, expected: np.ndarray) -> None:
        self.rows[str(version)] = [expected[i : i + 1] for i in range(len(expected))]

    def problem(self, index: int, resp: pb.ModelInferResponse) -> str | None:
        """Why ``resp`` is not the answer to pool row ``index`` of the version it names; None if it is."""
        rows = self.rows.get(resp.model_version)
        if rows is None:
            return f"model_version {resp.model_version!r} is no published version"
        if not resp.raw_output_contents or len(resp.outputs) != 1:
            return "no raw output"
        raw, out = resp.raw_output_contents[0], resp.outputs[0]
        problem = check_output(raw, list(out.shape), out.datatype, rows[index])
        if problem is None:
            return None
        shape, datatype = list(out.shape), out.datatype
        mixed = [
            v
            for v, other in self.rows.items()
            if v != resp.model_version and check_output(raw, shape, datatype, other[index]) is None
        ]
        where = f"; it is version {mixed[0]}'s answer" if mixed else ""
        return f"input {index}, model_version {resp.model_version}: {problem}{where}"


# -- the load ----------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the lanes saw: answers, failures by status, wrong answers, latencies, versions."""

    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    failure_samples: list[dict[str, Any]] = field(default_factory=list)
    wrong: int = 0
    wrong_samples: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    by_version: Counter[str] = field(default_factory=Counter)
    v1_sent_s: list[float] = field(default_factory=list)  # when each version-1 answer's request left
    first_v2_sent_s: float | None = None

    @property
    def requests(self) -> int:
        return self.ok + sum(self.failed.values())


async def load(
    address: str,
    reqs: Sequence[pb.ModelInferRequest],
    answers: Answers,
    args: argparse.Namespace,
    t0: float,
    stop: asyncio.Event,
    tally: Tally,
) -> None:
    """``args.lanes`` closed-loop callers, each drawing its next input at random from the pool."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def lane(n: int) -> None:
            rng = random.Random(args.seed * 1000 + n)
            while not stop.is_set():
                if args.max_requests and tally.requests >= args.max_requests:
                    stop.set()
                    break
                index = rng.randrange(len(reqs))
                started = time.perf_counter_ns()
                sent_s = started / 1e9 - t0
                try:
                    resp = await stub.ModelInfer(reqs[index], timeout=args.deadline_s)
                except grpc.aio.AioRpcError as err:
                    tally.failed[err.code().name] += 1
                    if len(tally.failure_samples) < SAMPLES:
                        tally.failure_samples.append(
                            {"t_s": round(sent_s, 3), "code": err.code().name, "details": err.details()}
                        )
                    await asyncio.sleep(0.005)  # an instant refusal must not spin the lane
                    continue
                tally.latencies_ns.append(time.perf_counter_ns() - started)
                tally.ok += 1
                version = resp.model_version
                tally.by_version[version] += 1
                if version == "1":
                    tally.v1_sent_s.append(sent_s)
                elif tally.first_v2_sent_s is None:
                    tally.first_v2_sent_s = sent_s
                if HIT_PARAMETER in resp.parameters and resp.parameters[HIT_PARAMETER].bool_param:
                    tally.hits += 1
                problem = answers.problem(index, resp)
                if problem is not None:
                    tally.wrong += 1
                    if len(tally.wrong_samples) < SAMPLES:
                        tally.wrong_samples.append({"t_s": round(sent_s, 3), "problem": problem})

        await asyncio.gather(*(lane(n) for n in range(args.lanes)))


# -- the fleet ---------------------------------------------------------------------------------------


def rss_kb(pid: int) -> int | None:
    """Resident set size of ``pid`` in KiB (VmRSS), None when it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def scrape(port: int) -> dict[str, float]:
    """The gateway's counters the report keeps, each summed per label set that names its kind."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = (
        "ferry_gateway_upstream_tries_total",
        "ferry_gateway_upstream_wins_total",
        "ferry_gateway_retries_total",
        "ferry_gateway_try_timeouts_total",
        "ferry_gateway_retry_budget_exhausted_total",
        "ferry_gateway_cache_errors_total",
        "ferry_gateway_cache_breaker_transitions_total",
        "ferry_gateway_ejections_total",
        "ferry_gateway_cache_total",
        "ferry_gateway_overload_rejections_total",
    )
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) not in wanted:
            continue
        kind = re.search(r'(?:kind|reason|state|op|outcome)="([^"]*)"', m.group(2) or "")
        key = m.group(1) + (f"{{{kind.group(1)}}}" if kind else "")
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


class Fleet:
    """The store, the redis-server, the workers and the gateway of one soak, and what they look like."""

    def __init__(self, store: Path, workers: int, gateway_args: Sequence[str]) -> None:
        self.store = store
        self.count = workers
        self.gateway_args = list(gateway_args)
        self.redis = RedisServer()
        self.workers: list[ServerProcess] = []
        self.ports: list[int] = []
        self.restarts = [0] * workers
        self.gateway: ServerProcess | None = None
        self.metrics_port = free_port()
        self._channel: grpc.aio.Channel | None = None

    def worker(self, slot: int, port: int = 0) -> ServerProcess:
        name = f"worker-{slot + 1}"
        return ServerProcess.ferry(name, "worker", "--store", str(self.store), "--port", str(port))

    def start(self) -> None:
        self.redis.start()
        for slot in range(self.count):
            self.workers.append(self.worker(slot).start())
            self.ports.append(self.workers[-1].port)
        self.gateway = ServerProcess.ferry(
            "gateway", "gateway", "--workers", ",".join(w.address for w in self.workers),
            "--port", "0", "--http-port", "0", "--redis-url", self.redis.url, "--cache-near-bytes", "0",
            "--metrics-port", str(self.metrics_port), *self.gateway_args,
        ).start()  # fmt: skip

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)
            w.stop()
        self.redis.stop()

    @property
    def admin(self) -> admin_pb2_grpc.GatewayAdminStub:
        assert self.gateway is not None
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.gateway.address)
        return admin_pb2_grpc.GatewayAdminStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def view(self) -> list[admin_pb2.WorkerInfo]:
        resp = await self.admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=5)
        return list(resp.workers)

    async def cache(self) -> admin_pb2.CacheStatsResponse:
        return await self.admin.CacheStats(admin_pb2.CacheStatsRequest(), timeout=5)

    async def in_rotation(self, address: str) -> bool:
        """The gateway sees ``address`` serving, not ejected, with the model ready."""
        return any(
            w.address == address
            and w.serving
            and not w.ejected
            and any(m.model == MODEL and m.state == "READY" for m in w.models)
            for w in await self.view()
        )

    async def all_in_rotation(self) -> bool:
        return all([await self.in_rotation(w.address) for w in self.workers])

    async def only_version(self, version: str) -> bool:
        """Every serving worker has ``version`` ready and no other version of the model."""
        serving = [w for w in await self.view() if w.serving]
        return bool(serving) and all(
            {m.version for m in w.models if m.model == MODEL and m.state == "READY"} == {version}
            for w in serving
        )

    def rss(self) -> dict[str, Any]:
        assert self.gateway is not None
        return {
            "gateway": {"pid": self.gateway.pid, "rss_kb": rss_kb(self.gateway.pid)},
            "workers": [{"pid": w.pid, "rss_kb": rss_kb(w.pid)} for w in self.workers],
        }


async def sample_rss(
    fleet: Fleet, t0: float, every_s: float, stop: asyncio.Event, out: list[dict[str, Any]]
) -> None:
    """Every ``every_s`` seconds until ``stop``: the RSS in KiB of the gateway and of each worker slot."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if stop.is_set():
            return
        now = fleet.rss()
        out.append(
            {
                "t_s": round(time.perf_counter() - t0, 1),
                "gateway_kb": now["gateway"]["rss_kb"],
                "workers_kb": [w["rss_kb"] for w in now["workers"]],
            }
        )


async def until(check: Callable[[], Awaitable[bool]], timeout: float, step: float = 0.1) -> float | None:
    """Seconds until ``check()`` holds (polled every ``step``), None past ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(grpc.aio.AioRpcError, OSError):
            if await check():
                return round(time.monotonic() - started, 3)
        await asyncio.sleep(step)
    return None


# -- the chaos ---------------------------------------------------------------------------------------


class Chaos:
    """Draws and applies the events; each one returns its record for the report."""

    def __init__(self, fleet: Fleet, args: argparse.Namespace, t0: float, v2_onnx: Path) -> None:
        self.fleet = fleet
        self.args = args
        self.t0 = t0
        self.rng = random.Random(args.seed)
        self.v2_onnx = v2_onnx
        self.events: list[dict[str, Any]] = []
        self.roll: dict[str, Any] = {"published_at_s": None, "v2_only_at_s": None}
        self._bag: list[str] = []

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def draw(self) -> str:
        if not self._bag:
            self._bag = list(KINDS)
            self.rng.shuffle(self._bag)
        return self._bag.pop()

    async def run(self, stop: asyncio.Event) -> None:
        args = self.args
        if await self._pause(stop, args.warmup_s):
            return
        while not stop.is_set() and self.now() < args.seconds - args.tail_s:
            rolled = self.roll["published_at_s"] is not None
            kind = "roll" if not rolled and self.now() >= args.roll_at * args.seconds else self.draw()
            event: dict[str, Any] = {"kind": kind, "t_s": self.now(), "applied": False}
            self.events.append(event)
            try:
                await getattr(self, f"_{kind}")(event)
            except Exception as err:  # recorded, and the soak goes on with the fleet it has
                event["error"] = f"{type(err).__name__}: {err}"
            event["end_s"] = self.now()
            print(f"[chaos {event['t_s']:7.2f}s] {describe(event)}", file=sys.stderr, flush=True)
            if await self._pause(stop, self.rng.uniform(*args.gap_s)):
                return

    @staticmethod
    async def _pause(stop: asyncio.Event, seconds: float) -> bool:
        """Sleep ``seconds`` or until ``stop``; True when stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        return stop.is_set()

    async def _kill(self, event: dict[str, Any]) -> None:
        fleet, slot = self.fleet, self.rng.randrange(self.fleet.count)
        victim = fleet.workers[slot]
        event.update(target=victim.name, address=victim.address, old_pid=victim.pid)
        os.killpg(victim.pid, signal.SIGKILL)
        assert victim.proc is not None
        await asyncio.to_thread(victim.proc.wait, 10)
        killed = time.monotonic()
        event["applied"] = True
        replacement = None
        for attempt in range(3):  # the port is the gateway's fixed address: it must be that one
            try:
                replacement = await asyncio.to_thread(fleet.worker(slot, fleet.ports[slot]).start)
                break
            except RuntimeError as err:
                event["start_error"] = str(err)[-300:]
                await asyncio.sleep(0.5 * (attempt + 1))
        if replacement is None:
            raise RuntimeError(f"no replacement for {victim.name} started on port {fleet.ports[slot]}")
        fleet.workers[slot] = replacement
        fleet.restarts[slot] += 1
        event["new_pid"] = replacement.pid
        event["ready_after_s"] = round(time.monotonic() - killed, 3)
        back = await until(lambda: fleet.in_rotation(replacement.address), self.args.recover_timeout_s)
        event["back_after_s"] = None if back is None else round(time.monotonic() - killed, 3)
        event["recovered"] = back is not None

    async def _freeze(self, event: dict[str, Any]) -> None:
        fleet, slot = self.fleet, self.rng.randrange(self.fleet.count)
        victim, seconds = fleet.workers[slot], round(self.rng.uniform(*self.args.freeze_s), 3)
        assert victim.proc is not None
        event.update(target=victim.name, address=victim.address, frozen_s=seconds)
        left = False
        victim.proc.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        event["applied"] = True
        try:
            while time.monotonic() - frozen < seconds:  # did the gateway take it out of rotation?
                with contextlib.suppress(grpc.aio.AioRpcError):
                    left = left or not await fleet.in_rotation(victim.address)
                await asyncio.sleep(min(0.1, max(0.0, seconds - (time.monotonic() - frozen))))
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        event["left_rotation"] = left
        back = await until(lambda: fleet.in_rotation(victim.address), self.args.recover_timeout_s)
        event["back_after_s"] = None if back is None else round(time.monotonic() - frozen, 3)
        event["recovered"] = back is not None

    async def _redis(self, event: dict[str, Any]) -> None:
        fleet, down = self.fleet, round(self.rng.uniform(*self.args.redis_down_s), 3)
        event.update(target="redis-server", port=fleet.redis.port, down_s=down)
        await asyncio.to_thread(fleet.redis.stop)  # SIGKILL
        killed = time.monotonic()
        event["applied"] = True
        await asyncio.sleep(down)
        await asyncio.to_thread(fleet.redis.start)
        hits = (await fleet.cache()).hits

        async def serving() -> bool:  # hits again, from the new (empty) redis-server, breaker closed
            s = await fleet.cache()
            return s.breaker_state == "closed" and s.hits > hits

        back = await until(serving, self.args.recover_timeout_s)
        event["back_after_s"] = None if back is None else round(time.monotonic() - killed, 3)
        event["recovered"] = back is not None

    async def _roll(self, event: dict[str, Any]) -> None:
        store = Store(self.fleet.store)
        meta = {"source": "benchmarks.chaos", "weights_seed": 1}
        self.roll["published_at_s"] = self.now()
        version = await asyncio.to_thread(store.publish_version, MODEL, {"model.onnx": self.v2_onnx}, meta)
        published = time.monotonic()
        event.update(target=f"{MODEL} version {version}", applied=version == 2)
        back = await until(lambda: self.fleet.only_version("2"), self.args.roll_deadline_s, step=0.05)
        if back is not None:
            self.roll["v2_only_at_s"] = self.now()
        event["back_after_s"] = None if back is None else round(time.monotonic() - published, 3)
        event["recovered"] = back is not None


def describe(event: dict[str, Any]) -> str:
    what = {
        "kill": "SIGKILL {target}, replacement on {address}",
        "freeze": "SIGSTOP {target} for {frozen_s} s",
        "redis": "SIGKILL redis-server, down {down_s} s",
        "roll": "publish {target}",
    }[event["kind"]]
    with contextlib.suppress(KeyError):
        what = what.format(**event)
    if event.get("error"):
        return f"{what}: FAILED {event['error']}"
    back = event.get("back_after_s")
    return f"{what}: whole again after {back} s" if back is not None else f"{what}: NOT whole again"


# -- the soak ----------------------------------------------------------------------------------------


def roll_summary(chaos: Chaos, tally: Tally, deadline_s: float) -> dict[str, Any]:
    published, v2_only = chaos.roll["published_at_s"], chaos.roll["v2_only_at_s"]
    out: dict[str, Any] = {"published_at_s": published, "v2_only_at_s": v2_only}
    if published is None:
        return {**out, "completed": False, "why": "the roll was never due (run too short)"}
    last_v1 = max(tally.v1_sent_s, default=None)
    late = sum(1 for t in tally.v1_sent_s if v2_only is not None and t > v2_only)
    out.update(
        v2_only_after_s=None if v2_only is None else round(v2_only - published, 3),
        last_v1_sent_after_publish_s=None if last_v1 is None else round(last_v1 - published, 3),
        first_v2_sent_at_s=None if tally.first_v2_sent_s is None else round(tally.first_v2_sent_s, 3),
        v1_answers_after_v2_only=late,
    )
    # done: the gateway saw only version 2 within the deadline, v2 answered, and no request sent
    # after that moment was answered by version 1
    out["completed"] = v2_only is not None and tally.by_version.get("2", 0) > 0 and late == 0
    return out


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Set up the fleet, run the load and the chaos side by side, tear down; the report."""
    own = args.store is None
    store = Path(tempfile.mkdtemp(prefix="ferry-chaos-")) if own else args.store
    shutil.rmtree(store / "models" / MODEL, ignore_errors=True)  # version 1 must be the first
    try:
        return await _soak(args, store)
    finally:
        if own:
            shutil.rmtree(store, ignore_errors=True)


async def _soak(args: argparse.Namespace, store: Path) -> dict[str, Any]:
    onnx_dir = store / "onnx"
    v1, v2 = export_mlp(onnx_dir / "v1.onnx", seed=0), export_mlp(onnx_dir / "v2.onnx", seed=1)
    meta = {"source": "benchmarks.chaos", "weights_seed": 0}
    Store(store).publish_version(MODEL, {"model.onnx": v1}, meta, {"max_batch_size": 64})
    pool = np.random.default_rng(args.seed).standard_normal((args.pool, FEATURES), dtype=np.float32)
    answers = Answers()
    answers.add(1, reference(v1, pool))
    answers.add(2, reference(v2, pool))
    reqs = build_requests(pool)

    fleet = Fleet(store, args.workers, args.gateway_arg)
    await asyncio.to_thread(fleet.start)
    try:
        assert fleet.gateway is not None
        if await until(fleet.all_in_rotation, 30) is None:
            raise RuntimeError("the workers did not all come into the gateway's rotation")
        rss_start = fleet.rss()
        metrics_before = await asyncio.to_thread(scrape, fleet.metrics_port)
        tally, stop, rss_series = Tally(), asyncio.Event(), []
        t0 = time.perf_counter()
        chaos = Chaos(fleet, args, t0, v2)
        lanes = asyncio.ensure_future(load(fleet.gateway.address, reqs, answers, args, t0, stop, tally))
        chaos_task = asyncio.ensure_future(chaos.run(stop))
        sampler = asyncio.ensure_future(sample_rss(fleet, t0, args.rss_every_s, stop, rss_series))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(lanes), args.seconds)
        stop.set()
        await lanes
        seconds = time.perf_counter() - t0
        await chaos_task
        await sampler
        rss_end = fleet.rss()
        metrics_after = await asyncio.to_thread(scrape, fleet.metrics_port)
        whole = await until(fleet.all_in_rotation, args.recover_timeout_s) is not None
        await fleet.close()
    finally:
        await asyncio.to_thread(fleet.stop)

    events = chaos.events
    lat = latency_summary(tally.latencies_ns)
    rss = {
        "gateway": {
            "pid": rss_start["gateway"]["pid"],
            "start_kb": rss_start["gateway"]["rss_kb"],
            "end_kb": rss_end["gateway"]["rss_kb"],
        },
        "workers": [
            {
                "slot": n + 1,
                "start_pid": a["pid"],
                "start_kb": a["rss_kb"],
                "end_pid": b["pid"],
                "end_kb": b["rss_kb"],
                "restarts": fleet.restarts[n],
            }
            for n, (a, b) in enumerate(zip(rss_start["workers"], rss_end["workers"], strict=True))
        ],
    }
    metrics = {k: v - metrics_before.get(k, 0.0) for k, v in sorted(metrics_after.items())}
    return {
        "seed": args.seed,
        "seconds": round(seconds, 2),
        "lanes": args.lanes,
        "deadline_s": args.deadline_s,
        "pool": args.pool,
        "workers": args.workers,
        "requests": tally.requests,
        "ok": tally.ok,
        "failed": sum(tally.failed.values()),
        "failed_by_status": dict(tally.failed),
        "failure_samples": tally.failure_samples,
        "wrong": tally.wrong,
        "wrong_samples": tally.wrong_samples,
        "hits": tally.hits,
        "hit_ratio": round(tally.hits / tally.ok, 3) if tally.ok else 0.0,
        "answers_by_version": dict(sorted(tally.by_version.items())),
        "requests_per_s": round(tally.requests / seconds, 1) if seconds > 0 else 0.0,
        **{k: round(v, 2) for k, v in lat.items()},
        "events": events,
        "events_by_kind": dict(Counter(e["kind"] for e in events)),
        "every_event_applied": bool(events) and all(e["applied"] and not e.get("error") for e in events),
        "every_event_recovered": bool(events) and all(e.get("recovered") for e in events),
        "fleet_whole_at_end": whole,
        "roll": roll_summary(chaos, tally, args.roll_deadline_s),
        "rss": rss,
        "rss_series": rss_series,
        "gateway_metrics": metrics,
    }


def table(r: dict[str, Any]) -> str:
    """A short human summary of one report."""
    mb = lambda kb: "-" if kb is None else f"{kb / 1024:.0f}"  # noqa: E731
    failed = ", ".join(f"{k} {v}" for k, v in r["failed_by_status"].items()) or "none"
    lines = [
        f"chaos soak, seed {r['seed']}: {r['seconds']} s, {r['lanes']} lanes, {r['deadline_s']} s deadline",
        "| requests | failed | wrong | hits | p50 ms | p99 ms | max ms | req/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['requests']} | {r['failed']} ({failed}) | {r['wrong']} | {r['hit_ratio']:.0%} | {r['p50_ms']} "
        f"| {r['p99_ms']} | {r['max_ms']} | {r['requests_per_s']} |",
        "",
        "| t s | event | whole again after s |",
        "|---|---|---|",
    ]
    for e in r["events"]:
        lines.append(f"| {e['t_s']:.1f} | {describe(e).split(': ')[0]} | {e.get('back_after_s', '-')} |")
    roll = r["roll"]
    lines += [
        "",
        f"roll: published at {roll['published_at_s']} s, gateway saw version 2 alone "
        f"{roll.get('v2_only_after_s')} s later, last version-1 answer sent "
        f"{roll.get('last_v1_sent_after_publish_s')} s after the publish; completed: {roll['completed']}",
        "",
        "| process | RSS MiB start | RSS MiB end | restarts |",
        "|---|---|---|---|",
        f"| gateway | {mb(r['rss']['gateway']['start_kb'])} | {mb(r['rss']['gateway']['end_kb'])} | 0 |",
    ]
    for w in r["rss"]["workers"]:
        lines.append(f"| worker-{w['slot']} | {mb(w['start_kb'])} | {mb(w['end_kb'])} | {w['restarts']} |")
    return "\n".join(lines) + "\n"


def pair(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    low, high = float(lo), float(hi or lo)
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN,MAX with 0 <= MIN <= MAX")
    return low, high


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the load")
    parser.add_argument("--max-requests", type=int, default=2_000_000, help="stop after this many; 0 = none")
    parser.add_argument("--lanes", type=int, default=16)
    parser.add_argument("--deadline-s", type=float, default=2.0, help="each request's deadline")
    parser.add_argument("--pool", type=int, default=16384, help="distinct inputs the requests draw from")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None, help="the schedule's seed (default: random)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="load without chaos first")
    parser.add_argument("--tail-s", type=float, default=5.0, help="no event starts this close to the end")
    parser.add_argument("--gap-s", type=pair, default=(2.0, 5.0), help="pause after each event, MIN,MAX")
    parser.add_argument("--freeze-s", type=pair, default=(1.0, 4.0), help="SIGSTOP length, MIN,MAX")
    parser.add_argument("--redis-down-s", type=pair, default=(0.2, 1.5), help="Redis downtime, MIN,MAX")
    parser.add_argument("--roll-at", type=float, default=0.5, help="share of the run after which v2 rolls")
    parser.add_argument("--roll-deadline-s", type=float, default=30.0, help="bound on the roll")
    parser.add_argument("--recover-timeout-s", type=float, default=30.0, help="bound on each recovery")
    parser.add_argument("--rss-every-s", type=float, default=10.0, help="RSS sampling period")
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeat)")
    parser.add_argument(
        "--store", type=Path, default=None, help="store; its model 'mlp' is replaced (default: temporary)"
    )
    parser.add_argument("--json-out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")
    return args


def verdict(report: dict[str, Any]) -> int:
    """1 for a wrong answer, 3 when the chaos did not run as scheduled, else 0."""
    if report["wrong"]:
        return 1
    ran = report["every_event_applied"] and report["every_event_recovered"] and report["roll"]["completed"]
    return 0 if ran and report["fleet_whole_at_end"] else 3


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"chaos soak: seed {args.seed} (replay with --seed {args.seed})", file=sys.stderr, flush=True)
    report = asyncio.run(soak(args))
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    print(table(report), flush=True)
    return verdict(report)


if __name__ == "__main__":
    raise SystemExit(main())
