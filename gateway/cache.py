"""The result cache: canonical request keys, two backends, fail-open access, single-flight.

Key = model + *resolved* version + sha256 of the canonical request, so a new
version never answers from an old version's entries. The canonical request is
each input's name, datatype, shape and raw little-endian bytes (typed contents
are converted to the same bytes first, so typed and raw requests hash alike),
in name order, then the requested outputs with their parameters, then the
request parameters that can change a result (``NEUTRAL_PARAMETERS`` do not).

``ResultCache`` never fails a request: a backend error or a call slower than
the timeout counts as a miss (and an error in the metrics), and a circuit
breaker stops asking a sick backend until its reset period has passed. Values
over the size cap are not stored. Lookups and fills take lists so the gateway
does one MGET and one pipeline per upstream batch; the in-process LRU also
answers one key at once (``get_local``), so a hit never waits for a batch.

Values are serialized answers without their ``id``: a hit goes back to the
caller as those bytes plus the caller's ``id`` and the hit mark appended
(``cached_answer``). Protobuf merges concatenated messages, so nothing is
parsed or serialized again on a hit.

With Redis, an optional near cache (``gateway.near_cache``) sits in front: a hit there
makes no Redis call. Fills write both levels; a Redis hit is copied into the near cache
for no longer than the entry has left in Redis (one pipeline of GET and PTTL), so the
first level never outlives the second. ``stats.near_hits`` counts the first level's share.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ferry._proto.inference import grpc_service_pb2 as pb
from gateway.bounded import bounded
from gateway.breaker import CircuitBreaker
from gateway.near_cache import NearCache
from gateway.redis_url import make_client

log = logging.getLogger("ferry.gateway.cache")

# Request parameter that opts one request out of the cache (bool false, or "false").
OPT_OUT_PARAMETER = "ferry_cache"
# Response parameter set to true on answers served from the cache.
HIT_PARAMETER = "ferry_cache_hit"
# Request parameters that never change a result: left out of the key.
NEUTRAL_PARAMETERS = frozenset(
    {OPT_OUT_PARAMETER, "timeout", "priority", "headers", "triton_enable_empty_final_response"}
)
KEY_PREFIX = "ferry:v1"


_HIT_MARK = pb.ModelInferResponse(
    parameters={HIT_PARAMETER: pb.InferParameter(bool_param=True)}
).SerializeToString()


def cached_answer(value: bytes, request_id: str) -> bytes:
    """The wire answer for a hit: the stored answer, the caller's ``id``, ``ferry_cache_hit`` true."""
    if request_id:
        return value + pb.ModelInferResponse(id=request_id).SerializeToString() + _HIT_MARK
    return value + _HIT_MARK


def _param_repr(param: pb.InferParameter) -> str:
    which = param.WhichOneof("parameter_choice")
    return f"{which}={getattr(param, which)!r}" if which else "none"


def cache_opt_out(request: pb.ModelInferRequest) -> bool:
    """True when the request asks not to use the cache (``ferry_cache`` false)."""
    if OPT_OUT_PARAMETER not in request.parameters:
        return False
    param = request.parameters[OPT_OUT_PARAMETER]
    which = param.WhichOneof("parameter_choice")
    if which == "bool_param":
        return not param.bool_param
    if which == "string_param":
        return param.string_param.strip().lower() in ("false", "0", "no", "off")
    if which in ("int64_param", "uint64_param"):
        return getattr(param, which) == 0
    return False


