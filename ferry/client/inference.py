"""The v2 inference client: numpy in, numpy out, Ferry errors out.

``InferenceClient`` is the one implementation (asyncio); ``SyncInferenceClient``
runs it on a private loop for scripts and tests. ``stub`` is the raw generated
stub, for callers (the gateway) that forward protobufs without decoding them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc
import numpy as np

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry._proto.inference import model_config_pb2 as mc
from ferry.client._channel import SyncWrapper, blocking, open_channel, translate, translated
from ferry.core.codec import add_input, decode_outputs

ParamValue = bool | int | float | str


def set_parameter(target: Any, key: str, value: ParamValue) -> None:
    """Put one v2 parameter into a protobuf map field (``InferParameter``)."""
    p = target[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def build_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    version: str | int = "",
    outputs: Iterable[str] | None = None,
    parameters: Mapping[str, ParamValue] | None = None,
    request_id: str = "",
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=str(version or ""), id=request_id)
    for name, array in inputs.items():
        add_input(request, name, np.asarray(array))
    for name in outputs or ():
        request.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        set_parameter(request.parameters, key, value)
    return request


class InferResult(dict[str, np.ndarray]):
    """Output arrays by name, plus the response's version, id and parameters."""

    def __init__(self, response: pb.ModelInferResponse) -> None:
        super().__init__(decode_outputs(response))
        self.response = response
        self.model_version = response.model_version
        self.id = response.id
        self.parameters = {
            k: getattr(v, v.WhichOneof("parameter_choice") or "string_param")
            for k, v in response.parameters.items()
        }


class InferenceClient:
    """Async client of any v2 gRPC server (a Ferry worker or gateway, or Triton)."""

    def __init__(
        self,
        address: str,
        *,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        tls: bool = False,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.address = address
        self.channel = channel or open_channel(
            address,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            tls=tls,
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> InferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @translated
    async def live(self, timeout: float | None = 10) -> bool:
        return (
            await self.stub.ServerLive(pb.ServerLiveRequest(), timeout=timeout, metadata=self._metadata)
        ).live

    @translated
    async def ready(self, timeout: float | None = 10) -> bool:
        return (
            await self.stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout, metadata=self._metadata)
        ).ready

    @translated
    async def model_ready(self, model: str, version: str | int = "", timeout: float | None = 10) -> bool:
        req = pb.ModelReadyRequest(name=model, version=str(version or ""))
        return (await self.stub.ModelReady(req, timeout=timeout, metadata=self._metadata)).ready

    @translated
    async def server_metadata(self, timeout: float | None = 10) -> pb.ServerMetadataResponse:
        return await self.stub.ServerMetadata(
            pb.ServerMetadataRequest(), timeout=timeout, metadata=self._metadata
        )

    @translated
    async def model_metadata(
        self, model: str, version: str | int = "", timeout: float | None = 10
    ) -> pb.ModelMetadataResponse:
        req = pb.ModelMetadataRequest(name=model, version=str(version or ""))
        return await self.stub.ModelMetadata(req, timeout=timeout, metadata=self._metadata)

    @translated
    async def model_config(
        self, model: str, version: str | int = "", timeout: float | None = 10
    ) -> mc.ModelConfig:
        req = pb.ModelConfigRequest(name=model, version=str(version or ""))
        return (await self.stub.ModelConfig(req, timeout=timeout, metadata=self._metadata)).config

    @translated
    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | int = "",
        outputs: Iterable[str] | None = None,
        parameters: Mapping[str, ParamValue] | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> InferResult:
        request = build_request(
            model, inputs, version=version, outputs=outputs, parameters=parameters, request_id=request_id
        )
        return InferResult(await self.stub.ModelInfer(request, timeout=timeout, metadata=self._metadata))

    @translated
    async def infer_request(
        self, request: pb.ModelInferRequest, timeout: float | None = None
    ) -> pb.ModelInferResponse:
        """Send a prepared request and return the raw response (no decoding)."""
        return await self.stub.ModelInfer(request, timeout=timeout, metadata=self._metadata)

    async def stream_infer(
        self, requests: Iterable[pb.ModelInferRequest] | AsyncIterator[pb.ModelInferRequest]
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional streaming inference; each response carries its own error_message."""
        try:
            async for response in self.stub.ModelStreamInfer(requests, metadata=self._metadata):
                yield response
        except grpc.aio.AioRpcError as err:
            raise translate(err) from err

    @translated
    async def statistics(
        self, model: str = "", version: str | int = "", timeout: float | None = 10
    ) -> pb.ModelStatisticsResponse:
        req = pb.ModelStatisticsRequest(name=model, version=str(version or ""))
        return await self.stub.ModelStatistics(req, timeout=timeout, metadata=self._metadata)

    @translated
    async def repository_index(
        self, ready: bool = False, timeout: float | None = 10
    ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        resp = await self.stub.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=ready), timeout=timeout, metadata=self._metadata
        )
        return list(resp.models)

    @translated
    async def load(self, model: str, version: int | None = None, timeout: float | None = 120) -> None:
        req = pb.RepositoryModelLoadRequest(model_name=model)
        if version is not None:
            req.parameters["version"].int64_param = version
        await self.stub.RepositoryModelLoad(req, timeout=timeout, metadata=self._metadata)

    @translated
    async def unload(self, model: str, version: int | None = None, timeout: float | None = 120) -> None:
        req = pb.RepositoryModelUnloadRequest(model_name=model)
        if version is not None:
            req.parameters["version"].int64_param = version
        await self.stub.RepositoryModelUnload(req, timeout=timeout, metadata=self._metadata)


class SyncInferenceClient(SyncWrapper):
    """Blocking twin of ``InferenceClient`` (same methods, same arguments), except streaming."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(lambda: InferenceClient(address, **kwargs))

    live = blocking(InferenceClient.live)
    ready = blocking(InferenceClient.ready)
    model_ready = blocking(InferenceClient.model_ready)
    server_metadata = blocking(InferenceClient.server_metadata)
    model_metadata = blocking(InferenceClient.model_metadata)
    model_config = blocking(InferenceClient.model_config)
    infer = blocking(InferenceClient.infer)
    infer_request = blocking(InferenceClient.infer_request)
    statistics = blocking(InferenceClient.statistics)
    repository_index = blocking(InferenceClient.repository_index)
    load = blocking(InferenceClient.load)
    unload = blocking(InferenceClient.unload)
