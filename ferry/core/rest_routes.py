"""The KServe v2 REST routes over any ``V2Api``: each endpoint converts its request to the v2
message the gRPC path receives, calls the same data plane, and converts the answer back.

Paths, bodies and statuses follow the KServe v2 REST protocol and Triton's extensions
(binary tensor data, classification, system shared memory, repository), so
``tritonclient.http``, ``curl`` and ``perf_analyzer -i http`` work unchanged against a worker
and the gateway alike. docs/http.md lists every endpoint; docs/openapi.yaml is checked
against this table.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core import rest
from ferry.core.auth import KSERVE_PREFIX, METRICS_METHOD
from ferry.core.errors import InvalidArgument, Unavailable
from ferry.core.guard import Guard
from ferry.core.httpserver import Endpoint, HttpCall, HttpLimits, HttpServer, Reply, json_reply, start_http
from ferry.core.security import http_ssl_context
from ferry.core.v2api import CallInfo, V2Api


def _version(call: HttpCall) -> str:
    return call.params.get("version", "")


def _model(call: HttpCall) -> str:
    return call.params["model"]


def _body(call: HttpCall, what: str) -> dict[str, Any]:
    """A JSON object body; an empty body counts as ``{}`` (Triton's clients send none)."""
    if not call.body.strip():
        return {}
    doc = rest.parse_json(call.body)
    if not isinstance(doc, dict):
        raise InvalidArgument(f"the {what} body must be a JSON object")
    return doc


def _repository_parameters(target: Any, params: Any, model: str) -> None:
    if not isinstance(params, dict):
        raise InvalidArgument(f"failed to load {model!r}: 'parameters' must be a JSON object")
    for key, value in params.items():
        rest.set_parameter(target[key], key, value, "repository", numbers=False)


def _info(call: HttpCall) -> CallInfo:
    return CallInfo(call.request_id)


def endpoints(api: V2Api) -> list[Endpoint]:
    """Every route of the v2 REST API, each with the gRPC method whose auth rule applies."""

    async def live(call: HttpCall) -> Reply:
        return Reply()

    async def ready(call: HttpCall) -> Reply:
        if not await api.server_ready():
            raise Unavailable("not ready: no model can serve yet, or the server is draining")
        return Reply()

    async def server_metadata(call: HttpCall) -> Reply:
        return json_reply(rest.message_json(await api.server_metadata()))

    async def model_metadata(call: HttpCall) -> Reply:
        request = pb.ModelMetadataRequest(name=_model(call), version=_version(call))
        return json_reply(rest.message_json(await api.model_metadata(request, _info(call))))

    async def model_ready(call: HttpCall) -> Reply:
        name, version = _model(call), _version(call)
        if not await api.model_ready(pb.ModelReadyRequest(name=name, version=version), _info(call)):
            which = f"model {name!r}" + (f" version {version}" if version else "")
            raise Unavailable(f"{which} is not ready")
        return Reply()

    async def model_config(call: HttpCall) -> Reply:
        request = pb.ModelConfigRequest(name=_model(call), version=_version(call))
        return json_reply(rest.message_json((await api.model_config(request, _info(call))).config))

    async def statistics(call: HttpCall) -> Reply:
        request = pb.ModelStatisticsRequest(name=call.params.get("model", ""), version=_version(call))
        return json_reply(rest.message_json(await api.statistics(request, _info(call))))

    async def infer(call: HttpCall) -> Reply:
        request, form = rest.infer_request(
            call.body, call.headers.get(rest.HEADER_LENGTH), _model(call), _version(call)
        )
        answer = await api.infer(request, _info(call))
        if isinstance(answer, bytes):  # a cache hit, kept serialized for gRPC
            answer = pb.ModelInferResponse.FromString(answer)
        body, header_length = rest.infer_response(answer, form)
        if header_length is None:
            return Reply(body)
        return Reply(
            body, headers={rest.HEADER_LENGTH: str(header_length)}, content_type="application/octet-stream"
        )

    async def repository_index(call: HttpCall) -> Reply:
        doc = _body(call, "repository index")
        index = await api.repository_index(
            pb.RepositoryIndexRequest(ready=bool(doc.get("ready"))), _info(call)
        )
        return json_reply([rest.message_json(m) for m in index.models])

    async def load(call: HttpCall) -> Reply:
        request = pb.RepositoryModelLoadRequest(model_name=_model(call))
        _repository_parameters(request.parameters, _body(call, "load").get("parameters", {}), _model(call))
        await api.load(request, _info(call))
        return Reply()

    async def unload(call: HttpCall) -> Reply:
        request = pb.RepositoryModelUnloadRequest(model_name=_model(call))
        _repository_parameters(request.parameters, _body(call, "unload").get("parameters", {}), _model(call))
        await api.unload(request, _info(call))
        return Reply()

    async def shm_status(call: HttpCall) -> Reply:
        request = pb.SystemSharedMemoryStatusRequest(name=call.params.get("region", ""))
        regions = (await api.shm_status(request, _info(call))).regions
        return json_reply([rest.message_json(r) for r in regions.values()])

    async def shm_register(call: HttpCall) -> Reply:
        doc = _body(call, "register")
        key, offset, size = doc.get("key"), doc.get("offset", 0), doc.get("byte_size")
        if not isinstance(key, str) or type(offset) is not int or type(size) is not int:
            raise InvalidArgument("register needs 'key' (a string), 'offset' and 'byte_size' (integers)")
        region = call.params["region"]
        await api.shm_register(
            pb.SystemSharedMemoryRegisterRequest(name=region, key=key, offset=offset, byte_size=size),
            _info(call),
        )
        return Reply()

    async def shm_unregister(call: HttpCall) -> Reply:
        request = pb.SystemSharedMemoryUnregisterRequest(name=call.params.get("region", ""))
        await api.shm_unregister(request, _info(call))
        return Reply()

    async def cuda_status(call: HttpCall) -> Reply:
        request = pb.CudaSharedMemoryStatusRequest(name=call.params.get("region", ""))
        regions = (await api.cuda_shm_status(request, _info(call))).regions
        return json_reply([rest.message_json(r) for r in regions.values()])

    async def cuda_register(call: HttpCall) -> Reply:
        doc = _body(call, "register")
        request = pb.CudaSharedMemoryRegisterRequest(name=call.params["region"])
        raw = doc.get("raw_handle")
        if raw is not None:  # Triton's form: {"b64": "<the base64 of the cudaIpcMemHandle_t>"}
            encoded = raw.get("b64") if isinstance(raw, dict) else None
            try:
                text = encoded if isinstance(encoded, str) else ""
                request.raw_handle = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument('raw_handle must be {"b64": "<base64>"}') from None
        if isinstance(doc.get("device_id"), int):
            request.device_id = doc["device_id"]
        if isinstance(doc.get("byte_size"), int):
            request.byte_size = doc["byte_size"]
        await api.cuda_shm_register(request, _info(call))
        return Reply()

    async def prometheus(call: HttpCall) -> Reply:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        return Reply(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    async def cuda_unregister(call: HttpCall) -> Reply:
        request = pb.CudaSharedMemoryUnregisterRequest(name=call.params.get("region", ""))
        await api.cuda_shm_unregister(request, _info(call))
        return Reply()

    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    shm, cuda, region = "/v2/systemsharedmemory", "/v2/cudasharedmemory", "region/{region}"
    routes: list[tuple[str, str, str, Callable[..., Any], bool]] = [
        ("GET", "/v2/health/live", "ServerLive", live, False),
        ("GET", "/v2/health/ready", "ServerReady", ready, False),
        ("GET", "/v2", "ServerMetadata", server_metadata, False),
        ("GET", "/v2/models/stats", "ModelStatistics", statistics, False),
        ("POST", "/v2/repository/index", "RepositoryIndex", repository_index, False),
        ("POST", "/v2/repository/models/{model}/load", "RepositoryModelLoad", load, True),
        ("POST", "/v2/repository/models/{model}/unload", "RepositoryModelUnload", unload, True),
        ("GET", f"{shm}/status", "SystemSharedMemoryStatus", shm_status, False),
        ("GET", f"{shm}/{region}/status", "SystemSharedMemoryStatus", shm_status, False),
        ("POST", f"{shm}/{region}/register", "SystemSharedMemoryRegister", shm_register, False),
        ("POST", f"{shm}/unregister", "SystemSharedMemoryUnregister", shm_unregister, False),
        ("POST", f"{shm}/{region}/unregister", "SystemSharedMemoryUnregister", shm_unregister, False),
        ("GET", f"{cuda}/status", "CudaSharedMemoryStatus", cuda_status, False),
        ("GET", f"{cuda}/{region}/status", "CudaSharedMemoryStatus", cuda_status, False),
        ("POST", f"{cuda}/{region}/register", "CudaSharedMemoryRegister", cuda_register, False),
        ("POST", f"{cuda}/unregister", "CudaSharedMemoryUnregister", cuda_unregister, False),
        ("POST", f"{cuda}/{region}/unregister", "CudaSharedMemoryUnregister", cuda_unregister, False),
    ]
    for base in (model, versioned):
        routes += [
            ("GET", base, "ModelMetadata", model_metadata, True),
            ("GET", f"{base}/ready", "ModelReady", model_ready, True),
            ("GET", f"{base}/config", "ModelConfig", model_config, True),
            ("GET", f"{base}/stats", "ModelStatistics", statistics, False),
            ("POST", f"{base}/infer", "ModelInfer", infer, True),
        ]
    endpoints = [
        Endpoint(method, path, KSERVE_PREFIX + rpc, handler, _model if targeted else None)
        for method, path, rpc, handler, targeted in routes
    ]
    # Prometheus can scrape the REST port too (read role when keys are on), beside --metrics-port.
    return [*endpoints, Endpoint("GET", "/metrics", METRICS_METHOD, prometheus)]


async def start_rest(settings: Any, api: Any, guard: Guard) -> HttpServer | None:
    """The v2 REST port of a service whose settings extend ``RestSettings`` and
    ``SecuritySettings``, over its ``V2Api``; None when ``http_port`` is 0 (off)."""
    if not settings.http_port:
        return None
    return await start_http(
        settings.host,
        settings.http_port,
        endpoints(api),
        guard,
        limits=HttpLimits(settings.max_message_bytes, settings.http_header_timeout_s),
        ssl_context=http_ssl_context(settings),
    )
