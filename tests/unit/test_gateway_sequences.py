"""Sequences at the gateway: parsing the controls, rendezvous choice, the bounded sticky map, order,
and the data plane's sequence path (no cache, the pinned worker or UNAVAILABLE) against fakes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import grpc
import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.client.inference import set_parameter
from ferry.core import codec
from ferry.core.errors import DeadlineExceeded, InvalidArgument, Unavailable
from ferry.core.modelconfig import ModelSpec, TensorSpec
from gateway.cache import LruBackend, ResultCache
from gateway.dataplane import DataPlane
from gateway.discovery import Discovery
from gateway.router import RetryPolicy, Router
from gateway.sequences import SequenceOrder, StickyMap, WaitedTooLong, ranked, rendezvous, sequence_of
from gateway.upstream import Upstream, WorkerLost
from tests.unit.test_gateway_cache import aio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def params(**values: Any) -> dict[str, pb.InferParameter]:
    """Request parameters; a ``__u`` suffix sends an int as uint64 (tritonclient sends int64)."""
    request = pb.ModelInferRequest()
    for name, value in values.items():
        key, _, kind = name.partition("__")
        if kind == "u":
            request.parameters[key].uint64_param = value
        else:
            set_parameter(request.parameters, key, value)
    return dict(request.parameters)


# -- the controls -----------------------------------------------------------------------------------
def test_an_id_as_typed_is_the_key_int64_and_uint64_alike() -> None:
    a = sequence_of("m", params(sequence_id=7, sequence_start=True))
    b = sequence_of("m", params(sequence_id__u=7))
    s = sequence_of("m", params(sequence_id="7", sequence_end=True))
    assert a is not None and b is not None and s is not None
    assert a.key == b.key == ("m", "int", 7)
    assert s.key == ("m", "str", "7") != a.key
    assert (a.start, a.end, b.start, b.end, s.start, s.end) == (True, False, False, False, False, True)
    assert sequence_of("n", params(sequence_id=7)).key != a.key  # type: ignore[union-attr]
    assert a.describe() == "sequence 7 of model 'm'"
    assert s.describe() == "sequence '7' of model 'm'"
    assert "lived on worker 127.0.0.1:5001, which is gone; its state is lost" in a.lost("127.0.0.1:5001")
    assert a.lost("x").endswith("start the sequence again with sequence_start")


@pytest.mark.parametrize("given", [{}, {"sequence_id": 0}, {"sequence_id": ""}, {"x": 1}])
def test_no_id_is_no_sequence(given: dict[str, Any]) -> None:
    assert sequence_of("m", params(**given)) is None


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"sequence_id": -3}, "must be a positive integer"),
        ({"sequence_id": 1.5}, "must be an integer or a string"),
        ({"sequence_id": 0, "sequence_start": True}, "need a non-zero sequence_id"),
        ({"sequence_id": 1, "sequence_start": "yes"}, "parameter 'sequence_start' must be a bool"),
    ],
)
def test_bad_controls_are_refused_as_the_worker_refuses_them(given: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        sequence_of("m", params(**given))


def test_flags_are_bools_or_a_json_bodys_true() -> None:
    assert sequence_of("m", params(sequence_id=1, sequence_start="True")).start  # type: ignore[union-attr]
    assert not sequence_of("m", params(sequence_id=1, sequence_start="false")).start  # type: ignore[union-attr]
    assert not sequence_of("m", params(sequence_id=1, sequence_start=False)).start  # type: ignore[union-attr]


# -- rendezvous ---------------------------------------------------------------------------------------
WORKERS = [f"10.0.0.{n}:8001" for n in range(1, 5)]


def test_the_choice_is_stable_whatever_the_order_and_the_process() -> None:
    key = ("m", "int", 7)
    first = rendezvous(key, WORKERS)
    assert first is not None
    assert all(rendezvous(key, list(reversed(WORKERS))) == first for _ in range(3))
    assert ranked(key, WORKERS) == ranked(key, sorted(WORKERS, reverse=True))
    # a keyed hash, not Python's per-process hash(): every replica, every restart agrees
    assert first == "10.0.0.1:8001"
    assert ranked(("m", "int", 8), WORKERS) == [WORKERS[1], WORKERS[3], WORKERS[0], WORKERS[2]]
    assert ranked(("m", "str", "8"), WORKERS) == [WORKERS[1], WORKERS[0], WORKERS[2], WORKERS[3]]
    assert rendezvous(key, []) is None


def test_sequences_spread_over_the_workers() -> None:
    counts = Counter(rendezvous(("m", "int", n), WORKERS) for n in range(1, 4001))
    assert set(counts) == set(WORKERS)
    assert all(800 <= c <= 1200 for c in counts.values()), counts


def test_losing_a_worker_moves_only_its_own_sequences() -> None:
    keys = [("m", "int", n) for n in range(1, 2001)]
    before = {k: rendezvous(k, WORKERS) for k in keys}
    fewer = WORKERS[:-1]
    after = {k: rendezvous(k, fewer) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == WORKERS[-1] for k in moved)
    # where they go is their second choice: a start while that worker is down lands there too
    assert all(after[k] == ranked(k, WORKERS)[1] for k in moved)


# -- the sticky map -------------------------------------------------------------------------------------
def test_map_forgets_idle_sequences() -> None:
    clock = Clock()
    pins = StickyMap(max_entries=10, idle_s=300, clock=clock)
    pins.put(("m", "int", 1), "a", "1")
    clock.now += 200
    pins.put(("m", "int", 2), "b", "1")
    clock.now += 99
    assert pins.get(("m", "int", 1)) is not None  # a lookup is no use
    pins.put(("m", "int", 1), "a", "1")  # a request that ran is
    clock.now += 2
    assert len(pins) == 2
    clock.now += 199
    assert pins.get(("m", "int", 2)) is None and pins.expired == 1
    assert pins.get(("m", "int", 1)) is not None
    clock.now += 100
    assert len(pins) == 0 and pins.expired == 2


def test_map_is_bounded_least_recently_used_first() -> None:
    clock = Clock()
    pins = StickyMap(max_entries=3, idle_s=300, clock=clock)
    for n in range(1, 4):
        pins.put(("m", "int", n), f"w{n}", "1")
        clock.now += 1
    pins.put(("m", "int", 1), "w1", "1")  # used again: now the most recent
    pins.put(("m", "int", 4), "w4", "1")
    assert pins.get(("m", "int", 2)) is None and pins.evicted == 1
    assert [pins.get(("m", "int", n)) is not None for n in (1, 3, 4)] == [True, True, True]
    pins.drop(("m", "int", 3))
    pins.drop(("m", "int", 99))  # dropping what is not there is fine
    assert len(pins) == 2
    pin = pins.get(("m", "int", 4))
    assert pin is not None and (pin.address, pin.version) == ("w4", "1")


# -- order ------------------------------------------------------------------------------------------------
@aio
async def test_requests_of_one_sequence_run_one_at_a_time_in_arrival_order() -> None:
    order = SequenceOrder()
    log: list[str] = []
    gates = {n: asyncio.Event() for n in range(3)}

    async def step(key: Any, n: int) -> None:
        async with order.turn(key, timeout=5):
            log.append(f"{key[2]}:{n}+")
            if key[2] == 1:
                await gates[n].wait()
            log.append(f"{key[2]}:{n}-")

    tasks = [asyncio.ensure_future(step(("m", "int", 1), n)) for n in range(3)]
    other = asyncio.ensure_future(step(("m", "int", 2), 0))
    await asyncio.sleep(0.01)
    assert log == ["1:0+", "2:0+", "2:0-"]  # another sequence does not wait
    for n in (2, 1, 0):
        gates[n].set()
    await asyncio.gather(*tasks, other)
    assert [e for e in log if e.startswith("1:")] == ["1:0+", "1:0-", "1:1+", "1:1-", "1:2+", "1:2-"]
    assert len(order) == 0


@aio
async def test_a_request_that_gives_up_waiting_keeps_the_order_behind_it() -> None:
    order = SequenceOrder()
    key = ("m", "int", 1)
    release = asyncio.Event()
    seen: list[int] = []

    async def first() -> None:
        async with order.turn(key):
            await release.wait()
            seen.append(1)

    async def impatient() -> None:
        async with order.turn(key, timeout=0.01):
            seen.append(2)

    async def third() -> None:
        async with order.turn(key, timeout=5):
            seen.append(3)

    a = asyncio.ensure_future(first())
    await asyncio.sleep(0)
    b = asyncio.ensure_future(impatient())
    c = asyncio.ensure_future(third())
    with pytest.raises(WaitedTooLong):
        await b
    await asyncio.sleep(0.01)
    assert seen == []  # the third still waits for the first, not for the one that left
    release.set()
    await asyncio.gather(a, c)
    assert seen == [1, 3] and len(order) == 0


# -- the data plane's sequence path, against a fake pool --------------------------------------------------
X = TensorSpec("x", "FP32", (2,))
SPEC = ModelSpec(name="m", inputs=(X,), outputs=(X,), max_batch_size=8)


class FakeWorker:
    def __init__(self, address: str, models: dict[str, dict[str, str]] | None = None) -> None:
        self.address = address
        self.serving = True
        self.models = {"m": {"1": "READY"}} if models is None else models
        self.index_ok = True

    def ready(self, model: str, version: str) -> bool:
        return self.serving and self.models.get(model, {}).get(version) == "READY"


class FakeUpstream:
    """Records which worker each call went to; ``dead`` workers fail at the transport."""

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery
        self.router = Router()
        self.policy = RetryPolicy(attempts=3)
        self.calls: list[tuple[str, pb.ModelInferRequest]] = []
        self.dead: set[str] = set()

    def answer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        version = request.model_version or "1"
        resp = pb.ModelInferResponse(model_name="m", model_version=version, id=request.id)
        codec.add_output(resp, "x", np.zeros((1, 2), np.float32))
        return resp

    async def infer_on(
        self, address: str, request: pb.ModelInferRequest, deadline: float | None, request_id: str
    ) -> pb.ModelInferResponse:
        copy = pb.ModelInferRequest()
        copy.CopyFrom(request)
        self.calls.append((address, copy))
        if address in self.dead:
            raise WorkerLost(address, "connection refused")
        return self.answer(request)

    async def infer(
        self, request: pb.ModelInferRequest, deadline: float | None, request_id: str, pinned: bool
    ) -> pb.ModelInferResponse:
        self.calls.append(("any", request))
        return self.answer(request)

    def where(self) -> list[str]:
        return [a for a, _ in self.calls]


def pool(n: int = 3) -> tuple[DataPlane, FakeUpstream, Discovery]:
    d = Discovery(["a:1"], [], lambda a: None)  # type: ignore[arg-type,return-value]
    workers = [FakeWorker(f"127.0.0.1:{5001 + i}") for i in range(n)]
    d.workers = {w.address: w for w in workers}  # type: ignore[misc]
    d._specs[("m", "1")] = SPEC
    up = FakeUpstream(d)
    plane = DataPlane(d, up, ResultCache(LruBackend()), sequences=StickyMap())  # type: ignore[arg-type]
    return plane, up, d


def request(seq: Any = None, start: bool = False, end: bool = False) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m", id="r")
    codec.add_input(req, "x", np.ones((1, 2), np.float32))
    if seq is not None:
        p = req.parameters["sequence_id"]
        if isinstance(seq, str):
            p.string_param = seq
        else:
            p.int64_param = seq
        req.parameters["sequence_start"].bool_param = start
        req.parameters["sequence_end"].bool_param = end
    return req


def health_changed(d: Discovery) -> None:
    d._routes.clear()


@aio
async def test_every_request_of_a_sequence_reaches_one_worker_with_its_parameters() -> None:
    plane, up, d = pool()
    for seq in (7, "7", 8, 9):
        up.calls.clear()
        await plane.infer(request(seq, start=True), None, "r")
        for _ in range(3):
            await plane.infer(request(seq), None, "r")
        await plane.infer(request(seq, end=True), None, "r")
        where = up.where()
        assert len(where) == 5 and len(set(where)) == 1
        assert where[0] == rendezvous(("m", "str" if isinstance(seq, str) else "int", seq), d.workers)
        sent = up.calls[0][1]
        assert sent.model_version == "1" and sent.parameters["sequence_start"].bool_param
        assert set(sent.parameters) == {"sequence_id", "sequence_start", "sequence_end"}
        assert up.calls[-1][1].parameters["sequence_end"].bool_param
    assert len(plane.sequences) == 0  # each end dropped its pin


@aio
async def test_sequence_requests_never_come_from_nor_fill_the_cache() -> None:
    plane, up, _ = pool()
    assert plane.cache is not None
    plain = await plane.infer(request(), None, "r")
    again = await plane.infer(request(), None, "r")
    assert not isinstance(plain, bytes) and isinstance(again, bytes)  # the cache works: a hit
    up.calls.clear()
    hits = plane.cache.stats.hits
    await plane.infer(request(3, start=True), None, "r")
    for _ in range(2):  # one step, twice: both run
        answer = await plane.infer(request(3), None, "r")
        assert not isinstance(answer, bytes) and "ferry_cache_hit" not in answer.parameters
    assert len(up.calls) == 3 and plane.cache.stats.hits == hits
    # nor merged: identical steps of two sequences at once travel alone
    up.calls.clear()
    await asyncio.gather(*(plane.infer(request(n, start=True), None, "r") for n in (11, 12, 13)))
    assert len(up.calls) == 3 and all(len(r.inputs) == 1 and r.inputs[0].shape[0] == 1 for _, r in up.calls)


@aio
async def test_a_continuation_whose_worker_is_gone_fails_and_is_never_sent_elsewhere() -> None:
    plane, up, d = pool()
    await plane.infer(request(7, start=True), None, "r")
    home = up.where()[0]
    for why in ("unhealthy", "ejected", "unlisted", "broken"):
        plane2, up2, d2 = pool()
        await plane2.infer(request(7, start=True), None, "r")
        up2.calls.clear()
        if why == "unhealthy":
            d2.workers[home].serving = False
        elif why == "ejected":
            up2.router.eject(home)
        elif why == "unlisted":
            del d2.workers[home]
        else:
            up2.dead.add(home)
        health_changed(d2)
        for _ in range(2):  # and it stays so: the state is lost whatever comes next
            with pytest.raises(Unavailable) as err:
                await plane2.infer(request(7), None, "r")
            assert err.value.message.startswith(
                f"sequence 7 of model 'm' lived on worker {home}, which is gone; its state is lost; "
                "start the sequence again with sequence_start"
            ), why
        assert set(up2.where()) <= {home}  # at most the one try on the broken worker
        # a fresh start picks afresh among the workers still there, and the sequence goes on there
        up2.calls.clear()
        await plane2.infer(request(7, start=True), None, "r")
        await plane2.infer(request(7), None, "r")
        where = up2.where()
        if why == "broken":  # still listed and healthy: the start tried it first, then the next one
            assert where[0] == home and where[1] == where[2] != home
        else:
            assert len(set(where)) == 1 and where[0] != home
            assert where[0] == ranked(("m", "int", 7), d.workers)[1]


@aio
async def test_a_continuation_without_a_pin_follows_the_hash_over_every_worker_of_the_model() -> None:
    """Another replica started it (or this gateway restarted): the same choice, healthy or not."""
    plane, up, d = pool(4)
    d.workers["127.0.0.1:5004"].models = {"other": {"1": "READY"}}  # not a worker of the model
    key = ("m", "int", 21)
    holders = ["127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"]
    assert d.holders("m") == holders
    never_read = FakeWorker("127.0.0.1:5009", models={})
    never_read.index_ok = False  # down since before this gateway started: it may hold sequences
    d.workers[never_read.address] = never_read  # type: ignore[assignment]
    assert d.holders("m") == [*holders, never_read.address]
    del d.workers[never_read.address]
    await plane.infer(request(21), None, "r")
    assert up.where() == [rendezvous(key, holders)]
    assert plane.sequences.get(key) is not None  # pinned from now on
    # the same replica-less continuation, its worker down: UNAVAILABLE, not another worker
    plane2, up2, d2 = pool(4)
    d2.workers["127.0.0.1:5004"].models = {"other": {"1": "READY"}}
    d2.workers[rendezvous(key, holders) or ""].serving = False
    with pytest.raises(Unavailable, match="sequence 21 of model 'm' lived on worker"):
        await plane2.infer(request(21), None, "r")
    assert up2.calls == []


@aio
async def test_a_start_on_a_broken_worker_moves_on_within_the_attempts() -> None:
    plane, up, d = pool(3)
    key = ("m", "int", 5)
    order = ranked(key, d.workers)
    up.dead = {order[0], order[1]}
    await plane.infer(request(5, start=True), None, "r")
    assert up.where() == order
    pin = plane.sequences.get(key)
    assert pin is not None and pin.address == order[2]
    up.dead = set(order)
    with pytest.raises(Unavailable, match="sequence 5 of model 'm' could not start"):
        await plane.infer(request(5, start=True), None, "r")
    assert plane.sequences.get(key) is None


@aio
async def test_a_continuation_keeps_the_version_its_sequence_started_on() -> None:
    plane, up, d = pool(2)
    await plane.infer(request(4, start=True), None, "r")
    for w in d.workers.values():  # version 2 rolls in while the sequence runs
        w.models = {"m": {"1": "READY", "2": "READY"}}
    health_changed(d)
    await plane.infer(request(4), None, "r")
    await plane.infer(request(6, start=True), None, "r")
    assert [r.model_version for _, r in up.calls] == ["1", "1", "2"]


@aio
async def test_an_earlier_step_still_running_bounds_a_later_one_by_its_deadline() -> None:
    plane, up, _ = pool(2)
    release = asyncio.Event()
    real = up.infer_on

    async def slow(*args: Any) -> pb.ModelInferResponse:
        await release.wait()
        return await real(*args)

    up.infer_on = slow  # type: ignore[method-assign,assignment]
    first = asyncio.ensure_future(plane.infer(request(9, start=True), None, "r"))
    await asyncio.sleep(0)
    with pytest.raises(DeadlineExceeded, match="an earlier request of sequence 9 of model 'm'"):
        await plane.infer(request(9), time.monotonic() + 0.02, "r")
    release.set()
    await first


@aio
async def test_a_start_without_an_id_is_refused_at_the_gateway_and_sent_nowhere() -> None:
    plane, up, _ = pool(2)
    req = request()
    req.parameters["sequence_start"].bool_param = True
    with pytest.raises(InvalidArgument, match="need a non-zero sequence_id"):
        await plane.infer(req, None, "r")
    assert up.where() == [] and len(plane.sequences) == 0


# -- Upstream.infer_on -------------------------------------------------------------------------------------
class Stub:
    def __init__(self, error: grpc.StatusCode | None) -> None:
        self.error = error
        self.calls = 0

    async def ModelInfer(self, request: Any, timeout: Any = None, metadata: Any = None) -> Any:
        self.calls += 1
        if self.error is not None:
            raise grpc.aio.AioRpcError(self.error, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom")
        return pb.ModelInferResponse(model_name="m")


@aio
async def test_infer_on_calls_that_worker_once_and_tells_a_lost_worker_from_an_answer() -> None:
    d = Discovery(["a:1"], [], lambda a: None)  # type: ignore[arg-type,return-value]
    suspected: list[str] = []
    d.suspect = suspected.append  # type: ignore[method-assign,assignment]
    up = Upstream(d, Router(), RetryPolicy())
    for code, raised in (
        (None, None),
        (grpc.StatusCode.UNAVAILABLE, WorkerLost),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
    ):
        worker = FakeWorker("w:1")
        worker.stub = Stub(code)  # type: ignore[attr-defined]
        d.workers = {"w:1": worker}  # type: ignore[dict-item]
        if raised is None:
            assert (await up.infer_on("w:1", pb.ModelInferRequest(), None, "r")).model_name == "m"
        else:
            with pytest.raises(raised):
                await up.infer_on("w:1", pb.ModelInferRequest(), None, "r")
        assert worker.stub.calls == 1  # type: ignore[attr-defined]
    assert suspected == ["w:1"]
    with pytest.raises(WorkerLost, match="no longer known"):
        await up.infer_on("gone:1", pb.ModelInferRequest(), None, "r")
