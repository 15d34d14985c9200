"""Rate limits without Redis: the local token bucket and the fallback breaker, on a fake clock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from ferry.core.auth import Buckets
from gateway.ratelimit import SHARED_DOWN, SHARED_UP, Fallback, SharedLimiter, idle_ttl_ms


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_is_admitted_at_once_then_refused() -> None:
    clock = FakeClock()
    buckets = Buckets(clock)
    assert [buckets.take("a", rate=2.0, burst=5.0) for _ in range(7)] == [True] * 5 + [False] * 2


def test_refills_at_rate_up_to_burst() -> None:
    clock = FakeClock()
    buckets = Buckets(clock)
    for _ in range(5):
        assert buckets.take("a", rate=2.0, burst=5.0)
    assert not buckets.take("a", rate=2.0, burst=5.0)
    clock.now += 0.25  # half a token
    assert not buckets.take("a", rate=2.0, burst=5.0)
    clock.now += 0.25  # the second half: one token
    assert buckets.take("a", rate=2.0, burst=5.0)
    assert not buckets.take("a", rate=2.0, burst=5.0)
    clock.now += 1.5  # three tokens
    assert [buckets.take("a", rate=2.0, burst=5.0) for _ in range(4)] == [True] * 3 + [False]
    clock.now += 3600  # an hour idle fills the bucket to burst, not beyond
    assert sum(buckets.take("a", rate=2.0, burst=5.0) for _ in range(20)) == 5


def test_take_n_tokens_at_once() -> None:
    clock = FakeClock()
    buckets = Buckets(clock)
    assert buckets.take("a", rate=1.0, burst=5.0, n=3)
    assert not buckets.take("a", rate=1.0, burst=5.0, n=3)
    assert buckets.take("a", rate=1.0, burst=5.0, n=2)


def test_names_have_separate_buckets() -> None:
    clock = FakeClock()
    buckets = Buckets(clock)
    assert sum(buckets.take("a", rate=1.0, burst=3.0) for _ in range(10)) == 3
    assert sum(buckets.take("b", rate=1.0, burst=3.0) for _ in range(10)) == 3
    clock.now += 1.0
    assert buckets.take("a", rate=1.0, burst=3.0)
    assert buckets.take("b", rate=1.0, burst=3.0)


def test_clock_stepping_back_removes_no_tokens() -> None:
    clock = FakeClock()
    buckets = Buckets(clock)
    assert buckets.take("a", rate=1.0, burst=2.0)
    clock.now -= 100
    assert buckets.take("a", rate=1.0, burst=2.0)
    assert not buckets.take("a", rate=1.0, burst=2.0)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 5.0), (-1.0, 5.0), (1.0, 0.0), (float("nan"), 1.0)])
def test_limits_a_bucket_cannot_honour_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        Buckets().take("a", rate=rate, burst=burst)


def test_idle_ttl_is_twice_the_refill_time_and_at_least_a_second() -> None:
    assert idle_ttl_ms(rate=20.0, burst=5.0) == 1000
    assert idle_ttl_ms(rate=1.0, burst=10.0) == 20_000
    assert idle_ttl_ms(rate=0.1, burst=1.0) == 20_000


def test_fallback_skips_redis_for_retry_s_then_lets_one_trial_through() -> None:
    clock = FakeClock()
    fb = Fallback(retry_s=2.0, clock=clock)
    assert fb.shared and fb.try_shared()
    assert fb.failed()  # shared -> local
    assert not fb.shared
    assert not fb.try_shared()
    clock.now += 1.9
    assert not fb.try_shared()
    clock.now += 0.2
    assert fb.try_shared()  # the trial
    assert not fb.try_shared()  # everyone else stays local while it is out
    assert not fb.failed()  # a failed trial is no new transition
    assert not fb.try_shared()
    clock.now += 2.0
    assert fb.try_shared()
    assert fb.succeeded()  # local -> shared
    assert fb.shared and fb.try_shared()
    assert not fb.succeeded()


class FakeScript:
    """Stands in for the registered Lua script: fails while ``down``, else admits everything."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    async def __call__(self, keys: Sequence[str], args: Sequence[float]) -> int:
        self.calls += 1
        if self.down:
            raise RedisConnectionError("refused")
        return 1


def test_shared_limiter_falls_back_warns_once_and_comes_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    events: list[bool] = []
    limiter = SharedLimiter(
        "redis://127.0.0.1:1/0", retry_s=2.0, clock=clock, on_fallback=events.append
    )  # constructing connects nothing
    script = FakeScript()
    monkeypatch.setattr(limiter, "_script", script)
    caplog.set_level(logging.WARNING, logger="ferry.gateway.ratelimit")

    async def scenario() -> None:
        assert await limiter.take("a", rate=1.0, burst=3.0)
        assert limiter.shared and events == []
        script.down = True
        answers = [await limiter.take("a", rate=1.0, burst=3.0) for _ in range(5)]
        assert answers == [True, True, True, False, False]  # a fresh local bucket, limiting
        assert not limiter.shared and events == [True]
        assert script.calls == 2  # the breaker kept the last four calls away from Redis
        clock.now += 2.5
        script.down = False
        assert await limiter.take("a", rate=1.0, burst=3.0)
        assert limiter.shared and events == [True, False]
        await limiter.close()

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "ferry.gateway.ratelimit"]
    assert len(messages) == 2
    assert messages[0].startswith(SHARED_DOWN) and "ConnectionError" in messages[0]
    assert messages[1] == SHARED_UP
    assert all(r.levelno == logging.WARNING for r in caplog.records)
