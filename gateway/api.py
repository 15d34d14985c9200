"""The gateway's v2 API (``ferry.core.v2api.V2Api``): the same API as a worker, answered for the pool.

Each call asks Discovery, the infer DataPlane or every healthy worker (fan-out) and returns
v2 messages; errors are Ferry errors. The gRPC servicer (``V2Servicer``) and the REST routes
both call it, so a request means the same thing over either transport.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

import ferry
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.client._channel import translate
from ferry.core.errors import FerryError, InvalidArgument, NotFound, Unavailable, Unimplemented
from ferry.core.v2api import CallInfo, stream_answers
from gateway.aggregate import merge_index, merge_statistics
from gateway.dataplane import DataPlane
from gateway.discovery import READY, Discovery, Worker, latest_ready
from gateway.upstream import Upstream, call_metadata

EXTENSIONS = ["model_repository", "statistics", "ferry_gateway", "ferry_result_cache"]
FANOUT_TIMEOUT_S = 10.0
STREAM_MAX_INFLIGHT = 256  # requests of one ModelStreamInfer stream in flight at once
# Triton's shared-memory tensor parameters: a region lives on one host, the gateway's callers on
# another, so the gateway refuses them by name instead of forwarding a request no worker can read.
SHM_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
SHM_REFUSAL = (
    "shared memory is not available through the gateway: a region lives on the client's host, "
    "so register it with, and send the request to, a worker on that host"
)


def deadline_of(call: CallInfo, default_s: float | None = None) -> float | None:
    """The caller's deadline as a monotonic time; ``default_s`` from now when it set none."""
    left = call.time_remaining if call.time_remaining is not None else default_s
    return None if left is None else time.monotonic() + left


