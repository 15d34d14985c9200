"""The worker's v2 GRPCInferenceService: thin, it decodes, delegates and encodes.

Every check raises a Ferry error; the server's error interceptor turns it into
the status the caller sees. In a stream, an error becomes that response's
``error_message`` and the stream goes on, as the protocol asks; a stream's requests
run concurrently (so they batch like unary calls) and answers carry their request's id.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

import ferry
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.core.classify import check_count, class_counts, top_k
from ferry.core.codec import add_output
from ferry.core.configproto import config_proto, metadata_proto
from ferry.core.errors import FerryError, InvalidArgument, Unimplemented
from ferry.core.grpcserver import _abort_code as error_status
from ferry.core.validation import accept_request
from services.inference.metrics import WorkerMetrics
from services.inference.repository import Repository, Version
from services.inference.runner import default_providers
from services.inference.shm import (
    ShmLimits,
    ShmRegistry,
    add_shm_outputs,
    output_refs,
    with_shm_inputs,
)

EXTENSIONS = [
    "model_repository",
    "model_configuration",
    "statistics",
    "schedule_policy",
    "system_shared_memory",
]


def _param_int(params: object, key: str) -> int | None:
    if key not in params:  # type: ignore[operator]
        return None
    p = params[key]  # type: ignore[index]
    kind = p.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        return int(getattr(p, kind))
    if kind == "string_param" and p.string_param.isdigit():
        return int(p.string_param)
    raise InvalidArgument(f"parameter {key!r} must be an integer")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repo: Repository, metrics: WorkerMetrics) -> None:
        self.repo = repo
        self.metrics = metrics
        self.ready = False
        settings = repo.settings
        self.shm = ShmRegistry(ShmLimits(settings.shm_max_regions, settings.shm_max_region_bytes))
        self.stream_max_inflight = settings.stream_max_inflight

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.repo.is_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="ferry", version=ferry.__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        version = self.repo.resolve(request.name, request.version)
        return metadata_proto(version.spec, sorted(self.repo.models[request.name].ready))

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        version = self.repo.resolve(request.name, request.version)
        return pb.ModelConfigResponse(config=config_proto(version.spec))

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request runs as its own task, at most ``stream_max_inflight`` at once (reading
        the stream waits beyond that, so gRPC flow control pushes back on the client)."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.stream_max_inflight)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                response = await self._infer(request, None)
            except Exception as err:
                # The one mapping the error interceptor uses: a Ferry error's message, anything
                # else a generic one with an incident id (details in the log only).
                _, message = error_status(err)
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                answers.put_nowait(pb.ModelStreamInferResponse(error_message=message, infer_response=failed))
            else:
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            finally:
                slots.release()

        async def feed() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.ensure_future(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                answers.put_nowait(None)  # the answer loop ends even when reading the stream failed

        feeder = asyncio.ensure_future(feed())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await feeder
        finally:
            feeder.cancel()
            for task in list(tasks):
                task.cancel()

    async def _infer(
        self, request: pb.ModelInferRequest, time_remaining: float | None
    ) -> pb.ModelInferResponse:
        start = time.perf_counter_ns()
        version: Version | None = None
        try:
            version = self.repo.resolve(request.model_name, request.model_version)
            shm_outputs = output_refs(request, self.shm) if request.outputs else {}
            rows, inputs = accept_request(version.spec, with_shm_inputs(request, self.shm))
            classify = class_counts(request)
            for name, k in classify.items():
                dims = next(t.dims for t in version.spec.outputs if t.name == name)
                check_count(name, k, dims[-1] if dims else -1)
            params = request.parameters
            priority = _param_int(params, "priority") or 0
            timeout_us = _param_int(params, "timeout")
            limits = [t for t in (time_remaining, timeout_us / 1e6 if timeout_us else None) if t is not None]
            outputs, queue_ns, timings = await version.batcher.submit(
                inputs, rows, priority, min(limits) if limits else None
            )
            response = pb.ModelInferResponse(
                model_name=request.model_name, model_version=str(version.number), id=request.id
            )
            names = [o.name for o in request.outputs] or version.spec.output_names()
            values = []
            for name in names:
                value = outputs[name]
                if name in classify:
                    value = top_k(name, value, classify[name], version.labels)
                values.append((name, value))
            if shm_outputs:
                add_shm_outputs(response, values, shm_outputs, self.shm)
            else:
                for name, value in values:
                    add_output(response, name, value)
            total = time.perf_counter_ns() - start
            version.stats.record_request(
                rows, queue_ns, timings["input"], timings["infer"], timings["output"], total
            )
            self.metrics.observe(request.model_name, "OK", total)
            return response
        except FerryError as err:
            total = time.perf_counter_ns() - start
            if version is not None:
                version.stats.record_failure(total)
            # Unknown names stay out of the label set, so clients cannot grow it without bound.
            self.metrics.observe(request.model_name if version else "_unknown", err.code.name, total)
            raise

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        for model, number, stats in self.repo.statistics(request.name, request.version):
            response.model_stats.append(stats.to_proto(model, number))
        return response

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.repo.index(ready_only=request.ready):
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        params = request.parameters
        await self.repo.load(
            request.model_name, _version_param(params), _config_param(request.model_name, params)
        )
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self.repo.unload(request.model_name, _version_param(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory (Triton's extension); CUDA shared memory is not offered ----------

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.shm.status(request.name):
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                )
            )
        return response

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.shm.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.shm.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        """No CUDA region can be registered, so the list is truly empty and a named one unknown."""
        if request.name:
            raise Unimplemented(_cuda_refusal(f"no CUDA shared memory region {request.name!r}"))
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise Unimplemented(_cuda_refusal(f"cannot register CUDA shared memory region {request.name!r}"))

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        """Nothing is registered, so unregistering is the spec's no-op (clients call it to start clean)."""
        return pb.CudaSharedMemoryUnregisterResponse()