def request_digest(request: pb.ModelInferRequest, raw_inputs: Sequence[bytes]) -> str:
    """sha256 of the canonical request; ``raw_inputs[i]`` is input i's raw little-endian bytes."""
    h = hashlib.sha256()
    order = sorted(range(len(request.inputs)), key=lambda i: request.inputs[i].name)
    for i in order:
        t = request.inputs[i]
        data = raw_inputs[i]
        h.update(f"in|{t.name}|{t.datatype}|{list(t.shape)}|{len(data)}|".encode())
        h.update(data)
        for k in sorted(t.parameters):
            h.update(f"ip|{k}|{_param_repr(t.parameters[k])}|".encode())
    for out in sorted(request.outputs, key=lambda o: o.name):
        h.update(f"out|{out.name}|".encode())
        for k in sorted(out.parameters):
            h.update(f"op|{k}|{_param_repr(out.parameters[k])}|".encode())
    for k in sorted(request.parameters):
        if k not in NEUTRAL_PARAMETERS:
            h.update(f"p|{k}|{_param_repr(request.parameters[k])}|".encode())
    return h.hexdigest()


def cache_key(model: str, version: str, digest: str) -> str:
    return f"{KEY_PREFIX}:{model}:{version}:{digest}"


class Backend(Protocol):
    name: str

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...
    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None: ...
    async def close(self) -> None: ...


class LruBackend:
    """In-process LRU with per-entry expiry: the cache when no Redis is configured."""

    name = "lru"

    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get_now(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry[1]

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.get_now(key) for key in keys]

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        expires = self.clock() + ttl_s
        for key, value in items:
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    async def close(self) -> None:
        self._data.clear()


class RedisBackend:
    """Redis through redis.asyncio: one MGET per lookup batch, one pipeline per fill batch.

    The URL carries everything: ``redis://user:password@host:port/db``, ``rediss://`` for
    TLS (``?ssl_cert_reqs=required&ssl_ca_certs=...``), ``redis+sentinel://`` or
    ``redis+cluster://`` (``gateway.redis_url``).
    """

    name = "redis"

    def __init__(self, url: str, timeout_s: float) -> None:
        self._redis = make_client(url, timeout_s=timeout_s, max_connections=256)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self._redis.mget(keys)

    async def get_many_ttl(self, keys: Sequence[str]) -> list[tuple[bytes | None, float]]:
        """Values with the seconds each has left (0 for none, or no expiry known)."""
        async with self._redis.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            replies = await pipe.execute()
        return [
            (value, ttl_ms / 1000 if isinstance(ttl_ms, int) and ttl_ms > 0 else 0.0)
            for value, ttl_ms in zip(replies[0::2], replies[1::2], strict=True)
        ]

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        async with self._redis.client.pipeline(transaction=False) as pipe:
            for key, value in items:
                pipe.set(key, value, ex=max(1, ttl_s))
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()


def _parses(value: bytes) -> bool:
    try:
        pb.ModelInferResponse.FromString(value)
    except Exception:
        return False
    return True


@dataclass
class CacheStats:
    hits: int = 0  # every level
    near_hits: int = 0  # of which the near cache answered
    misses: int = 0
    errors: int = 0
    skipped: int = 0  # lookups not attempted because the breaker was open
    stores: int = 0
    too_large: int = 0


