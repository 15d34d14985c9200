"""``ferry serve worker``: wire settings, store, repository and servicer into a server."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.grpcserver import add_servicer, build_server, ready_line, serve_until_signal
from ferry.core.security import secure_port
from ferry.core.settings import settings_from_argv
from ferry.core.store import Store
from ferry.core.telemetry import setup_logging, start_metrics_server
from services.inference.metrics import WorkerMetrics
from services.inference.repository import Repository
from services.inference.servicer import InferenceServicer
from services.inference.settings import WorkerSettings

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


async def serve(settings: WorkerSettings) -> None:
    store = Store(settings.store)
    repo = Repository(store, settings)
    servicer = InferenceServicer(repo, WorkerMetrics())

    def register(server: object) -> list[str]:
        return [add_servicer(server, servicer, SERVICE)]

    port = secure_port(settings, settings.host, "worker")
    handle = build_server(
        settings.host,
        settings.port,
        register,
        max_message_bytes=settings.max_message_bytes,
        guard=port.guard,
        credentials=port.credentials,
        reuse_port=settings.reuse_port,
    )

    async def on_start() -> None:
        await repo.start()
        servicer.ready = True

    async def on_stop() -> None:
        # Health already says NOT_SERVING; a gateway or load balancer stops sending within
        # this delay, so the calls still queued in the transport arrive and finish instead
        # of being cut off by the server's shutdown.
        servicer.ready = False
        await asyncio.sleep(settings.drain_delay_s)

    handle.on_stop.append(on_stop)
    metrics_port = start_metrics_server(settings.metrics_port, settings.host)
    try:
        await serve_until_signal(
            handle,
            settings.grace_s,
            on_start=on_start,
            ready_message=ready_line(
                "worker", handle.port, metrics_port=metrics_port, store=store.root, auth=port.auth
            ),
        )
    finally:
        await repo.close()


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_argv(WorkerSettings, argv, "ferry serve worker")
    setup_logging(settings.log_level, "worker")
    asyncio.run(serve(settings))
    return 0
