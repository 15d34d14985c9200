"""The worker's data plane: every v2 call, whatever transport it came by.

It takes and returns the v2 messages themselves (``grpc_service_pb2``): the gRPC servicer
hands them over as they arrive, and an HTTP front door converts its JSON to the same
messages first, so a request means the same thing either way, and batching, statistics,
metrics and every check run once. Errors are Ferry errors; each transport maps them to its
status in one place.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

import ferry
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core import tracing
from ferry.core.buckets import pad_to_bucket
from ferry.core.classify import check_count, class_counts, top_k
from ferry.core.codec import add_output
from ferry.core.configproto import config_proto, metadata_proto
from ferry.core.errors import FerryError, InvalidArgument, ModelUnavailable
from ferry.core.params import int_param
from ferry.core.sequencing import sequence_control
from ferry.core.textinput import add_truncation, check_texts
from ferry.core.v2api import CallInfo, stream_answers
from ferry.core.validation import accept_request
from services.inference.cuda_ipc import DeviceMemory, load_runtime
from services.inference.load_params import config_param, version_param
from services.inference.metrics import WorkerMetrics
from services.inference.repository import Repository, Version
from services.inference.sequences import Answer
from services.inference.shm import (
    CUDA,
    SYSTEM,
    CudaRegion,
    Region,
    ShmLimits,
    ShmRegistry,
    TensorRef,
    add_shm_outputs,
    output_refs,
    with_shm_inputs,
)
from services.inference.textfeeds import truncated_rows

EXTENSIONS = [
    "model_repository",
    "model_configuration",
    "statistics",
    "schedule_policy",
    "system_shared_memory",
]


@dataclass
class Admitted:
    """A request that passed every check and is ready for the batcher."""

    version: Version
    rows: int
    inputs: dict[str, np.ndarray]
    classify: dict[str, int]
    shm_outputs: dict[str, TensorRef]
    priority: int
    timeout_s: float | None
    truncated: tuple[int, ...] = ()  # rows whose texts were cut to the model's max_length


class WorkerDataPlane:
    """The worker's ``ferry.core.v2api.V2Api``: this process's models, answered here."""

    def __init__(self, repo: Repository, metrics: WorkerMetrics) -> None:
        self.repo = repo
        self.metrics = metrics
        self.ready = False
        settings = repo.settings
        cuda: Callable[[], DeviceMemory | str] | str = (
            load_runtime if settings.cuda_shm else "it is off; start the worker with --cuda-shm"
        )
        self.shm = ShmRegistry(ShmLimits(settings.shm_max_regions, settings.shm_max_region_bytes), cuda)
        self.stream_max_inflight = settings.stream_max_inflight

    # -- health and metadata ----------------------------------------------------------------

    async def server_live(self) -> bool:
        return True

    async def server_ready(self) -> bool:
        return self.ready

    async def server_metadata(self) -> pb.ServerMetadataResponse:
        offered = EXTENSIONS + ([] if isinstance(self.shm.cuda(), str) else ["cuda_shared_memory"])
        return pb.ServerMetadataResponse(name="ferry", version=ferry.__version__, extensions=offered)

    async def model_ready(self, request: pb.ModelReadyRequest, call: CallInfo) -> bool:
        return self.repo.is_ready(request.name, request.version)

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, call: CallInfo
    ) -> pb.ModelMetadataResponse:
        found = self.repo.resolve(request.name, request.version)
        return metadata_proto(found.spec, sorted(self.repo.models[request.name].ready))

    async def model_config(self, request: pb.ModelConfigRequest, call: CallInfo) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(
            config=config_proto(self.repo.resolve(request.name, request.version).spec)
        )

    async def statistics(
        self, request: pb.ModelStatisticsRequest, call: CallInfo
    ) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        for model, number, stats in self.repo.statistics(request.name, request.version):
            entry = stats.to_proto(model, number)
            booked = self.repo.memory.of(model, number)
            if booked is not None:  # loaded: what it holds, by the memory book's measure
                entry.memory_usage.add(type="CPU", id=0, byte_size=booked)
            response.model_stats.append(entry)
        return response

    # -- inference ----------------------------------------------------------------------------

    async def infer(self, request: pb.ModelInferRequest, call: CallInfo) -> pb.ModelInferResponse:
        """Check, queue for a batch, answer; statistics and metrics record the outcome either way."""
        start = time.perf_counter_ns()
        version: Version | None = None
        try:
            try:
                version = self.repo.resolve(request.model_name, request.model_version)
            except ModelUnavailable:  # evicted to make room: this request waits for it to load again
                version = await self.repo.reload_evicted(request.model_name, request.model_version)
            if self.repo.memory.evict:  # the least-recently-used order is all it is kept for
                self.repo.memory.used(version.model, time.monotonic())
            admitted = self._admit(version, request, call.time_remaining)
            text = version.spec.text if version.encoder is not None else None
            if text is not None and text.input in admitted.inputs:  # tokenized with its batch
                texts = [str(t) for t in admitted.inputs[text.input].reshape(-1)]
                check_texts(text.input, texts, text.max_text_bytes)
            outputs, queue_ns, timings = await self._run(admitted, request.parameters)
            admitted.truncated = truncated_rows(outputs)
            response = self._respond(request, admitted, outputs)
            if tracing.enabled():
                _trace_batch(version.model, queue_ns, timings)
            total = time.perf_counter_ns() - start
            version.stats.record_request(
                admitted.rows, queue_ns, timings["input"], timings["infer"], timings["output"], total
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

    async def _run(self, admitted: Admitted, params: Mapping[str, Any]) -> Answer:
        """The batcher's answer; a sequence model's request is fed its sequence's state, in turn."""
        version = admitted.version

        def submit(inputs: dict[str, np.ndarray]) -> Awaitable[Answer]:
            return version.batcher.submit(inputs, admitted.rows, admitted.priority, admitted.timeout_s)

        if version.sequences is None:  # sequence controls mean nothing here and are ignored, as in Triton
            buckets = version.spec.buckets
            return await submit(
                admitted.inputs if buckets is None else pad_to_bucket(admitted.inputs, buckets)
            )
        control = sequence_control(params)
        if control is None:
            raise InvalidArgument(
                f"model {version.model!r} is a sequence model: each request needs a sequence_id, and "
                "the first of a sequence sequence_start"
            )
        if version.spec.max_batch_size > 0 and admitted.rows != 1:
            raise InvalidArgument(
                f"model {version.model!r}: a sequence request carries one row, got {admitted.rows}"
            )
        return await version.sequences.run(control, lambda state: submit({**admitted.inputs, **state}))

    def _admit(
        self, version: Version, request: pb.ModelInferRequest, time_remaining: float | None
    ) -> Admitted:
        shm_outputs = output_refs(request, self.shm) if request.outputs else {}
        rows, inputs = accept_request(version.spec, with_shm_inputs(request, self.shm))
        classify = class_counts(request)
        for name, k in classify.items():
            dims = next(t.dims for t in version.spec.outputs if t.name == name)
            check_count(name, k, dims[-1] if dims else -1)
        params = request.parameters
        timeout_us = int_param(params, "timeout")
        limits = [t for t in (time_remaining, timeout_us / 1e6 if timeout_us else None) if t is not None]
        return Admitted(
            version=version,
            rows=rows,
            inputs=inputs,
            classify=classify,
            shm_outputs=shm_outputs,
            priority=int_param(params, "priority") or 0,
            timeout_s=min(limits) if limits else None,
        )

    def _respond(
        self, request: pb.ModelInferRequest, admitted: Admitted, outputs: dict[str, np.ndarray]
    ) -> pb.ModelInferResponse:
        version = admitted.version
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(version.number), id=request.id
        )
        add_truncation(response.parameters, admitted.truncated)
        names = [o.name for o in request.outputs] or version.spec.output_names()
        values = []
        for name in names:
            value = outputs[name]
            if name in admitted.classify:
                value = top_k(name, value, admitted.classify[name], version.labels)
            values.append((name, value))
        if admitted.shm_outputs:
            add_shm_outputs(response, values, admitted.shm_outputs, self.shm)
        else:
            for name, value in values:
                add_output(response, name, value)
        return response

    def stream(
        self, requests: AsyncIterator[pb.ModelInferRequest], call: CallInfo
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """A stream's requests run concurrently, at most ``stream_max_inflight`` at once."""

        async def answer(request: pb.ModelInferRequest, n: int) -> pb.ModelInferResponse:
            return await self.infer(request, CallInfo(f"{call.request_id}.{n}"))

        return stream_answers(requests, answer, self.stream_max_inflight)

    # -- repository ---------------------------------------------------------------------------

    async def repository_index(
        self, request: pb.RepositoryIndexRequest, call: CallInfo
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.repo.index(ready_only=request.ready):
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    async def load(self, request: pb.RepositoryModelLoadRequest, call: CallInfo) -> None:
        params = request.parameters
        await self.repo.load(
            request.model_name, version_param(params), config_param(request.model_name, params)
        )

    async def unload(self, request: pb.RepositoryModelUnloadRequest, call: CallInfo) -> None:
        await self.repo.unload(request.model_name, version_param(request.parameters))

    # -- shared memory (Triton's system and CUDA extensions) ----------------------------------

    async def shm_status(
        self, request: pb.SystemSharedMemoryStatusRequest, call: CallInfo
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.shm.status(request.name, SYSTEM):
            assert isinstance(region, Region)
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                )
            )
        return response

    async def shm_register(self, request: pb.SystemSharedMemoryRegisterRequest, call: CallInfo) -> None:
        self.shm.register(request.name, request.key, request.offset, request.byte_size)

    async def shm_unregister(self, request: pb.SystemSharedMemoryUnregisterRequest, call: CallInfo) -> None:
        self.shm.unregister(request.name, SYSTEM)

    async def cuda_shm_status(
        self, request: pb.CudaSharedMemoryStatusRequest, call: CallInfo
    ) -> pb.CudaSharedMemoryStatusResponse:
        """Where CUDA shared memory is not offered nothing is registered, so the list is truly empty
        and a named region is refused with the reason."""
        if request.name:
            self.shm.offered_cuda(f"no CUDA shared memory region {request.name!r}")
        response = pb.CudaSharedMemoryStatusResponse()
        for region in self.shm.status(request.name, CUDA):
            assert isinstance(region, CudaRegion)
            response.regions[region.name].CopyFrom(
                pb.CudaSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, device_id=region.device_id, byte_size=region.byte_size
                )
            )
        return response

    async def cuda_shm_register(self, request: pb.CudaSharedMemoryRegisterRequest, call: CallInfo) -> None:
        self.shm.register_cuda(request.name, request.raw_handle, request.device_id, request.byte_size)

    async def cuda_shm_unregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, call: CallInfo
    ) -> None:
        """Where nothing can be registered, unregistering is the spec's no-op (clients call it to
        start clean)."""
        self.shm.unregister(request.name, CUDA)


def _trace_batch(model: str, queue_ns: int, timings: dict[str, int]) -> None:
    """The request's wait in the queue and its batch's run, as spans under the call's span: the
    batcher's own task timed them (on the perf counter), outside this request's context."""
    to_wall = time.time_ns() - time.perf_counter_ns()
    run_start = timings["queue_start"]
    run_ns = timings["input"] + timings["infer"] + timings["output"]
    batch = {"ferry.model": model, "ferry.batch.id": timings["batch"], "ferry.batch.size": timings["rows"]}
    tracing.record("worker.queue", to_wall + run_start - queue_ns, to_wall + run_start, **batch)
    tracing.record("worker.run", to_wall + run_start, to_wall + run_start + run_ns, **batch)
