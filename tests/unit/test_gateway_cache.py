"""Cache keys (typed == raw, what changes a key), LRU with TTL, fail-open, single-flight, near cache."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core import codec
from gateway.breaker import CLOSED, OPEN, CircuitBreaker
from gateway.cache import (
    LruBackend,
    ResultCache,
    SingleFlight,
    cache_key,
    cache_opt_out,
    request_digest,
)
from gateway.near_cache import NearCache


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body on a fresh event loop (no plugin needed)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


def raw_request(x: np.ndarray, **params: bool | str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    codec.add_input(req, "input", x)
    for k, v in params.items():
        if isinstance(v, bool):
            req.parameters[k].bool_param = v
        else:
            req.parameters[k].string_param = v
    return req


def digest(req: pb.ModelInferRequest) -> str:
    if req.raw_input_contents:
        raw = list(req.raw_input_contents)
    else:
        arrays = codec.decode_inputs(req)
        raw = [codec.raw_bytes(arrays[t.name]) for t in req.inputs]
    return request_digest(req, raw)


X = np.arange(6, dtype=np.float32).reshape(2, 3)


def test_typed_and_raw_contents_hash_alike() -> None:
    typed = pb.ModelInferRequest(model_name="m")
    t = typed.inputs.add(name="input", datatype="FP32", shape=[2, 3])
    t.contents.fp32_contents.extend(X.reshape(-1).tolist())
    assert digest(typed) == digest(raw_request(X))


def test_key_changes_with_data_shape_outputs_and_result_parameters() -> None:
    base = digest(raw_request(X))
    assert digest(raw_request(X + 1)) != base
    assert digest(raw_request(X.reshape(3, 2))) != base
    with_output = raw_request(X)
    with_output.outputs.add(name="output")
    assert digest(with_output) != base
    assert digest(raw_request(X, temperature="0.5")) != base


def test_neutral_parameters_and_input_order_do_not_change_the_key() -> None:
    assert digest(raw_request(X, ferry_cache=True)) == digest(raw_request(X))
    a = pb.ModelInferRequest(model_name="m")
    codec.add_input(a, "x", X)
    codec.add_input(a, "y", X + 1)
    b = pb.ModelInferRequest(model_name="m")
    codec.add_input(b, "y", X + 1)
    codec.add_input(b, "x", X)
    assert digest(a) == digest(b)


def test_key_carries_model_and_resolved_version() -> None:
    assert cache_key("m", "1", "d") != cache_key("m", "2", "d")
    assert cache_key("m", "1", "d").startswith("ferry:v1:m:1:")


@pytest.mark.parametrize(
    ("value", "out"), [(False, True), (True, False), ("false", True), ("0", True), ("yes", False)]
)
def test_opt_out_parameter(value: bool | str, out: bool) -> None:
    assert cache_opt_out(raw_request(X, ferry_cache=value)) is out
    assert cache_opt_out(raw_request(X)) is False


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@aio
async def test_lru_evicts_oldest_and_expires() -> None:
    clock = Clock()
    lru = LruBackend(max_entries=2, clock=clock)
    await lru.set_many([("a", b"1"), ("b", b"2")], ttl_s=10)
    assert await lru.get_many(["a"]) == [b"1"]  # a is now the most recent
    await lru.set_many([("c", b"3")], ttl_s=10)
    assert await lru.get_many(["a", "b", "c"]) == [b"1", None, b"3"]
    clock.now = 11
    assert await lru.get_many(["a", "c"]) == [None, None]
    assert len(lru) == 0


class Sick:
    """A backend that fails or hangs, counting the calls that reach it."""

    name = "sick"

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        self.calls += 1
        if self.mode == "hang":
            await asyncio.sleep(10)
        raise ConnectionError("refused")

    async def set_many(self, items: list[tuple[str, bytes]], ttl_s: int) -> None:
        await self.get_many([])

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("mode", ["refuse", "hang"])
@aio
async def test_fail_open_then_breaker_stops_asking(mode: str) -> None:
    backend = Sick(mode)
    cache = ResultCache(backend, timeout_s=0.02, breaker=CircuitBreaker(failures=2, reset_s=60))
    for _ in range(5):
        assert await cache.get_many(["k1", "k2"]) == [None, None]
    await cache.set_many([("k", b"v")])
    assert backend.calls == 2
    assert cache.breaker.state == OPEN
    assert cache.stats.errors == 2 and cache.stats.skipped == 4 and cache.stats.misses == 10


class Healing:
    """A backend that hangs until it is told it is well again, then answers every key."""

    name = "healing"

    def __init__(self) -> None:
        self.well = False
        self.calls = 0

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        self.calls += 1
        if not self.well:
            await asyncio.sleep(10)
        return [b"v" for _ in keys]

    async def set_many(self, items: list[tuple[str, bytes]], ttl_s: int) -> None:
        pass

    async def close(self) -> None:
        pass


@aio
async def test_a_cancelled_half_open_trial_does_not_keep_the_cache_shut() -> None:
    """A caller cancelled (a client gone, a deadline) during the trial must not wedge the breaker:
    the next lookup is the trial, and a well backend closes it."""
    backend = Healing()
    cache = ResultCache(backend, timeout_s=5, breaker=CircuitBreaker(failures=1, reset_s=0.0))
    cache.breaker.failure()  # open; with reset 0 the next look is half-open
    trial = asyncio.ensure_future(cache.get_many(["k"]))
    while backend.calls == 0:
        await asyncio.sleep(0.001)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    backend.well = True
    assert await cache.get_many(["k"]) == [b"v"]
    assert backend.calls == 2 and cache.breaker.state == CLOSED and cache.stats.errors == 0


class Stubborn:
    """A backend that hangs, and when cancelled takes a second more to stop (a client cleaning up
    a dead connection): waiting for it to stop would hold the caller far past its timeout."""

    name = "stubborn"

    def __init__(self) -> None:
        self.calls = 0
        self.stopped = 0

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        self.calls += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(1.0)
            self.stopped += 1
            raise
        return [None for _ in keys]

    async def set_many(self, items: list[tuple[str, bytes]], ttl_s: int) -> None:
        await self.get_many([])

    async def close(self) -> None:
        pass


@aio
async def test_a_backend_slow_to_stop_costs_the_caller_its_timeout_only() -> None:
    backend = Stubborn()
    cache = ResultCache(backend, timeout_s=0.02, breaker=CircuitBreaker(failures=1, reset_s=0.0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await cache.get_many(["k"]) == [None]
    await cache.set_many([("k", b"v")])  # the half-open trial: it, too, ends at its timeout
    waited = loop.time() - started
    assert cache.stats.errors == 2 and backend.calls == 2 and backend.stopped == 0
    assert waited < 0.9  # neither waited for the backend's one-second clean-up
    await asyncio.sleep(1.1)
    assert backend.stopped == 2  # both late calls were cancelled, and ended in the background


@aio
async def test_values_over_the_cap_are_not_stored() -> None:
    cache = ResultCache(LruBackend(), max_value_bytes=4)
    await cache.set_many([("small", b"1234"), ("big", b"12345")])
    assert await cache.get_many(["small", "big"]) == [b"1234", None]
    assert cache.stats.too_large == 1 and cache.stats.hits == 1


@aio
async def test_single_flight_runs_identical_calls_once() -> None:
    flights = SingleFlight()
    runs = 0
    gate = asyncio.Event()

    async def work() -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        return "answer"

    calls = [asyncio.ensure_future(flights.do("k", work)) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*calls)
    assert runs == 1
    assert [r for r, _ in results] == ["answer"] * 10
    assert sum(shared for _, shared in results) == 9
    assert len(flights) == 0


@aio
async def test_single_flight_survives_a_cancelled_leader_and_shares_errors() -> None:
    flights = SingleFlight()
    gate = asyncio.Event()

    async def work() -> str:
        await gate.wait()
        raise ValueError("upstream said no")

    leader = asyncio.ensure_future(flights.do("k", work))
    await asyncio.sleep(0)
    follower = asyncio.ensure_future(flights.do("k", work))
    await asyncio.sleep(0)
    leader.cancel()
    gate.set()
    with pytest.raises(ValueError, match="upstream said no"):
        await follower


class Shared:
    """A Redis-like backend in memory that counts the calls reaching it; TTLs as Redis reports them."""

    name = "redis"

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, float]] = {}
        self.calls = 0

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [v for v, _ in await self.get_many_ttl(keys)]

    async def get_many_ttl(self, keys: list[str]) -> list[tuple[bytes | None, float]]:
        self.calls += 1
        return [self.data.get(k, (None, 0.0)) for k in keys]

    async def set_many(self, items: list[tuple[str, bytes]], ttl_s: int) -> None:
        self.calls += 1
        for k, v in items:
            self.data[k] = (v, float(ttl_s))

    async def close(self) -> None:
        pass


ANSWER = pb.ModelInferResponse(model_name="m", model_version="1").SerializeToString()


def two_level(clock: Clock, **kw: Any) -> tuple[ResultCache, Shared]:
    backend = Shared()
    levels: list[tuple[str, int]] = []
    cache = ResultCache(
        backend, near=NearCache(1 << 20, clock=clock), on_hits=lambda lv, n: levels.append((lv, n)), **kw
    )
    cache.levels = levels  # type: ignore[attr-defined]
    return cache, backend


@aio
async def test_fills_write_both_levels_and_a_near_hit_makes_no_backend_call() -> None:
    cache, backend = two_level(Clock(), ttl_s=30)
    assert cache.first_level and not cache.local
    await cache.set_many([("k", ANSWER)])
    calls = backend.calls
    assert backend.data["k"] == (ANSWER, 30.0)
    assert cache.get_local("k") == ANSWER
    assert backend.calls == calls
    assert cache.stats.hits == cache.stats.near_hits == 1 and cache.stats.misses == 0
    assert cache.levels == [("near", 1)]  # type: ignore[attr-defined]


@aio
async def test_a_near_miss_is_no_miss_until_the_backend_says_so() -> None:
    cache, backend = two_level(Clock())
    assert cache.get_local("k") is None
    assert cache.stats.misses == 0
    assert await cache.get_many(["k"]) == [None]
    assert cache.stats.misses == 1 and backend.calls == 1


@aio
async def test_near_entries_expire_no_later_than_their_backend_ttl() -> None:
    clock = Clock()
    cache, backend = two_level(clock, ttl_s=10, near_ttl_s=60)
    await cache.set_many([("filled", ANSWER)])
    backend.data["other"] = (ANSWER, 3.0)  # another replica stored it; 3 s left in the backend
    assert await cache.get_many(["other"]) == [ANSWER]  # a backend hit is copied to the near cache
    assert cache.get_local("other") == ANSWER
    assert cache.levels == [("redis", 1), ("near", 1)]  # type: ignore[attr-defined]
    clock.now = 3.0
    assert cache.get_local("other") is None and cache.get_local("filled") == ANSWER
    clock.now = 10.0
    assert cache.get_local("filled") is None


@aio
async def test_near_cap_shortens_life_and_unparsable_backend_values_stay_out() -> None:
    clock = Clock()
    cache, backend = two_level(clock, ttl_s=300, near_ttl_s=2)
    await cache.set_many([("k", ANSWER)])
    backend.data["junk"] = (b"\xff\xff not a response", 100.0)
    backend.data["forever"] = (ANSWER, 0.0)  # no TTL known: not copied
    assert await cache.get_many(["junk", "forever"]) == [b"\xff\xff not a response", ANSWER]
    assert cache.get_local("junk") is None and cache.get_local("forever") is None
    clock.now = 2.0
    assert cache.get_local("k") is None


@aio
async def test_a_new_version_never_answers_from_an_old_versions_near_entry() -> None:
    cache, _ = two_level(Clock())
    d = digest(raw_request(X))
    await cache.set_many([(cache_key("m", "1", d), ANSWER)])
    assert cache.get_local(cache_key("m", "2", d)) is None
    assert cache.get_local(cache_key("m", "1", d)) == ANSWER


@aio
async def test_near_cache_keeps_answering_while_the_backend_is_sick() -> None:
    backend = Sick("refuse")
    cache = ResultCache(backend, near=NearCache(1 << 20), breaker=CircuitBreaker(failures=1, reset_s=60))
    await cache.set_many([("k", ANSWER)])  # the backend write fails: fail-open, the near level keeps it
    assert cache.stats.errors == 1 and cache.breaker.state == OPEN
    assert cache.get_local("k") == ANSWER and backend.calls == 1
