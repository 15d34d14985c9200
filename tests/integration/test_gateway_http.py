"""The gateway's KServe v2 REST port in front of two real workers and a private redis-server.

The REST port calls the gateway's one v2 API: routing, the Redis cache, statistics merged over
the workers, repository fan-out, keys, roles and rate limits behave as over gRPC. A request
cached through one transport is a hit through the other.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client.inference import build_request
from ferry.core import codec
from ferry.core.auth import hash_key
from tests.integration.test_gateway import start_gateway, start_workers, wait_until
from tests.support.deps import require_binary, require_module
from tests.support.models import export_mlp, export_string_models, ort_run, publish
from tests.support.procs import RedisServer, ServiceProcess, free_port

th = require_module("tritonclient.http")
KEYS = {"reader": "reader-secret", "limited": "limited-secret"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    onnx = tmp_path_factory.mktemp("onnx")
    publish(root, "mlp", 1, export_mlp(onnx / "mlp.onnx"), {"max_batch_size": 64})
    publish(root, "echo", 1, export_string_models(onnx / "strings")["echo"])
    return root


@pytest.fixture(scope="module")
def cluster(store: Path) -> Iterator[dict[str, Any]]:
    require_binary("redis-server")
    redis = RedisServer().start()
    workers: list[ServiceProcess] = []
    gateway = None
    try:
        workers = start_workers(store, 2)
        port = free_port()
        gateway = start_gateway(workers, "--redis-url", redis.url, "--http-port", str(port))
        client = th.InferenceServerClient(f"127.0.0.1:{port}")
        wait_until(lambda: client.is_model_ready("mlp"), what="mlp ready over the gateway's REST port")
        yield {"gateway": gateway, "workers": workers, "port": port, "client": client, "store": store}
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers:
            w.stop()
        redis.stop()


def call(port: int, method: str, path: str, body: str | None = None, **headers: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None)
    finally:
        conn.close()


def http_infer(client: Any, x: np.ndarray, binary: bool = True, **kw: Any) -> Any:
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return client.infer("mlp", [inp], outputs=[th.InferRequestedOutput("output", binary_data=binary)], **kw)


def test_metadata_config_and_health(cluster: dict[str, Any]) -> None:
    client = cluster["client"]
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "ferry-gateway"
    meta = client.get_model_metadata("mlp")
    assert meta["versions"] == ["1"] and meta["inputs"][0]["shape"] == [-1, 8]
    assert client.get_model_config("mlp")["max_batch_size"] == 64


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_through_the_gateway(cluster: dict[str, Any], binary: bool) -> None:
    x = np.random.default_rng(11).standard_normal((3, 8)).astype(np.float32)
    got = http_infer(cluster["client"], x, binary, parameters={"ferry_cache": False}).as_numpy("output")
    np.testing.assert_allclose(got, ort_run(cluster["store"] / "models/mlp/1/model.onnx", x), atol=1e-5)


def test_strings_and_the_aio_client_through_the_gateway(cluster: dict[str, Any]) -> None:
    import asyncio

    th_aio = require_module("tritonclient.http.aio")
    text = np.array([[b"ferry", "über".encode()]], dtype=np.object_)
    for binary in (True, False):
        inp = th.InferInput("text", [1, 2], "BYTES")
        inp.set_data_from_numpy(text, binary_data=binary)
        assert cluster["client"].infer("echo", [inp]).as_numpy("same").tolist() == text.tolist()
    x = np.random.default_rng(13).standard_normal((2, 8)).astype(np.float32)

    async def run() -> np.ndarray:
        async with th_aio.InferenceServerClient(f"127.0.0.1:{cluster['port']}") as c:
            assert await c.is_model_ready("mlp")
            inp = th_aio.InferInput("input", [2, 8], "FP32")
            inp.set_data_from_numpy(x)
            return (await c.infer("mlp", [inp])).as_numpy("output")

    got = asyncio.run(run())
    np.testing.assert_allclose(got, ort_run(cluster["store"] / "models/mlp/1/model.onnx", x), atol=1e-5)


def test_a_request_cached_over_grpc_is_a_hit_over_http(cluster: dict[str, Any]) -> None:
    x = np.random.default_rng(12).standard_normal((2, 8)).astype(np.float32)
    with grpc.insecure_channel(cluster["gateway"].address) as ch:
        first = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
            build_request("mlp", {"input": x}), timeout=10
        )
    assert "ferry_cache_hit" not in first.parameters
    inp = th.InferInput("input", [2, 8], "FP32")
    inp.set_data_from_numpy(x)  # the same tensor and no requested outputs: the same cache key
    result = cluster["client"].infer("mlp", [inp])
    assert result.get_response()["parameters"]["ferry_cache_hit"] is True
    assert result.as_numpy("output").tobytes() == codec.decode_outputs(first)["output"].tobytes()


def test_statistics_and_repository_fan_out(cluster: dict[str, Any]) -> None:
    client = cluster["client"]
    before = client.get_inference_statistics("mlp")["model_stats"][0]
    http_infer(client, np.ones((5, 8), np.float32), parameters={"ferry_cache": False})
    after = client.get_inference_statistics("mlp")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 5  # merged over both workers
    assert "cache_hit" in after["inference_stats"]
    assert sorted(m["name"] for m in client.get_model_repository_index()) == ["echo", "mlp"]
    client.unload_model("mlp")
    wait_until(lambda: not client.is_model_ready("mlp"), what="mlp unloaded on every worker")
    client.load_model("mlp")
    wait_until(lambda: client.is_model_ready("mlp"), what="mlp loaded again")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        (
            "POST",
            "/v2/models/nope/infer",
            json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": [1] * 8}]}),
            404,
            "unknown model 'nope'",
        ),
        ("POST", "/v2/models/mlp/infer", "{broken", 400, "malformed JSON in the request body"),
        (
            "POST",
            "/v2/models/mlp/infer",
            json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": [1] * 7}]}),
            400,
            "input 'input': 'data' has 7 elements but shape [1, 8] needs 8",
        ),
        ("GET", "/v2/models/mlp/infer", None, 405, "use POST"),
        (
            "POST",
            "/v2/systemsharedmemory/region/r/register",
            json.dumps({"key": "/r", "offset": 0, "byte_size": 64}),
            501,
            "shared memory is not available through the gateway",
        ),
    ],
    ids=["unknown-model", "malformed", "data-length", "method", "shm"],
)
def test_rejections_have_their_http_twins(
    cluster: dict[str, Any], method: str, path: str, body: str | None, status: int, message: str
) -> None:
    got, doc = call(cluster["port"], method, path, body)
    assert got == status and message in doc["error"], doc


@pytest.fixture(scope="module")
def secured(store: Path) -> Iterator[dict[str, Any]]:
    keys = {
        "keys": [
            {
                "name": "reader",
                "sha256": hash_key(KEYS["reader"]),
                "roles": ["infer", "read"],
                "models": ["ml*"],
            },
            {"name": "limited", "sha256": hash_key(KEYS["limited"]), "rate_per_s": 0.5, "burst": 2},
        ]
    }
    workers = start_workers(store, 1)
    port = free_port()
    gateway = start_gateway(workers, "--http-port", str(port), "--api-keys", json.dumps(keys))
    try:
        yield {"port": port}
    finally:
        gateway.stop()
        for w in workers:
            w.stop()


def test_keys_roles_and_rate_limits_over_http(secured: dict[str, Any]) -> None:
    port = secured["port"]
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}]})
    assert call(port, "GET", "/v2/health/live")[0] == 200
    assert call(port, "POST", "/v2/models/mlp/infer", body) == (
        401,
        {"error": "missing or unknown API key (send 'authorization: Bearer <key>')"},
    )
    reader = {"Authorization": f"Bearer {KEYS['reader']}"}
    wait_until(lambda: call(port, "POST", "/v2/models/mlp/infer", body, **reader)[0] == 200, what="infer ok")
    assert call(port, "POST", "/v2/models/other/infer", body, **reader) == (
        403,
        {"error": "API key 'reader' may not use model 'other'"},
    )
    limited = {"Authorization": f"Bearer {KEYS['limited']}"}
    answers = []
    while len(answers) < 40 and (not answers or answers[-1][0] == 200):
        answers.append(call(port, "POST", "/v2/models/mlp/infer", body, **limited))
    assert answers[-1] == (429, {"error": "API key 'limited' is over its rate limit of 0.5 calls/s"})
