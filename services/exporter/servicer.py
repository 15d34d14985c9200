"""The Exporter gRPC servicer: decode the request, run the logic off the event loop, encode the answer.

Exports and imports run on a bounded thread pool (torch, onnx and ORT release the
GIL in their heavy parts), so health checks, listings and other calls keep being
answered while a model converts. Stage progress crosses from the worker thread
to the stream through the loop (``call_soon_threadsafe``). A client that goes
away cancels its export at the next stage boundary.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from ferry._proto.ferry.v1 import exporter_pb2 as pb
from ferry._proto.ferry.v1 import exporter_pb2_grpc as pb_grpc
from ferry.core.errors import InvalidArgument, ResourceExhausted
from ferry.core.store import Store, validate_name
from ferry.core.uploads import drain
from services.exporter import catalog
from services.exporter.importer import import_onnx
from services.exporter.pipeline import ExportPipeline, ExportResult, resolve_options
from services.exporter.settings import ExporterSettings

OPTION_FIELDS = [f.name for f in pb.ExportOptions.DESCRIPTOR.fields]
log = logging.getLogger("ferry.exporter")


def _abandoned(job_id: str, model: str) -> Any:
    """A done callback for an export whose client left: say how it ended (and retrieve its error)."""

    def report(job: asyncio.Future[ExportResult]) -> None:
        err = job.exception() if not job.cancelled() else None
        outcome = "finished anyway" if err is None else f"stopped: {err}"
        log.warning(f"export without a client {outcome}", extra={"job": job_id, "model": model})

    return report


def _report(result: ExportResult) -> pb.ExportReport:
    return pb.ExportReport(
        model_name=result.model_name,
        version=result.version,
        published=result.published,
        parity_passed=result.parity_passed,
        failure=result.failure,
        meta_json=json.dumps(result.meta, sort_keys=True),
    )


class ExporterServicer(pb_grpc.ExporterServicer):
    """Thin: every decision lives in pipeline, importer and catalog; errors are Ferry errors."""

    def __init__(self, store: Store, settings: ExporterSettings) -> None:
        self.store = store
        self.settings = settings
        self.pipeline = ExportPipeline(store, settings)
        self.pool = ThreadPoolExecutor(settings.max_concurrent_exports, thread_name_prefix="ferry-export")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def Export(
        self, request: pb.ExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        validate_name(request.model_name, "model name")
        validate_name(request.job_id, "job id")
        opts = resolve_options({k: getattr(request.options, k) for k in OPTION_FIELDS}, self.settings)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[pb.ExportEvent] = asyncio.Queue()
        cancelled = threading.Event()

        def progress(stage: str, state: str, detail: str, elapsed: float) -> None:
            event = pb.ExportEvent(
                stage=pb.StageProgress(stage=stage, state=state, detail=detail, elapsed_s=elapsed)
            )
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = loop.run_in_executor(
            self.pool, self.pipeline.run, request.job_id, request.model_name, opts, progress, cancelled
        )
        try:
            while not job.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield pb.ExportEvent(report=_report(job.result()))
        finally:
            if not job.done():
                cancelled.set()
                log.warning(
                    "export abandoned by its client: it stops at the next stage",
                    extra={"job": request.job_id, "model": request.model_name},
                )
                job.add_done_callback(_abandoned(request.job_id, request.model_name))

    async def ImportOnnx(
        self, request_iterator: AsyncIterator[pb.ImportChunk], context: grpc.aio.ServicerContext
    ) -> pb.ImportResponse:
        header: pb.ImportHeader | None = None
        data = bytearray()
        async for chunk in request_iterator:
            part = chunk.WhichOneof("part")
            if header is None:
                if part != "header":
                    raise InvalidArgument("the first ImportOnnx message must be the header (model name)")
                header = chunk.header
                validate_name(header.model_name, "model name")
            elif part == "header":
                raise InvalidArgument("ImportOnnx takes one header, then data chunks")
            else:
                data += chunk.data
                if len(data) > self.settings.max_import_bytes:
                    await drain(request_iterator, len(data), self.settings.max_import_bytes)
                    raise ResourceExhausted(
                        f"the uploaded model exceeds max_import_bytes={self.settings.max_import_bytes}"
                    )
        if header is None:
            raise InvalidArgument("ImportOnnx received no header and no data")
        max_batch = header.max_batch_size or self.settings.max_batch_size
        if max_batch < 1:
            raise InvalidArgument(f"max_batch_size must be >= 1, got {max_batch}")
        loop = asyncio.get_running_loop()
        version, meta = await loop.run_in_executor(
            self.pool,
            import_onnx,
            self.store,
            header.model_name,
            bytes(data),
            max_batch,
            header.config_json,
            header.source,
        )
        return pb.ImportResponse(model_name=header.model_name, version=version, meta_json=json.dumps(meta))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        models = catalog.list_models(self.store)
        return pb.ListModelsResponse(
            models=[pb.ModelSummary(name=n, versions=v, latest=v[-1]) for n, v in models]
        )

    async def ListVersions(self, request: pb.ListVersionsRequest, context: grpc.aio.ServicerContext) -> Any:
        versions = catalog.list_versions(self.store, request.model_name)
        return pb.ListVersionsResponse(
            model_name=request.model_name,
            versions=[
                pb.VersionSummary(
                    version=v.version,
                    precision=v.precision,
                    source=v.source,
                    created_unix_ms=v.created_unix_ms,
                    size_bytes=v.size_bytes,
                )
                for v in versions
            ],
        )

    async def GetVersion(self, request: pb.GetVersionRequest, context: grpc.aio.ServicerContext) -> Any:
        version, meta, config = catalog.get_version(self.store, request.model_name, request.version)
        return pb.VersionInfo(
            model_name=request.model_name,
            version=version,
            meta_json=json.dumps(meta, sort_keys=True),
            config_json=json.dumps(config, sort_keys=True),
        )

    async def DeleteVersion(self, request: pb.DeleteVersionRequest, context: grpc.aio.ServicerContext) -> Any:
        catalog.delete_version(self.store, request.model_name, request.version)
        return pb.DeleteVersionResponse()
