"""Per-API-key rate limits that hold across every gateway replica, through Redis.

Several gateway replicas sit behind one load balancer, so a client's calls spread over
all of them. A token bucket kept in each replica's memory would let N replicas admit N
times the configured rate; the limit a key is sold with is for the fleet, not for a
process. So the bucket lives in Redis, and one server-side Lua script refills it and takes
a token atomically: two replicas can never both spend the last token, and the refill runs
on the Redis server's clock, so replicas whose clocks disagree still agree on the bucket.

Redis is a dependency the gateway must survive losing. While it is down or slow, each
replica falls back to a bucket of its own (the fleet then admits up to N times the rate,
which beats refusing everything or letting everything through), warns once, and asks
Redis again only every ``retry_s`` seconds so a dead Redis does not add a timeout to
every call. Redis keys carry the key's sha256 digest (what the key file holds), never the API
key itself: a ``SCAN`` or a Redis dump must not reveal credentials, and two keys that share a
configured name still get a bucket each.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from ferry.core.auth import Buckets, check_limits
from gateway.bounded import bounded

log = logging.getLogger("ferry.gateway.ratelimit")

# KEYS[1]: the bucket's hash; ARGV: rate (tokens/s), burst, TTL in ms.
# The timestamp is kept in integer microseconds: about 1.7e15, exact in a Lua double,
# where seconds with a fraction would lose precision when Redis turns the number into a
# string. Numbers go to redis.call as numbers (written with 17 significant digits),
# never through tostring (14 digits).
_TAKE_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local ttl_ms = tonumber(ARGV[3])
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', key, 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now_us
end
local elapsed = (now_us - ts) / 1000000
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', key, 'tokens', tokens, 'ts', now_us)
redis.call('PEXPIRE', key, ttl_ms)
return allowed
"""

SHARED_DOWN = "rate limits: Redis unreachable, each replica now counts on its own"
SHARED_UP = "rate limits: shared through Redis again"


def idle_ttl_ms(rate: float, burst: float) -> int:
    """How long Redis keeps an idle bucket: twice the time to refill it, at least 1 s.

    After one full refill time an untouched bucket is full again, the same as a missing
    one, so deleting it later loses nothing; the factor 2 and the floor absorb clock jitter.
    """
    return max(1000, math.ceil(burst / rate * 2 * 1000))


class Fallback:
    """The tiny breaker: which store answers, and when Redis may be asked again.

    Kept free of I/O so its transitions are tested with a fake clock. After a failure
    Redis is skipped for ``retry_s``; then a single call is let through as the trial, and
    the others keep counting locally until it answers.
    """

    def __init__(self, retry_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_s = retry_s
        self._clock = clock
        self.shared = True
        self._retry_at = 0.0

    def try_shared(self) -> bool:
        """While local, one trial per ``retry_s`` reaches Redis: a dead Redis costs one timeout per window."""
        if self.shared:
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        self._retry_at = now + self.retry_s
        return True

    def failed(self) -> bool:
        """Redis failed a call; True when that moves the limits from shared to local."""
        self._retry_at = self._clock() + self.retry_s
        changed = self.shared
        self.shared = False
        return changed

    def succeeded(self) -> bool:
        """Redis answered; True when that moves the limits from local back to shared."""
        changed = not self.shared
        self.shared = True
        return changed


class SharedLimiter:
    """Token buckets in Redis shared by all replicas, with a local fallback that never raises."""

    def __init__(
        self,
        redis_url: str,
        *,
        timeout_s: float = 0.05,
        retry_s: float = 2.0,
        prefix: str = "ferry:rl:",
        clock: Callable[[], float] = time.monotonic,
        on_fallback: Callable[[bool], None] | None = None,
    ) -> None:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        from gateway.redis_url import make_client

        self.timeout_s = timeout_s
        self.prefix = prefix
        self._on_fallback = on_fallback
        self._local = Buckets(clock)
        self._fallback = Fallback(retry_s, clock)
        # One immediate retry gets past a pooled connection that a restarted Redis closed;
        # anything slower than that is the fallback's job, not the client's.
        # The same URL kinds as the result cache (single, Sentinel, Cluster), built by the same helper.
        self._redis = make_client(redis_url, timeout_s=timeout_s, retry=Retry(NoBackoff(), 1))
        self._client: Any = self._redis.client
        self._script: Any = self._client.register_script(_TAKE_LUA)

    @property
    def shared(self) -> bool:
        """False while Redis is out of reach and each replica enforces the rate on its own."""
        return self._fallback.shared

    async def take(self, name: str, rate: float, burst: float) -> bool:
        check_limits(rate, burst)
        if self._fallback.try_shared():
            try:
                admitted = await bounded(
                    self._script(keys=[self.prefix + name], args=[rate, burst, idle_ttl_ms(rate, burst)]),
                    self.timeout_s,
                )
            except Exception as err:  # Redis trouble of any kind means local limits, never an error
                if self._fallback.failed():
                    log.warning("%s (%s)", SHARED_DOWN, type(err).__name__)
                    self._notify(True)
            else:
                if self._fallback.succeeded():
                    log.warning(SHARED_UP)
                    self._notify(False)
                return bool(admitted)
        return self._local.take(name, rate, burst)

    def _notify(self, local: bool) -> None:
        if self._on_fallback is not None:
            self._on_fallback(local)

    async def close(self) -> None:
        await self._redis.aclose()
