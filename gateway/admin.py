"""ferry.v1.GatewayAdmin: what this gateway replica knows about its workers and its cache."""

from __future__ import annotations

from typing import Any

from ferry._proto.ferry.v1 import admin_pb2, admin_pb2_grpc
from gateway.cache import ResultCache
from gateway.dataplane import DataPlane
from gateway.discovery import Discovery
from gateway.router import Router


class AdminServicer(admin_pb2_grpc.GatewayAdminServicer):
    def __init__(self, discovery: Discovery, router: Router, dataplane: DataPlane, cache: ResultCache | None):
        self.discovery = discovery
        self.router = router
        self.dataplane = dataplane
        self.cache = cache

    async def ListWorkers(
        self, request: admin_pb2.ListWorkersRequest, context: Any
    ) -> admin_pb2.ListWorkersResponse:
        ejected = set(self.router.ejected())
        out = admin_pb2.ListWorkersResponse()
        for address in sorted(self.discovery.workers):
            w = self.discovery.workers[address]
            info = out.workers.add(
                address=address,
                serving=w.serving,
                ejected=address in ejected,
                in_flight=self.router.endpoint(address).in_flight,
            )
            for model in sorted(w.models):
                for version, state in sorted(w.models[model].items()):
                    info.models.add(model=model, version=version, state=state)
        return out

    async def CacheStats(
        self, request: admin_pb2.CacheStatsRequest, context: Any
    ) -> admin_pb2.CacheStatsResponse:
        if self.cache is None:
            return admin_pb2.CacheStatsResponse(enabled=False, backend="none", breaker_state="closed")
        s, near = self.cache.stats, self.cache.near
        return admin_pb2.CacheStatsResponse(
            enabled=True,
            backend=self.cache.backend.name,
            breaker_state=self.cache.breaker.state,
            hits=s.hits,
            misses=s.misses,
            errors=s.errors,
            skipped=s.skipped,
            stores=s.stores,
            too_large=s.too_large,
            single_flight_shared=self.dataplane.flights.shared,
            near_hits=s.near_hits,
            near_entries=len(near) if near is not None else 0,
            near_bytes=near.bytes if near is not None else 0,
            near_evictions=near.evictions if near is not None else 0,
        )