@dataclass
class ResultCache:
    """Fail-open access to a backend, guarded by a breaker and a per-call timeout."""

    backend: Backend
    ttl_s: int = 300
    max_value_bytes: int = 1 << 20
    timeout_s: float = 0.05
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    stats: CacheStats = field(default_factory=CacheStats)
    on_error: Callable[[str], None] | None = None
    near: NearCache | None = None  # the first level in front of a shared backend
    near_ttl_s: float = 60.0  # cap on a near entry's life, under its Redis TTL
    on_hits: Callable[[str, int], None] | None = None  # (level, count): per-level metrics

    async def _guarded(self, op: str, call: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        if not self.breaker.allow():
            self.stats.skipped += 1
            return False, None
        try:
            result = await bounded(call(), self.timeout_s)
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except Exception as err:  # fail-open: any backend trouble is a miss, never an error
            self.stats.errors += 1
            self.breaker.failure()
            if self.on_error is not None:
                self.on_error(op)
            log.warning("cache %s failed: %s", op, type(err).__name__, extra={"backend": self.backend.name})
            return False, None
        self.breaker.success()
        return True, result

    @property
    def local(self) -> bool:
        """The backend answers in-process (``get_local``), with no I/O that could fail or stall."""
        return hasattr(self.backend, "get_now")

    @property
    def first_level(self) -> bool:
        """Something in-process can answer before any I/O: the LRU backend or the near cache."""
        return self.local or self.near is not None

    def _hit(self, level: str, count: int) -> None:
        self.stats.hits += count
        if self.on_hits is not None and count:
            self.on_hits(level, count)

    def get_local(self, key: str) -> bytes | None:
        """One in-process lookup; only call when ``first_level``.

        A near-cache miss is not a miss yet (Redis has not been asked), so only the LRU
        backend's misses are counted here.
        """
        if self.local:
            value: bytes | None = self.backend.get_now(key)  # type: ignore[attr-defined]
            if value is None:
                self.stats.misses += 1
            else:
                self._hit(self.backend.name, 1)
            return value
        assert self.near is not None
        value = self.near.get(key)
        if value is not None:
            self.stats.near_hits += 1
            self._hit("near", 1)
        return value

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with_ttl = self.near is not None and hasattr(self.backend, "get_many_ttl")
        started = time.monotonic()
        if with_ttl:
            ok, pairs = await self._guarded("get", lambda: self.backend.get_many_ttl(keys))  # type: ignore[attr-defined]
            values = [v for v, _ in pairs] if ok else [None] * len(keys)
            if ok:
                self._fill_near(keys, pairs, started)
        else:
            ok, values = await self._guarded("get", lambda: self.backend.get_many(keys))
            if not ok:
                values = [None] * len(keys)
        hits = sum(v is not None for v in values)
        self._hit(self.backend.name, hits)
        self.stats.misses += len(keys) - hits
        return values

    def _fill_near(
        self, keys: Sequence[str], pairs: Sequence[tuple[bytes | None, float]], started: float
    ) -> None:
        """Copy Redis hits to the near cache, for no longer than Redis keeps them. The life
        counts from before the call, so the near entry cannot outlive the Redis one; values
        are parsed first, since anyone with access to the Redis could have written them."""
        assert self.near is not None
        spent = time.monotonic() - started
        for key, (value, left_s) in zip(keys, pairs, strict=True):
            if value is not None and left_s > 0 and _parses(value):
                self.near.put(key, value, min(self.near_ttl_s, left_s - spent))

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        keep = [(k, v) for k, v in items if len(v) <= self.max_value_bytes]
        self.stats.too_large += len(items) - len(keep)
        if keep:
            if self.near is not None:
                # before the Redis write, so the near entry expires no later than the Redis one
                life = min(self.near_ttl_s, self.ttl_s)
                for key, value in keep:
                    self.near.put(key, value, life)
            ok, _ = await self._guarded("set", lambda: self.backend.set_many(keep, self.ttl_s))
            if ok:
                self.stats.stores += len(keep)

    async def close(self) -> None:
        if self.near is not None:
            self.near.clear()
        try:
            await self.backend.close()
        except Exception:
            log.warning("cache close failed", exc_info=True)


class SingleFlight:
    """Identical concurrent calls share one execution: the first starts it, the rest await it.

    The execution runs in its own task, so a leader whose caller goes away
    (cancelled, deadline) does not take the followers down with it.
    """

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Task[Any]] = {}
        self.shared = 0

    async def do(self, key: str, call: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """Returns (result, shared); ``shared`` is True for callers that joined a flight."""
        flight = self._flights.get(key)
        shared = flight is not None
        if flight is None:
            flight = asyncio.ensure_future(call())
            self._flights[key] = flight
            flight.add_done_callback(lambda f, k=key: self._done(k, f))
        else:
            self.shared += 1
        return await asyncio.shield(flight), shared

    def _done(self, key: str, flight: asyncio.Task[Any]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: a flight nobody awaits any more must not warn

    def __len__(self) -> int:
        return len(self._flights)
