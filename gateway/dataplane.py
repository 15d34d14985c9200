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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import cast

import grpc

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.client._channel import translate
from ferry.core.errors import (
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
from gateway.upstream import Upstream

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
        model = request.model_name
        pinned = bool(request.model_version)
        routed = await self._route(model, request.model_version)
        if routed is None:
            # no worker has it ready: let a worker answer, so the caller sees the worker's own words
            return await self._forward_unknown(request, deadline, request_id)
        version, candidates, spec = routed
        item = prepare(spec, request)
        digest = ckey = None
        looked_up = False
        if self.cache is not None and spec.response_cache and not cache_opt_out(request):
            digest = request_digest(request, item.raw)
            ckey = cache_key(model, version, digest)
            if self.cache.first_level:  # the LRU backend, or the near cache in front of Redis
                t0 = time.perf_counter_ns()
                value = self.cache.get_local(ckey)
                if value is not None or self.cache.local:  # a near miss still asks Redis
                    self._count_lookup(model, version, value is not None, time.perf_counter_ns() - t0)
                if value is not None:
                    return cached_answer(value, request.id)
                looked_up = self.cache.local
        job = Job(model, digest, deadline, request_id, pinned, looked_up)
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
                request, timeout=timeout, metadata=(("x-request-id", request_id),)
            )
        except grpc.aio.AioRpcError as err:
            raise translate(err) from err
        return answer

    # -- the batch path ------------------------------------------------------------------------
    async def _dispatch(self, key: Hashable, batch: list[Pending]) -> None:
        route, _signature = cast(tuple[tuple[str, str, bool], Hashable], key)
        model, version, pinned = route
        jobs: list[Job] = [p.extra for p in batch]
        keyed = [n for n, j in enumerate(jobs) if j.digest is not None and not j.looked_up]
        misses = list(range(len(batch)))
        if keyed and self.cache is not None:
            t0 = time.perf_counter_ns()
            keys = [cache_key(model, version, jobs[n].digest or "") for n in keyed]
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
