"""Cache keys (typed == raw, what changes a key), LRU with TTL, fail-open with a breaker, single-flight."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core import codec
from gateway.breaker import OPEN, CircuitBreaker
from gateway.cache import (
    LruBackend,
    ResultCache,
    SingleFlight,
    cache_key,
    cache_opt_out,
    request_digest,
)


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
