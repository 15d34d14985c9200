"""SharedLimiter on a real, private redis-server: one rate for two replicas, and surviving Redis.

Two limiters on one Redis stand for two gateway replicas. Redis is killed and restarted
on the same port, and SIGSTOPped, to show the fallback to local buckets and the way back.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from gateway.ratelimit import SHARED_DOWN, SHARED_UP, SharedLimiter, idle_ttl_ms
from tests.support.deps import require_binary
from tests.support.procs import RedisServer

require_binary("redis-server")

LOGGER = "ferry.gateway.ratelimit"
# Generous next to the 50 ms default: these tests must not fall back because a shared
# 2-vCPU machine was slow, only because Redis really went away.
TIMEOUT_S = 0.5


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()


def test_two_replicas_share_one_rate(redis_server: RedisServer) -> None:
    rate, burst = 20.0, 5.0
    events: list[bool] = []

    async def scenario() -> tuple[list[int], float]:
        replicas = [
            SharedLimiter(redis_server.url, timeout_s=TIMEOUT_S, on_fallback=events.append) for _ in range(2)
        ]
        admitted = [0, 0]
        start = time.monotonic()
        calls = 0
        while time.monotonic() - start < 1.5 and calls < 5000:
            for i, limiter in enumerate(replicas):
                admitted[i] += await limiter.take("team-a", rate, burst)
                calls += 1
            await asyncio.sleep(0.002)
        elapsed = time.monotonic() - start
        assert all(limiter.shared for limiter in replicas)
        for limiter in replicas:
            await limiter.close()
        return admitted, elapsed

    admitted, elapsed = asyncio.run(scenario())
    total = sum(admitted)
    expected = burst + rate * elapsed
    assert events == []  # Redis answered every call: the counts are the shared bucket's
    assert 0.6 * expected <= total <= burst + rate * elapsed * 1.3 + 2, (admitted, elapsed)
    assert total < 0.75 * 2 * expected, "two replicas admitted about what two local buckets would"
    assert min(admitted) > 0, admitted  # both replicas drew from the one bucket


def test_redis_killed_then_back(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    events: list[bool] = []
    retry_s = 0.5
    rate, burst = 0.5, 3.0  # refills too slowly to matter within the test

    async def scenario() -> None:
        limiter = SharedLimiter(
            redis_server.url, timeout_s=TIMEOUT_S, retry_s=retry_s, on_fallback=events.append
        )
        assert await limiter.take("team-a", rate, burst)
        assert limiter.shared and events == []

        redis_server.stop()  # SIGKILL, mid-run
        answers = [await limiter.take("team-b", rate, burst) for _ in range(10)]
        assert not limiter.shared
        assert events == [True]
        assert answers == [True] * 3 + [False] * 7  # the replica's own bucket still limits

        restarted = RedisServer(port=redis_server.port).start()
        redis_server.proc = restarted.proc  # the fixture stops it
        deadline = time.monotonic() + retry_s + 5.0
        polls = 0
        while not limiter.shared and time.monotonic() < deadline and polls < 500:
            await limiter.take("team-c", rate, burst)
            polls += 1
            await asyncio.sleep(0.05)
        assert limiter.shared
        assert events == [True, False]
        await limiter.close()

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 2, messages  # one line per transition, not one per call
    assert messages[0].startswith(SHARED_DOWN)
    assert messages[1] == SHARED_UP
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == LOGGER)


def test_slow_redis_times_out_to_local(redis_server: RedisServer) -> None:
    events: list[bool] = []
    assert redis_server.proc is not None

    async def scenario() -> None:
        limiter = SharedLimiter(redis_server.url, timeout_s=0.1, retry_s=0.5, on_fallback=events.append)
        assert await limiter.take("team-a", 10.0, 2.0)
        redis_server.proc.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing
        try:
            answers = [await asyncio.wait_for(limiter.take("team-a", 10.0, 2.0), 5.0) for _ in range(4)]
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        assert not limiter.shared and events == [True]
        assert answers == [True, True, False, False]
        await limiter.close()

    asyncio.run(scenario())


def test_keys_carry_the_name_and_expire(redis_server: RedisServer) -> None:
    rate, burst = 20.0, 5.0

    async def scenario() -> None:
        limiter = SharedLimiter(redis_server.url, timeout_s=TIMEOUT_S)
        client = aioredis.from_url(redis_server.url)
        try:
            for name in ("team-a", "team-b"):
                assert await limiter.take(name, rate, burst)
            keys = sorted([k async for k in client.scan_iter(match="ferry:rl:*", count=100)])
            assert keys == [b"ferry:rl:team-a", b"ferry:rl:team-b"]
            for key in keys:
                ttl = await client.pttl(key)
                assert 0 < ttl <= idle_ttl_ms(rate, burst)
                fields = await client.hgetall(key)
                assert set(fields) == {b"tokens", b"ts"}
                assert float(fields[b"tokens"]) == pytest.approx(burst - 1, abs=0.1)
            deadline = time.monotonic() + 5.0
            polls = 0
            while await client.exists(*keys) and time.monotonic() < deadline and polls < 200:
                polls += 1
                await asyncio.sleep(0.05)
            assert await client.exists(*keys) == 0  # idle buckets vanish on their own
        finally:
            await client.aclose()
            await limiter.close()

    asyncio.run(scenario())
