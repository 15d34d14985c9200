"""``ferry serve worker``: wire settings, store, repository and servicer into a server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence

import onnxruntime as ort
from prometheus_client import REGISTRY

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.grpcserver import add_servicer, ready_line, serve_until_signal
from ferry.core.rest_routes import start_rest
from ferry.core.security import refuse_to_start
from ferry.core.service import open_server, run
from ferry.core.store import Store
from ferry.core.telemetry import start_metrics_server
from ferry.core.v2api import V2Servicer
from services.inference.dataplane import WorkerDataPlane
from services.inference.metrics import LoadGauges, WorkerMetrics
from services.inference.provider_probe import providers_that_load
from services.inference.repository import Repository, Version
from services.inference.runner import CUDA, fallback_problem, provider_list
from services.inference.settings import WorkerSettings

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
log = logging.getLogger("ferry.worker")


def _versions(repo: Repository) -> Iterator[tuple[str, Version]]:
    """Every serving version, read from the metrics thread: copies, so a reload meanwhile is harmless."""
    for name, state in list(repo.models.items()):
        for version in list(state.ready.values()):
            yield name, version


async def serve(settings: WorkerSettings) -> None:
    problem = fallback_problem(settings.providers, ort.get_available_providers(), settings.allow_cpu_fallback)
    if problem is None and CUDA in settings.providers and not settings.allow_cpu_fallback:
        # listed is not loaded: open a session now, so an empty store does not hide a broken CUDA
        asked = provider_list(settings.providers, settings.cuda_device_id, settings.cuda_mem_limit_bytes)
        try:
            problem = fallback_problem(settings.providers, providers_that_load(asked), False)
        except Exception as err:  # ONNX Runtime's own errors: a bad device id, a broken library
            problem = f"{CUDA} was asked for but a session on it failed to open: {err}"
    if problem:
        refuse_to_start(problem)
    # A worker only reads the store; on a cluster it is a read-only mount that may still be empty.
    store = Store(settings.store, create=False)
    repo = Repository(store, settings)
    plane = WorkerDataPlane(repo, WorkerMetrics())
    servicer = V2Servicer(plane)

    def register(server: object) -> list[str]:
        return [add_servicer(server, servicer, SERVICE)]

    handle, port = open_server(settings, "worker", register)

    async def on_start() -> None:
        await repo.start()
        if not repo.models:
            log.warning(
                "the store %s holds no models (yet): serving none, looking again every %ss",
                store.root,
                settings.poll_interval_s,
            )
        plane.ready = True

    async def on_stop() -> None:
        # Health already says NOT_SERVING; a gateway or load balancer stops sending within
        # this delay, so the calls still queued in the transport arrive and finish instead
        # of being cut off by the server's shutdown.
        plane.ready = False
        await asyncio.sleep(settings.drain_delay_s)
        for _, version in _versions(repo):
            version.batcher.flush()
        if http is not None:
            await http.stop(settings.grace_s)

    handle.on_stop.append(on_stop)
    REGISTRY.register(LoadGauges(lambda: _versions(repo)))
    metrics_port = start_metrics_server(settings.metrics_port, settings.host)
    http = await start_rest(settings, plane, port.guard)
    extra: dict[str, object] = {"metrics_port": metrics_port}
    if http is not None:
        extra["http_port"] = http.port
    try:
        await serve_until_signal(
            handle,
            settings.grace_s,
            on_start=on_start,
            ready_message=ready_line("worker", handle.port, **extra, store=store.root, auth=port.auth),
        )
    finally:
        await repo.close()


def main(argv: Sequence[str] | None = None) -> int:
    return run(WorkerSettings, argv, "worker", serve)
