"""``ferry serve trainer``: the Trainer gRPC service over a store.

Wiring only: flags -> settings -> logging -> job manager -> server -> ready line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from ferry._proto.ferry.v1 import trainer_pb2
from ferry.core.grpcserver import add_servicer, ready_line, serve_until_signal
from ferry.core.service import open_server, run
from ferry.core.store import Store
from ferry.core.telemetry import start_metrics_server
from services.trainer.jobs import JobManager
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]


def _warm_imports() -> None:
    """Import torch and scikit-learn off the event loop, so the first SubmitJob is not the slow one."""
    import sklearn.datasets  # noqa: F401
    import torch  # noqa: F401


async def serve(settings: TrainerSettings) -> None:
    store = Store(settings.store)
    manager = JobManager(store, settings)
    await manager.start()
    warming = asyncio.get_running_loop().run_in_executor(None, _warm_imports)

    def register(server: grpc.aio.Server) -> list[str]:
        return [add_servicer(server, TrainerServicer(manager), SERVICE)]

    handle, port = open_server(settings, "trainer", register)
    handle.on_stop.append(manager.stop)

    metrics_port = start_metrics_server(settings.metrics_port, settings.host)
    try:
        await serve_until_signal(
            handle,
            settings.grace_s,
            ready_message=ready_line(
                "trainer", handle.port, metrics_port=metrics_port, store=store.root, auth=port.auth
            ),
        )
    finally:
        await manager.stop()
        await warming


def main(argv: Sequence[str] | None = None) -> int:
    return run(TrainerSettings, argv, "trainer", serve)


if __name__ == "__main__":
    raise SystemExit(main())
