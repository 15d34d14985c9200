"""The v2 API as one interface, and the gRPC servicer that puts any implementation on the wire.

A worker and the gateway each implement ``V2Api`` once (their data planes), taking and
returning the v2 messages themselves. Two thin transports call it: ``V2Servicer`` here for
gRPC, and the REST routes (``ferry.core.rest_routes``) for HTTP, so a request means the
same thing whichever way it arrives and each rule lives in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.core.grpcserver import _abort_code as error_status
from ferry.core.guard import current_request_id

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class CallInfo:
    """What a transport knows about a call besides its message."""

    request_id: str
    time_remaining: float | None = None  # seconds the caller still waits; None = no deadline


class V2Api(Protocol):
    """Every v2 RPC, transport-free. Errors are Ferry errors; each transport maps them."""

    async def server_live(self) -> bool: ...
    async def server_ready(self) -> bool: ...
    async def model_ready(self, request: pb.ModelReadyRequest, call: CallInfo) -> bool: ...
    async def server_metadata(self) -> pb.ServerMetadataResponse: ...
    async def model_metadata(
        self, request: pb.ModelMetadataRequest, call: CallInfo
    ) -> pb.ModelMetadataResponse: ...
    async def model_config(
        self, request: pb.ModelConfigRequest, call: CallInfo
    ) -> pb.ModelConfigResponse: ...
    async def infer(self, request: pb.ModelInferRequest, call: CallInfo) -> pb.ModelInferResponse | bytes: ...
    def stream(
        self, requests: AsyncIterator[pb.ModelInferRequest], call: CallInfo
    ) -> AsyncIterator[pb.ModelStreamInferResponse]: ...
    async def statistics(
        self, request: pb.ModelStatisticsRequest, call: CallInfo
    ) -> pb.ModelStatisticsResponse: ...
    async def repository_index(
        self, request: pb.RepositoryIndexRequest, call: CallInfo
    ) -> pb.RepositoryIndexResponse: ...
    async def load(self, request: pb.RepositoryModelLoadRequest, call: CallInfo) -> None: ...
    async def unload(self, request: pb.RepositoryModelUnloadRequest, call: CallInfo) -> None: ...
    async def shm_status(
        self, request: pb.SystemSharedMemoryStatusRequest, call: CallInfo
    ) -> pb.SystemSharedMemoryStatusResponse: ...
    async def shm_register(self, request: pb.SystemSharedMemoryRegisterRequest, call: CallInfo) -> None: ...
    async def shm_unregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, call: CallInfo
    ) -> None: ...
    async def cuda_shm_status(
        self, request: pb.CudaSharedMemoryStatusRequest, call: CallInfo
    ) -> pb.CudaSharedMemoryStatusResponse: ...
    async def cuda_shm_register(
        self, request: pb.CudaSharedMemoryRegisterRequest, call: CallInfo
    ) -> None: ...
    async def cuda_shm_unregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, call: CallInfo
    ) -> None: ...


Answer = Callable[[pb.ModelInferRequest, int], Awaitable[pb.ModelInferResponse | bytes]]


async def stream_answers(
    requests: AsyncIterator[pb.ModelInferRequest], answer: Answer, max_inflight: int
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """ModelStreamInfer for any data plane: ``answer(request, n)`` runs as its own task for each
    request, at most ``max_inflight`` at once (reading the stream waits beyond that, so flow
    control pushes back on the client), so a stream's requests batch like unary calls. Answers
    come as they finish, each with its request's id; a failed request becomes that answer's
    ``error_message`` (the one mapping the error interceptor uses) and the stream goes on."""
    answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
    slots = asyncio.Semaphore(max(1, max_inflight))
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: pb.ModelInferRequest, n: int) -> None:
        try:
            response = await answer(request, n)
        except Exception as err:
            _, message = error_status(err)
            failed = pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            )
            answers.put_nowait(pb.ModelStreamInferResponse(error_message=message, infer_response=failed))
        else:
            out = pb.ModelStreamInferResponse()
            if isinstance(response, bytes):  # a cache hit, kept serialized
                out.infer_response.MergeFromString(response)
            else:
                out.infer_response.CopyFrom(response)
            answers.put_nowait(out)
        finally:
            slots.release()

    async def feed() -> None:
        try:
            n = 0
            async for request in requests:
                await slots.acquire()
                task = asyncio.ensure_future(one(request, n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
        finally:
            answers.put_nowait(None)  # the answer loop ends even when reading the stream failed

    feeder = asyncio.ensure_future(feed())
    try:
        while (item := await answers.get()) is not None:
            yield item
        await feeder
    finally:
        feeder.cancel()
        for task in list(tasks):
            task.cancel()


def call_info(context: Context) -> CallInfo:
    return CallInfo(current_request_id(context.invocation_metadata()), context.time_remaining())


class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over any ``V2Api``: each handler translates and delegates."""

    def __init__(self, api: V2Api) -> None:
        self.api = api

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=await self.api.server_live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.api.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=await self.api.model_ready(request, call_info(context)))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return await self.api.server_metadata()

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        return await self.api.model_metadata(request, call_info(context))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return await self.api.model_config(request, call_info(context))

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse | bytes:
        return await self.api.infer(request, call_info(context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for answer in self.api.stream(request_iterator, call_info(context)):
            yield answer

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        return await self.api.statistics(request, call_info(context))

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        return await self.api.repository_index(request, call_info(context))

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        await self.api.load(request, call_info(context))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.api.unload(request, call_info(context))
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        return await self.api.shm_status(request, call_info(context))

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        await self.api.shm_register(request, call_info(context))
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await self.api.shm_unregister(request, call_info(context))
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Context
    ) -> pb.CudaSharedMemoryStatusResponse:
        return await self.api.cuda_shm_status(request, call_info(context))

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Context
    ) -> pb.CudaSharedMemoryRegisterResponse:
        await self.api.cuda_shm_register(request, call_info(context))
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        await self.api.cuda_shm_unregister(request, call_info(context))
        return pb.CudaSharedMemoryUnregisterResponse()