def _cuda_refusal(what: str) -> str:
    if "CUDAExecutionProvider" not in default_providers():
        why = "this worker has no CUDA device (ONNX Runtime offers no CUDA provider here)"
    else:
        why = "Ferry does not implement CUDA IPC registration yet"
    return f"{what}: CUDA shared memory is not supported: {why}; use system shared memory"


MAX_CONFIG_BYTES = 1 << 20


def _config_param(model: str, params: object) -> dict[str, Any] | None:
    """Triton's ``config`` load parameter: a JSON model config that replaces config.json."""
    if "config" not in params:  # type: ignore[operator]
        return None
    p = params["config"]  # type: ignore[index]
    text = p.string_param if p.WhichOneof("parameter_choice") == "string_param" else None
    if text is None:
        raise InvalidArgument(f"failed to load {model!r}: the 'config' parameter must be a JSON string")
    if len(text) > MAX_CONFIG_BYTES:
        raise InvalidArgument(
            f"failed to load {model!r}: the 'config' parameter is over {MAX_CONFIG_BYTES} bytes"
        )
    try:
        config = json.loads(text)
    except ValueError as err:
        raise InvalidArgument(
            f"failed to load {model!r}: the 'config' parameter is not valid JSON: {err}"
        ) from err
    if not isinstance(config, dict):
        raise InvalidArgument(f"failed to load {model!r}: the 'config' parameter must be a JSON object")
    return config


def _version_param(params: object) -> int | None:
    """Ferry's ``version`` repository parameter: load or unload one version only."""
    if "version" not in params:  # type: ignore[operator]
        return None
    p = params["version"]  # type: ignore[index]
    kind = p.WhichOneof("parameter_choice")
    value = p.int64_param if kind == "int64_param" else p.string_param if kind == "string_param" else None
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"repository parameter 'version' must be a positive integer, got {value!r}"
        ) from None
    if number < 1:
        raise InvalidArgument(f"repository parameter 'version' must be a positive integer, got {number}")
    return number
