"""``ferry serve gateway``: wire discovery, router, cache, data plane and servicers into a server.

ferry serve gateway --workers 10.0.0.5:8001,10.0.0.6:8001 --redis-url redis://redis:6379/0 --port 8001
ferry serve gateway --workers-dns ferry-workers.default.svc.cluster.local:8001 --port 8001 --http-port 8000

gRPC on --port (8001), KServe v2 REST on --http-port (8000; 0 = off): Triton's layout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from ferry._proto.ferry.v1 import admin_pb2
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.client._channel import open_channel
from ferry.core.grpcserver import add_servicer, ready_line, serve_until_signal
from ferry.core.rest_routes import start_rest
from ferry.core.security import refuse_to_start
from ferry.core.service import open_server, run
from ferry.core.telemetry import start_metrics_server
from ferry.core.v2api import V2Servicer
from gateway import metrics
from gateway.admin import AdminServicer
from gateway.api import GatewayApi
from gateway.breaker import STATE_VALUE, CircuitBreaker
from gateway.cache import LruBackend, RedisBackend, ResultCache
from gateway.dataplane import DataPlane
from gateway.discovery import Discovery
from gateway.hedging import HedgePolicy, RetryBudget
from gateway.near_cache import NearCache
from gateway.ratelimit import SharedLimiter
from gateway.redis_url import parse_redis_url
from gateway.router import RetryPolicy, Router
from gateway.sequences import StickyMap
from gateway.settings import GatewaySettings
from gateway.upstream import Upstream

log = logging.getLogger("ferry.gateway")

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["GatewayAdmin"]
WORKER_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def channel_factory(settings: GatewaySettings):  # type: ignore[no-untyped-def]
    """How the gateway dials a worker: plain, TLS, or mTLS with a client certificate."""
    ca, cert, key = _read(settings.worker_ca), _read(settings.worker_cert), _read(settings.worker_key)

    # keepalive: a frozen worker keeps its TCP connection; an unanswered ping closes it, which ends
    # its health Watch (out of rotation) and fails its open calls over to another worker
    options = [
        *WORKER_CHANNEL_OPTIONS,
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        # grpcio times a keepalive ping out by this (60 s by default), not by keepalive_timeout_ms,
        # and stops pinging an idle connection after 2 pings without data: without these two, a
        # frozen worker's health Watch never ends and it stays in rotation
        ("grpc.http2.ping_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if settings.worker_server_name:
        options.append(("grpc.ssl_target_name_override", settings.worker_server_name))

    def make(address: str) -> grpc.aio.Channel:
        return open_channel(
            address,
            root_certificates=ca,
            certificate_chain=cert,
            private_key=key,
            tls=settings.worker_tls,
            options=options,
            api_key=settings.worker_api_key.get_secret_value() if settings.worker_api_key else None,
        )

    return make


def breaker_changed(state: str) -> None:
    metrics.BREAKER.set(STATE_VALUE[state])
    metrics.BREAKER_CHANGES.labels(state).inc()


def build_cache(settings: GatewaySettings) -> ResultCache | None:
    if not settings.cache_enabled:
        return None
    timeout = settings.cache_timeout_ms / 1000
    backend = (
        RedisBackend(settings.redis_url, timeout)
        if settings.redis_url
        else LruBackend(settings.cache_lru_entries)
    )
    breaker = CircuitBreaker(
        settings.breaker_failures,
        settings.breaker_reset_s,
        on_change=breaker_changed,
    )
    near = NearCache(settings.cache_near_bytes) if settings.redis_url and settings.cache_near_bytes else None
    where = parse_redis_url(settings.redis_url).describe() if settings.redis_url else backend.name
    log.warning("result cache: %s%s", where, f", near cache {settings.cache_near_bytes} B" if near else "")
    return ResultCache(
        backend,
        ttl_s=settings.cache_ttl_s,
        max_value_bytes=settings.cache_max_value_bytes,
        timeout_s=timeout,
        breaker=breaker,
        on_error=lambda op: metrics.CACHE_ERRORS.labels(op).inc(),
        near=near,
        near_ttl_s=settings.cache_near_ttl_s,
        on_hits=lambda level, n: metrics.CACHE_LEVEL_HITS.labels(level).inc(n),
    )


def build_limiter(settings: GatewaySettings) -> SharedLimiter | None:
    """API-key rate limits shared by every replica through Redis; None keeps them per process."""
    if not (
        settings.redis_url and settings.rate_limit_shared and (settings.api_keys_file or settings.api_keys)
    ):
        return None
    return SharedLimiter(
        settings.redis_url,
        timeout_s=settings.cache_timeout_ms / 1000,
        on_fallback=lambda local: metrics.RATE_LIMIT_LOCAL.set(1 if local else 0),
    )


async def serve(settings: GatewaySettings) -> None:
    def count_workers() -> None:
        serving = sum(w.serving for w in discovery.workers.values())
        metrics.WORKERS.labels("serving").set(serving)
        metrics.WORKERS.labels("not_serving").set(len(discovery.workers) - serving)

    discovery = Discovery(
        settings.workers,
        settings.workers_dns,
        channel_factory(settings),
        dns_interval_s=settings.dns_interval_s,
        index_interval_s=settings.index_interval_s,
        on_change=count_workers,
    )
    router = Router(
        eject_failures=settings.eject_failures,
        eject_base_s=settings.eject_base_s,
        eject_max_s=settings.eject_max_s,
        on_eject=lambda address, period: metrics.EJECTIONS.labels(address).inc(),
    )
    upstream = Upstream(
        discovery,
        router,
        RetryPolicy(attempts=settings.retry_attempts),
        HedgePolicy(
            try_timeout_s=settings.try_timeout_ms / 1000,
            floor_s=settings.try_timeout_floor_ms / 1000,
            p99_factor=settings.try_timeout_p99_factor,
            hedge_delay_s=settings.hedge_delay_ms / 1000,
        ),
        RetryBudget(ratio=settings.retry_budget_ratio, min_per_s=settings.retry_budget_min_per_s),
    )
    cache = build_cache(settings)
    dataplane = DataPlane(
        discovery,
        upstream,
        cache,
        max_in_flight=settings.max_in_flight,
        coalesce=settings.coalesce,
        max_batch=settings.coalesce_max_batch,
        upstream_per_worker=settings.upstream_per_worker,
        sequences=StickyMap(settings.max_sequences, settings.sequence_idle_s),
    )
    api = GatewayApi(discovery, dataplane, upstream, default_timeout_s=settings.default_timeout_s)
    servicer = V2Servicer(api)
    admin = AdminServicer(discovery, router, dataplane, cache)

    def register(server: grpc.aio.Server) -> list[str]:
        return [add_servicer(server, servicer, INFERENCE_SERVICE), add_servicer(server, admin, ADMIN_SERVICE)]

    shared = build_limiter(settings)
    handle, port = open_server(
        settings,
        "gateway",
        register,
        limiter=(lambda key: shared.take(key.digest, key.rate_per_s, key.burst)) if shared else None,
        on_deny=lambda code: metrics.AUTH_DENIED.labels(code).inc(),
    )

    async def on_start() -> None:
        await discovery.start()
        # give the first health answers a moment, so a gateway started beside its workers is
        # ready when it says so; it serves (and answers UNAVAILABLE) either way
        deadline = time.monotonic() + settings.startup_wait_s
        while not discovery.healthy() and time.monotonic() < deadline:
            await discovery.wait_changed(deadline - time.monotonic())

    async def after_stop() -> None:
        # Only once the server has stopped (in-flight calls done or past the grace): those
        # calls still use the worker channels and the cache until then.
        await discovery.close()
        if cache is not None:
            await cache.close()
        if shared is not None:
            await shared.close()

    async def on_stop() -> None:
        if http is not None:  # stop taking REST calls; those in flight finish within the grace
            await http.stop(settings.grace_s)

    handle.on_stop.append(on_stop)
    handle.after_stop.append(after_stop)
    metrics_port = start_metrics_server(settings.metrics_port, settings.metrics_host)
    http = await start_rest(settings, api, port.guard)
    await serve_until_signal(
        handle,
        settings.grace_s,
        on_start=on_start,
        ready_message=ready_line(
            "gateway",
            handle.port,
            metrics_port=metrics_port,
            **({"http_port": http.port} if http is not None else {}),
            workers=len(discovery.workers) if discovery.workers else len(settings.workers),
            cache=cache.backend.name if cache else "off",
            auth=port.auth,
        ),
    )


def _check_redis_url(settings: GatewaySettings) -> None:
    if settings.redis_url:
        try:
            parse_redis_url(settings.redis_url)
        except ValueError as err:  # before anything starts, like every other settings error
            refuse_to_start(f"bad --redis-url (REDIS_URL): {err}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(GatewaySettings, argv, "gateway", serve, check=_check_redis_url)