class GatewayApi:
    def __init__(
        self,
        discovery: Discovery,
        dataplane: DataPlane,
        upstream: Upstream,
        default_timeout_s: float | None = None,
    ) -> None:
        self.default_timeout_s = default_timeout_s
        self.discovery = discovery
        self.dataplane = dataplane
        self.upstream = upstream

    # -- health --------------------------------------------------------------------------------
    async def server_live(self) -> bool:
        return True

    async def server_ready(self) -> bool:
        return bool(self.discovery.healthy())

    async def model_ready(self, request: pb.ModelReadyRequest, call: CallInfo) -> bool:
        versions = self.discovery.versions(request.name)
        if request.version:
            return versions.get(request.version) == READY
        return latest_ready(versions) is not None

    async def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="ferry-gateway", version=getattr(ferry, "__version__", "0"), extensions=EXTENSIONS
        )

    # -- per model, answered by one worker that has it -----------------------------------------
    async def _one(
        self,
        model: str,
        version: str,
        request: Any,
        call: CallInfo,
        invoke: Callable[[Worker, Any, float | None, Any], Awaitable[Any]],
    ) -> Any:
        rid = call.request_id
        deadline = deadline_of(call, self.default_timeout_s)
        try:
            resolved = self.discovery.resolve(model, version)
        except NotFound:
            worker = self.discovery.authority(model)  # let a worker word the error
            try:
                return await invoke(worker, request, FANOUT_TIMEOUT_S, call_metadata(rid))
            except grpc.aio.AioRpcError as err:
                raise translate(err) from err
        return await self.upstream.call(model, resolved, request, deadline, rid, invoke)

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, call: CallInfo
    ) -> pb.ModelMetadataResponse:
        resp: pb.ModelMetadataResponse = await self._one(
            request.name,
            request.version,
            request,
            call,
            lambda w, r, t, md: w.stub.ModelMetadata(r, timeout=t, metadata=md),
        )
        ready = sorted((v for v, s in self.discovery.versions(request.name).items() if s == READY), key=int)
        if ready and not request.version:
            del resp.versions[:]
            resp.versions.extend(ready)
        return resp

    async def model_config(self, request: pb.ModelConfigRequest, call: CallInfo) -> pb.ModelConfigResponse:
        resp: pb.ModelConfigResponse = await self._one(
            request.name,
            request.version,
            request,
            call,
            lambda w, r, t, md: w.stub.ModelConfig(r, timeout=t, metadata=md),
        )
        return resp

    # -- inference -------------------------------------------------------------------------------
    async def infer(self, request: pb.ModelInferRequest, call: CallInfo) -> pb.ModelInferResponse | bytes:
        refuse_shm(request)
        return await self.dataplane.infer(request, deadline_of(call, self.default_timeout_s), call.request_id)

    def stream(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], call: CallInfo
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently (and coalesce); answers come as they finish."""

        started = time.monotonic()

        async def answer(request: pb.ModelInferRequest, n: int) -> pb.ModelInferResponse | bytes:
            left = None if call.time_remaining is None else call.time_remaining - (time.monotonic() - started)
            return await self.infer(request, CallInfo(f"{call.request_id}.{n}", left))

        return stream_answers(request_iterator, answer, STREAM_MAX_INFLIGHT)

    # -- fan-out to every healthy worker ---------------------------------------------------------
    async def _fanout(self, invoke: Callable[[Worker], Awaitable[Any]]) -> tuple[list[Any], list[FerryError]]:
        workers = self.discovery.healthy()
        if not workers:
            raise Unavailable(self.discovery.no_worker_message())

        async def one(w: Worker) -> Any:
            try:
                return await invoke(w)
            except grpc.aio.AioRpcError as err:
                return translate(err)

        answers = await asyncio.gather(*(one(w) for w in workers))
        ok = [a for a in answers if not isinstance(a, FerryError)]
        errors = [a for a in answers if isinstance(a, FerryError)]
        return ok, errors

    async def statistics(
        self, request: pb.ModelStatisticsRequest, call: CallInfo
    ) -> pb.ModelStatisticsResponse:
        ok, errors = await self._fanout(lambda w: w.stub.ModelStatistics(request, timeout=FANOUT_TIMEOUT_S))
        if not ok:
            raise errors[0]
        merged = merge_statistics(ok)
        for stat in merged.model_stats:
            counters = self.dataplane.cache_stats(stat.name, stat.version)
            for name, d in (("cache_hit", counters.hit), ("cache_miss", counters.miss)):
                dst = getattr(stat.inference_stats, name)
                dst.count += d.count
                dst.ns += d.ns
        return merged

    async def repository_index(
        self, request: pb.RepositoryIndexRequest, call: CallInfo
    ) -> pb.RepositoryIndexResponse:
        ok, errors = await self._fanout(lambda w: w.stub.RepositoryIndex(request, timeout=FANOUT_TIMEOUT_S))
        if not ok:
            raise errors[0]
        return merge_index(ok)

    async def _load_unload(self, request: Any, method: str) -> None:
        ok, errors = await self._fanout(lambda w: getattr(w.stub, method)(request, timeout=60.0))
        # a load with a config override keeps the version READY with a new signature
        self.discovery.forget_specs(request.model_name)
        for w in self.discovery.healthy():
            await self.discovery.refresh(w)
        if not ok:
            not_found = [e for e in errors if isinstance(e, NotFound)]
            raise (not_found or errors)[0]

    async def load(self, request: pb.RepositoryModelLoadRequest, call: CallInfo) -> None:
        await self._load_unload(request, "RepositoryModelLoad")

    async def unload(self, request: pb.RepositoryModelUnloadRequest, call: CallInfo) -> None:
        await self._load_unload(request, "RepositoryModelUnload")

    # -- shared memory: only a worker's own host can map a client's region -----------------------
    async def shm_status(self, request: Any, call: CallInfo) -> Any:
        raise Unimplemented(f"SystemSharedMemoryStatus: {SHM_REFUSAL}")

    async def shm_register(self, request: Any, call: CallInfo) -> None:
        raise Unimplemented(f"SystemSharedMemoryRegister: {SHM_REFUSAL}")

    async def shm_unregister(self, request: Any, call: CallInfo) -> None:
        raise Unimplemented(f"SystemSharedMemoryUnregister: {SHM_REFUSAL}")

    async def cuda_shm_status(self, request: Any, call: CallInfo) -> Any:
        raise Unimplemented(f"CudaSharedMemoryStatus: {SHM_REFUSAL}")

    async def cuda_shm_register(self, request: Any, call: CallInfo) -> None:
        raise Unimplemented(f"CudaSharedMemoryRegister: {SHM_REFUSAL}")

    async def cuda_shm_unregister(self, request: Any, call: CallInfo) -> None:
        raise Unimplemented(f"CudaSharedMemoryUnregister: {SHM_REFUSAL}")


def refuse_shm(request: pb.ModelInferRequest) -> None:
    """INVALID_ARGUMENT naming the first tensor that asks for shared memory."""
    for kind, tensors in (("input", request.inputs), ("output", request.outputs)):
        for tensor in tensors:
            if any(p in tensor.parameters for p in SHM_PARAMS):
                raise InvalidArgument(f"{kind} {tensor.name!r} names a shared memory region: {SHM_REFUSAL}")
