"""``ferry serve exporter``: wire settings, store and servicer into a server."""

from __future__ import annotations

from collections.abc import Sequence

from ferry._proto.ferry.v1 import exporter_pb2 as pb
from ferry.core.cpus import cgroup_quota, cpu_limit
from ferry.core.grpcserver import add_servicer, ready_line, serve_until_signal
from ferry.core.service import open_server, run
from ferry.core.store import Store
from ferry.core.telemetry import start_metrics_server
from services.exporter.servicer import ExporterServicer
from services.exporter.settings import ExporterSettings

SERVICE = pb.DESCRIPTOR.services_by_name["Exporter"]


async def serve(settings: ExporterSettings) -> None:
    store = Store(settings.store)
    servicer = ExporterServicer(store, settings)

    def register(server: object) -> list[str]:
        return [add_servicer(server, servicer, SERVICE)]

    handle, port = open_server(settings, "exporter", register)
    metrics_port = start_metrics_server(settings.metrics_port, settings.host)
    try:
        await serve_until_signal(
            handle,
            settings.grace_s,
            ready_message=ready_line(
                "exporter", handle.port, metrics_port=metrics_port, store=store.root, auth=port.auth
            ),
        )
    finally:
        servicer.close()


def _size_torch(settings: ExporterSettings) -> None:
    """torch sizes its pool by the node's cores; in a pod with a CPU quota that oversubscribes it."""
    limited = settings.cpu_limit > 0 or cgroup_quota() is not None
    threads = settings.torch_threads or (cpu_limit(settings.cpu_limit) if limited else 0)
    if threads:
        import torch

        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    return run(ExporterSettings, argv, "exporter", serve, check=_size_torch)
