"""ModelInfer at the gateway: admit, resolve, validate, cache, single-flight, coalesce, route.

    request -> admission (bounded in-flight, else RESOURCE_EXHAUSTED at once)
            -> resolve the version (Discovery) and the model's signature
            -> prepare: validate like a worker, bring inputs to raw bytes
            -> cacheable? key = model + resolved version + canonical digest
               -> in-process cache or near cache: a hit is answered here, as stored bytes
               -> single-flight: identical concurrent misses share one execution
            -> Batcher: per model version and merge signature
               -> dispatch: one MGET for the batch's keys, hits answered,
                  misses merged into one upstream ModelInfer (Upstream: routed,
                  retried), answer split by rows, one pipeline fills the cache.

A merged call that fails for a reason other than the transport (a worker
rejecting something the gateway could not see) is re-run request by request,
so one bad request still fails alone.

A request of a sequence (``sequence_id`` and friends in its parameters) takes none of
that path: no cache, no single-flight, no batch. It goes upstream alone, its parameters
intact, one at a time per sequence, to the worker that holds the sequence's state
(``gateway.sequences``): a ``sequence_start`` picks one by rendezvous hashing over the
healthy workers that have the version, later requests follow the pin, and when that
worker is gone they fail with UNAVAILABLE instead of running where the state is not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.client._channel import translate
from ferry.core import tracing
from ferry.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FerryError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from ferry.core.modelconfig import ModelSpec
from gateway import metrics
from gateway.cache import ResultCache, SingleFlight, cache_key, cache_opt_out, cached_answer, request_digest
from gateway.coalescer import Batcher, Pending, Prepared, as_raw_request, merge, prepare, split
from gateway.discovery import Discovery
from gateway.hedging import is_sequence
from gateway.sequences import (
    SequenceOrder,
    SequenceRef,
    StickyMap,
    WaitedTooLong,
    ranked,
    rendezvous,
    sequence_of,
)
from gateway.upstream import Upstream, WorkerLost, call_metadata

log = logging.getLogger("ferry.gateway.dataplane")


# Errors of a merged call that one member could have caused: re-run the members one by one.
# Others (overload, deadline, a dead worker) would only be repeated, so every member gets them.
SPLITTABLE = (InvalidArgument, Internal, FailedPrecondition)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class CacheCounters:
    """Per model version cache outcomes, reported in ModelStatistics."""

    hit: Duration = field(default_factory=Duration)
    miss: Duration = field(default_factory=Duration)


@dataclass
class Job:
    """What rides with a request through the batcher."""

    model: str
    digest: str | None
    deadline: float | None
    request_id: str
    pinned: bool
    looked_up: bool = False  # the in-process cache already said miss
    trace: Any = None  # the request's tracing context (None when tracing is off)


def _parses(value: bytes) -> bool:
    """A value from a shared backend is checked before it is sent on: anyone with access to the
    Redis could have written that key."""
    try:
        pb.ModelInferResponse.FromString(value)
    except Exception:
        return False
    return True


class DataPlane:
    def __init__(
        self,
        discovery: Discovery,
        upstream: Upstream,
        cache: ResultCache | None,
        *,
        max_in_flight: int = 2048,
        coalesce: bool = True,
        max_batch: int = 64,
        upstream_per_worker: int = 2,
        sequences: StickyMap | None = None,
    ) -> None:
        self.discovery = discovery
        self.upstream = upstream
        self.cache = cache
        self.max_in_flight = max_in_flight
        self.coalesce = coalesce
        self.upstream_per_worker = upstream_per_worker
        self.flights = SingleFlight()
        self.batcher = Batcher(self._dispatch, max_rows=max_batch if coalesce else 1)
        self.in_flight = 0
        metrics.IN_FLIGHT.set_function(lambda: self.in_flight)
        self.cache_counters: dict[tuple[str, str], CacheCounters] = defaultdict(CacheCounters)
        self.sequences = sequences if sequences is not None else StickyMap()
        self.sequence_order = SequenceOrder()
        metrics.SEQUENCES.set_function(lambda: len(self.sequences))

    async def infer(
        self, request: pb.ModelInferRequest, deadline: float | None, request_id: str
    ) -> pb.ModelInferResponse | bytes:
        """The answer, as a message or as its serialized bytes (a cache hit)."""
        if self.in_flight >= self.max_in_flight:
            metrics.REJECTED.inc()
            raise ResourceExhausted(
                f"gateway overloaded: {self.in_flight} requests in flight (limit {self.max_in_flight}); "
                "retry later or on another replica"
            )
        self.in_flight += 1
        started = time.perf_counter()
        model = request.model_name
        status = "OK"
        try:
            return await self._infer(request, deadline, request_id)
        except FerryError as err:
            status = err.code.name
            log.info("request failed: %s %s", status, err.message, extra={"rid": request_id, "model": model})
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self.in_flight -= 1
            # names no worker lists stay out of the label set, so clients cannot grow it without bound
            if status != "OK" and not self.discovery.has_model(model):
                model = "_unknown"
            metrics.REQUESTS.observe(model, status, time.perf_counter() - started)

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None, request_id: str
    ) -> pb.ModelInferResponse | bytes:
        if is_sequence(request.parameters):
            return await self._sequence(request, deadline, request_id)
        model = request.model_name
        pinned = bool(request.model_version)
        routed = await self._route(model, request.model_version)
        if routed is None:
            # no worker has it ready: let a worker answer, so the caller sees the worker's own words
            return await self._forward_unknown(request, deadline, request_id)
        version, candidates, spec = routed
        if spec.sequence is not None:  # a stateful model: nothing shared, nothing merged
            return await self._alone(request, deadline, request_id)
        item = prepare(spec, request)
        digest = ckey = None
        looked_up = False
        if self.cache is not None and spec.response_cache and not cache_opt_out(request):
            digest = request_digest(request, item.raw)
            ckey = cache_key(model, version, digest)
            if self.cache.first_level:  # the LRU backend, or the near cache in front of Redis
                t0 = time.perf_counter_ns()
                with tracing.span("gateway.cache.local"):
                    value = self.cache.get_local(ckey)
                if value is not None or self.cache.local:  # a near miss still asks Redis
                    self._count_lookup(model, version, value is not None, time.perf_counter_ns() - t0)
                if value is not None:
                    return cached_answer(value, request.id)
                looked_up = self.cache.local
        job = Job(model, digest, deadline, request_id, pinned, looked_up, tracing.current())
        concurrency = self.upstream_per_worker * max(1, len(candidates))
        key: Hashable = (model, version, pinned)

        async def run() -> tuple[pb.ModelInferResponse, bool]:
            answer: tuple[pb.ModelInferResponse, bool] = await self.batcher.submit(
                key, item, concurrency, job, spec.max_batch_size
            )
            return answer

        shared = False
        if ckey is not None:
            (response, hit), shared = await self.flights.do(ckey, run)
            if shared:
                metrics.SINGLE_FLIGHT.inc()
        else:
            response, hit = await run()
        if hit:
            hit_answer: pb.ModelInferResponse | bytes = cached_answer(response, request.id)
            return hit_answer
        out: pb.ModelInferResponse = response
        if shared:  # the answer object is the flight leader's: answer with a copy
            out = pb.ModelInferResponse()
            out.CopyFrom(response)
        out.id = request.id
        return out

    # -- sequences -----------------------------------------------------------------------------
    async def _sequence(
        self, request: pb.ModelInferRequest, deadline: float | None, request_id: str
    ) -> pb.ModelInferResponse:
        """A request of a sequence: alone, uncached, after the sequence's earlier requests, on the
        worker that holds the sequence's state."""
        seq = sequence_of(request.model_name, request.parameters)
        if seq is None:  # an id of 0 or "" names no sequence (as in Triton): alone, for the worker
            return await self._alone(request, deadline, request_id)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with self.sequence_order.turn(seq.key, timeout):
                if seq.start:
                    return await self._sequence_start(seq, request, deadline, request_id)
                return await self._sequence_next(seq, request, deadline, request_id)
        except WaitedTooLong:
            raise DeadlineExceeded(
                f"deadline exceeded while an earlier request of {seq.describe()} was still running"
            ) from None

    async def _sequence_start(
        self, seq: SequenceRef, request: pb.ModelInferRequest, deadline: float | None, request_id: str
    ) -> pb.ModelInferResponse:
        """Pick the sequence's worker afresh: the first by rendezvous hashing among the healthy,
        non-ejected workers that have the version ready. A start holds no state yet, so one
        whose worker failed at the transport goes to the next choice, within the attempts."""
        self.sequences.drop(seq.key)
        model = seq.model
        try:
            version, candidates = self.discovery.route(model, request.model_version)
        except NotFound:
            return await self._forward_unknown(request, deadline, request_id)
        router = self.upstream.router
        now = router.clock()
        live = [a for a in candidates if router.endpoint(a).available(now)] or candidates
        choices = ranked(seq.key, live)[: max(1, self.upstream.policy.attempts)]
        if not choices:
            raise Unavailable(f"no healthy worker has model {model!r} version {version} ready")
        request.model_version = version
        for n, address in enumerate(choices):
            try:
                answer = await self.upstream.infer_on(address, request, deadline, request_id)
            except WorkerLost as err:
                time_left = None if deadline is None else deadline - time.monotonic()
                if n + 1 == len(choices) or (
                    time_left is not None and time_left <= self.upstream.policy.min_time_left_s
                ):
                    raise Unavailable(
                        f"{seq.describe()} could not start: worker {address} failed: {err.message}"
                    ) from err
                metrics.RETRIES.labels("unavailable").inc()
                log.info("sequence start: next worker", extra={"worker": address, "rid": request_id})
                continue
            if not seq.end:
                self.sequences.put(seq.key, address, answer.model_version or version)
            return answer
        raise Unavailable(f"no healthy worker has model {model!r} version {version} ready")  # not reached

    async def _sequence_next(
        self, seq: SequenceRef, request: pb.ModelInferRequest, deadline: float | None, request_id: str
    ) -> pb.ModelInferResponse:
        """Follow the pin; without one (another replica started the sequence, or this gateway
        restarted), the rendezvous choice over every worker that serves the model, healthy or
        not, which is where a start with the same workers went. Never another worker."""
        pin = self.sequences.get(seq.key)
        if pin is not None:
            address = pin.address
            if not request.model_version:
                request.model_version = pin.version
        else:
            chosen = rendezvous(seq.key, self.discovery.holders(seq.model))
            if chosen is None:  # no worker lists the model: let a worker word it
                return await self._alone(request, deadline, request_id)
            address = chosen
        if self._gone(address):
            metrics.SEQUENCES_LOST.labels(seq.model).inc()
            raise Unavailable(seq.lost(address))
        try:
            answer = await self.upstream.infer_on(address, request, deadline, request_id)
        except WorkerLost as err:
            metrics.SEQUENCES_LOST.labels(seq.model).inc()
            raise Unavailable(f"{seq.lost(address)} ({err.message})") from err
        if seq.end:
            self.sequences.drop(seq.key)
        else:
            self.sequences.put(seq.key, address, answer.model_version or request.model_version)
        return answer

    def _gone(self, address: str) -> bool:
        """The worker no longer serves: not listed, not healthy, or ejected."""
        worker = self.discovery.workers.get(address)
        if worker is None or not worker.serving:
            return True
        router = self.upstream.router
        return not router.endpoint(address).available(router.clock())

    async def _alone(
        self, request: pb.ModelInferRequest, deadline: float | None, request_id: str
    ) -> pb.ModelInferResponse:
        """Upstream as it came: no cache, no merge; ``Upstream`` neither retries nor hedges a
        request with sequence parameters."""
        try:
            version, _candidates = self.discovery.route(request.model_name, request.model_version)
        except NotFound:
            return await self._forward_unknown(request, deadline, request_id)
        pinned = bool(request.model_version)
        request.model_version = version
        return await self.upstream.infer(request, deadline, request_id, pinned)

    async def _route(self, model: str, asked: str) -> tuple[str, list[str], ModelSpec] | None:
        """The version a request runs on, the workers that have it and its signature; None when no
        worker has it ready.

        A version can go away between two index polls (a rollout): reading its signature then
        fails, and that failure refreshes the index, so routing once more picks a version a worker
        has, or finds that none has the one the caller pinned.
        """
        retried = False
        while True:
            try:
                version, candidates = self.discovery.route(model, asked)
            except NotFound:
                return None
            try:
                return version, candidates, await self.discovery.spec(model, version)
            except Unavailable:
                if retried:
                    raise
                retried = True

    def _count_lookup(self, model: str, version: str, hit: bool, ns: int) -> None:
        counters = self.cache_counters[(model, version)]
        (counters.hit if hit else counters.miss).add(ns)
        metrics.cache(model, "hit" if hit else "miss").inc()

    async def _forward_unknown(
        self, request: pb.ModelInferRequest, deadline: float | None, request_id: str
    ) -> pb.ModelInferResponse:
        worker = self.discovery.authority(request.model_name)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            answer: pb.ModelInferResponse = await worker.stub.ModelInfer(
                request, timeout=timeout, metadata=call_metadata(request_id)
            )
        except grpc.aio.AioRpcError as err:
            raise translate(err) from err
        return answer

    # -- the batch path ------------------------------------------------------------------------
    async def _dispatch(self, key: Hashable, batch: list[Pending]) -> None:
        """One batch's lookups and upstream call, traced as one span under its first request's
        (linked to the others'), so every request's trace says which batch it joined."""
        if not tracing.enabled():
            await self._dispatch_batch(key, batch)
            return
        parents = [p.extra.trace for p in batch]
        with tracing.batch_span("gateway.batch", parents, sum(p.item.rows for p in batch)):
            await self._dispatch_batch(key, batch)

    async def _dispatch_batch(self, key: Hashable, batch: list[Pending]) -> None:
        route, _signature = cast(tuple[tuple[str, str, bool], Hashable], key)
        model, version, pinned = route
        jobs: list[Job] = [p.extra for p in batch]
        keyed = [n for n, j in enumerate(jobs) if j.digest is not None and not j.looked_up]
        misses = list(range(len(batch)))
        if keyed and self.cache is not None:
            t0 = time.perf_counter_ns()
            keys = [cache_key(model, version, jobs[n].digest or "") for n in keyed]
            with tracing.span("gateway.cache.lookup", **{"ferry.keys": len(keys)}):
                values = await self.cache.get_many(keys)
            per = (time.perf_counter_ns() - t0) // max(1, len(keyed))
            hit_set: set[int] = set()
            for n, value in zip(keyed, values, strict=True):
                if value is not None and not _parses(value):
                    metrics.cache(model, "corrupt").inc()
                    value = None
                self._count_lookup(model, version, value is not None, per)
                if value is None:
                    continue
                hit_set.add(n)
                if not batch[n].future.done():
                    batch[n].future.set_result((value, True))
            misses = [n for n in misses if n not in hit_set]
        misses = [n for n in misses if not batch[n].future.done()]
        if not misses:
            return
        items = [batch[n].item for n in misses]
        deadline = self._latest_deadline([jobs[n] for n in misses])
        rid = ",".join(jobs[n].request_id for n in misses[:16])
        metrics.upstream_batch(model).observe(len(items))
        try:
            merged = merge(items, version)
            with tracing.span("gateway.upstream", **{"ferry.rows": sum(i.rows for i in items)}):
                response = await self.upstream.infer(merged, deadline, rid, pinned)
            answers = split(response, [i.rows for i in items])
        except FerryError as err:
            if len(items) > 1 and isinstance(err, SPLITTABLE):
                await self._one_by_one([batch[n] for n in misses], version, pinned)
                return
            for n in misses:
                if not batch[n].future.done():
                    batch[n].future.set_exception(err)
            return
        fills: list[tuple[str, bytes]] = []
        served = response.model_version or version
        for n, answer in zip(misses, answers, strict=True):
            if answer.id:  # a worker echoing an id: stored answers carry none
                answer.ClearField("id")
            if not batch[n].future.done():
                batch[n].future.set_result((answer, False))
            digest = jobs[n].digest
            if digest is not None:
                fills.append((cache_key(model, served, digest), answer.SerializeToString()))
        if fills and self.cache is not None:
            await self.cache.set_many(fills)

    async def _one_by_one(self, pendings: list[Pending], version: str, pinned: bool) -> None:
        async def one(p: Pending) -> None:
            job: Job = p.extra
            try:
                resp = await self.upstream.infer(
                    as_raw_request(p.item, version), job.deadline, job.request_id, pinned
                )
            except FerryError as err:
                if not p.future.done():
                    p.future.set_exception(err)
                return
            if not p.future.done():
                p.future.set_result((resp, False))

        await asyncio.gather(*(one(p) for p in pendings))

    @staticmethod
    def _latest_deadline(jobs: list[Job]) -> float | None:
        if any(j.deadline is None for j in jobs):
            return None
        return max(j.deadline for j in jobs if j.deadline is not None)

    def cache_stats(self, model: str, version: str) -> CacheCounters:
        return self.cache_counters.get((model, version), CacheCounters())


__all__ = ["DataPlane", "Prepared"]
