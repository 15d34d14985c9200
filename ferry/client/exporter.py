"""The Exporter client: export a finished job, import an ONNX file, browse and prune versions.

``ExporterClient`` is the one implementation (asyncio); ``SyncExporterClient``
runs it on a private loop for scripts, the CLI and tests. Failures raise the
Ferry error of their status (``NotFound``, ``FailedPrecondition``...). A parity
gate that fails is not an error: ``export`` returns the report with
``published=False`` and the reason in ``failure``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from ferry._proto.ferry.v1 import exporter_pb2 as pb
from ferry._proto.ferry.v1 import exporter_pb2_grpc as pb_grpc
from ferry.client._channel import SyncWrapper, blocking, chunked, open_channel, translate, translated, upload
from ferry.core.errors import InvalidArgument

CHUNK_BYTES = 1024 * 1024
OPTION_FIELDS = {f.name for f in pb.ExportOptions.DESCRIPTOR.fields}


@dataclass
class ExportStage:
    """One progress event: a stage ``started`` or ``done`` (with its detail and duration)."""

    stage: str
    state: str
    detail: str = ""
    elapsed_s: float = 0.0


@dataclass
class ExportReport:
    model_name: str
    version: int
    published: bool
    parity_passed: bool
    failure: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class VersionInfo:
    model_name: str
    version: int
    meta: dict[str, Any]
    config: dict[str, Any]


def _options(options: dict[str, Any]) -> pb.ExportOptions:
    unknown = set(options) - OPTION_FIELDS
    if unknown:
        raise InvalidArgument(f"unknown export option(s) {sorted(unknown)}; known: {sorted(OPTION_FIELDS)}")
    return pb.ExportOptions(**{k: v for k, v in options.items() if v is not None})


class ExporterClient:
    """Async client of a Ferry exporter."""

    def __init__(self, address: str, *, channel: grpc.aio.Channel | None = None, **tls: Any) -> None:
        self.address = address
        self.channel = channel or open_channel(address, **tls)
        self.stub = pb_grpc.ExporterStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> ExporterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def export_events(
        self, job_id: str, model_name: str, *, timeout: float | None = None, **options: Any
    ) -> AsyncIterator[ExportStage | ExportReport]:
        """Stage events as they happen, then the final report. Options: see ``ExportOptions``."""
        request = pb.ExportRequest(job_id=job_id, model_name=model_name, options=_options(options))
        try:
            async for event in self.stub.Export(request, timeout=timeout):
                if event.WhichOneof("event") == "stage":
                    s = event.stage
                    yield ExportStage(s.stage, s.state, s.detail, s.elapsed_s)
                else:
                    r = event.report
                    yield ExportReport(
                        r.model_name,
                        r.version,
                        r.published,
                        r.parity_passed,
                        r.failure,
                        json.loads(r.meta_json) if r.meta_json else {},
                    )
        except grpc.aio.AioRpcError as err:
            raise translate(err) from err

    async def export(
        self,
        job_id: str,
        model_name: str,
        *,
        on_progress: Callable[[ExportStage], None] | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> ExportReport:
        """Export and wait for the report; ``on_progress`` sees every stage event."""
        report = None
        async for event in self.export_events(job_id, model_name, timeout=timeout, **options):
            if isinstance(event, ExportReport):
                report = event
            elif on_progress is not None:
                on_progress(event)
        if report is None:
            raise InvalidArgument("the exporter closed the stream without a report")
        return report

    @translated
    async def import_onnx(
        self,
        model_name: str,
        model: bytes | str | Path,
        *,
        max_batch_size: int = 0,
        config: dict[str, Any] | None = None,
        source: str = "",
        timeout: float | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Upload an ONNX file (bytes or a path) as the next version; returns (version, meta)."""
        data = model if isinstance(model, bytes) else Path(model).read_bytes()
        header = pb.ImportHeader(
            model_name=model_name,
            max_batch_size=max_batch_size,
            config_json=json.dumps(config) if config else "",
            source=source or ("" if isinstance(model, bytes) else str(model)),
        )
        messages = chunked(pb.ImportChunk(header=header), lambda b: pb.ImportChunk(data=b), data, CHUNK_BYTES)
        response = await upload(self.stub.ImportOnnx, messages, timeout)
        return int(response.version), json.loads(response.meta_json or "{}")

    @translated
    async def list_models(self, timeout: float | None = 10) -> dict[str, list[int]]:
        response = await self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout)
        return {m.name: list(m.versions) for m in response.models}

    @translated
    async def list_versions(self, model_name: str, timeout: float | None = 10) -> list[dict[str, Any]]:
        response = await self.stub.ListVersions(
            pb.ListVersionsRequest(model_name=model_name), timeout=timeout
        )
        return [
            {
                "version": v.version,
                "precision": v.precision,
                "source": v.source,
                "created_unix_ms": v.created_unix_ms,
                "size_bytes": v.size_bytes,
            }
            for v in response.versions
        ]

    @translated
    async def get_version(self, model_name: str, version: int = 0, timeout: float | None = 10) -> VersionInfo:
        """One version's report and lineage (``version`` 0: the latest)."""
        r = await self.stub.GetVersion(
            pb.GetVersionRequest(model_name=model_name, version=version), timeout=timeout
        )
        return VersionInfo(r.model_name, r.version, json.loads(r.meta_json), json.loads(r.config_json))

    @translated
    async def delete_version(self, model_name: str, version: int, timeout: float | None = 10) -> None:
        await self.stub.DeleteVersion(
            pb.DeleteVersionRequest(model_name=model_name, version=version), timeout=timeout
        )


class SyncExporterClient(SyncWrapper):
    """Blocking twin of ``ExporterClient`` (same methods and arguments), except ``export_events``."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(lambda: ExporterClient(address, **kwargs))

    export = blocking(ExporterClient.export)
    import_onnx = blocking(ExporterClient.import_onnx)
    list_models = blocking(ExporterClient.list_models)
    list_versions = blocking(ExporterClient.list_versions)
    get_version = blocking(ExporterClient.get_version)
    delete_version = blocking(ExporterClient.delete_version)
