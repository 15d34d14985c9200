"""A KServe v2 REST client for the benchmark, shaped like a gRPC stub.

``RestStub.ModelInfer(request, timeout=...)`` takes the same ``ModelInferRequest`` the gRPC
scenarios send and returns a ``ModelInferResponse``, so the closed loop, its checker and its
statistics are the same code for both transports. The body is built once per request (as a
client reusing a prepared payload would) either as JSON or with Triton's binary tensor data;
the answer is decoded on every call, which is part of what HTTP costs a client.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import grpc
import numpy as np

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core import codec
from ferry.core.rest import HEADER_LENGTH, split_body

# The HTTP statuses Ferry answers, back to the gRPC codes the loop counts errors by.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def encode_request(request: pb.ModelInferRequest, binary: bool) -> tuple[bytes, dict[str, str]]:
    """The REST body (and headers) of a v2 request: JSON data, or binary tensors after a JSON head."""
    arrays = codec.decode_inputs(request)
    inputs: list[dict[str, Any]] = []
    tail: list[bytes] = []
    for tensor in request.inputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype}
        entry["shape"] = list(tensor.shape)
        array = arrays[tensor.name]
        if binary:
            raw = codec.raw_bytes(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        inputs.append(entry)
    doc: dict[str, Any] = {"id": request.id, "inputs": inputs}
    params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in request.parameters.items()}
    if binary:
        params["binary_data_output"] = True
    if params:
        doc["parameters"] = params
    head = json.dumps(doc).encode()
    if not binary:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(tail), {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


def decode_response(body: bytes, header_length: str | None) -> pb.ModelInferResponse:
    """A REST answer as the ModelInferResponse the gRPC path gives (raw outputs)."""
    head, tail = split_body(body, header_length)
    doc = json.loads(head)
    response = pb.ModelInferResponse(
        model_name=doc.get("model_name", ""), model_version=doc.get("model_version", ""), id=doc.get("id", "")
    )
    for key, value in (doc.get("parameters") or {}).items():
        if isinstance(value, bool):
            response.parameters[key].bool_param = value
    offset = 0
    for out in doc["outputs"]:
        response.outputs.add(name=out["name"], datatype=out["datatype"], shape=out["shape"])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            response.raw_output_contents.append(tail[offset : offset + size])
            offset += size
        else:
            dtype = codec.numpy_dtype(out["datatype"])
            response.raw_output_contents.append(np.asarray(out["data"], dtype=dtype).tobytes())
    return response


class RestStub:
    """``ModelInfer`` over HTTP on one aiohttp session (one keep-alive connection pool)."""

    def __init__(self, address: str, binary: bool) -> None:
        self.base = f"http://{address}"
        self.binary = binary
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        # by request object; the object is kept with its body, so a freed request's id never
        # finds another request's body
        self._bodies: dict[int, tuple[pb.ModelInferRequest, bytes, dict[str, str]]] = {}

    async def ModelInfer(self, request: pb.ModelInferRequest, timeout: float = 30.0) -> pb.ModelInferResponse:
        prepared = self._bodies.get(id(request))
        if prepared is None or prepared[0] is not request:
            prepared = self._bodies[id(request)] = (request, *encode_request(request, self.binary))
        _, body, headers = prepared
        version = f"/versions/{request.model_version}" if request.model_version else ""
        url = f"{self.base}/v2/models/{request.model_name}{version}/infer"
        async with self.session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            data = await resp.read()
            if resp.status != 200:
                code = _CODES.get(resp.status, grpc.StatusCode.INTERNAL)
                detail = json.loads(data).get("error", "") if data else ""
                raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), detail)
            return decode_response(data, resp.headers.get(HEADER_LENGTH))

    async def close(self) -> None:
        await self.session.close()
