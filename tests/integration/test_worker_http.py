"""The worker's KServe v2 REST port, driven by tritonclient.http (sync and aio) and by raw HTTP.

The same worker answers gRPC too: a request answered over both gives the same bytes, and
every rejection has its HTTP twin (the gRPC status's HTTP code, the same message).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.client.inference import SyncInferenceClient
from ferry.core.auth import hash_key
from ferry.core.classify import write_labels
from tests.support.deps import require_module
from tests.support.gate import held_config
from tests.support.models import export_mlp, export_string_models, ort_run, publish
from tests.support.procs import ServiceProcess, free_port

th = require_module("tritonclient.http")
th_aio = require_module("tritonclient.http.aio")
LABELS = ["cat", "dog", "eel"]
KEYS = {"reader": "reader-secret", "loader": "loader-secret"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    onnx = tmp_path_factory.mktemp("onnx")
    publish(root, "mlp", 1, export_mlp(onnx / "mlp.onnx"), {"max_batch_size": 16})
    write_labels(root / "models" / "mlp" / "1", LABELS)
    publish(root, "held", 1, onnx / "mlp.onnx", held_config())  # runs only whole batches of 8 rows
    strings = export_string_models(onnx / "strings")
    publish(root, "echo", 1, strings["echo"])
    return root


def serve(store: Path, *extra: str) -> tuple[ServiceProcess, int]:
    port = free_port()
    proc = ServiceProcess.serve(
        "worker", "--store", str(store), "--port", "0", "--http-port", str(port),
        "--max-message-bytes", "1048576", "--http-header-timeout-s", "1", *extra,
    ).start()  # fmt: skip
    return proc, port


@pytest.fixture(scope="module")
def worker(store: Path) -> Iterator[dict[str, Any]]:
    proc, port = serve(store)
    yield {"proc": proc, "http": f"127.0.0.1:{port}", "grpc": proc.address, "port": port}
    proc.stop()


@pytest.fixture(scope="module")
def client(worker: dict[str, Any]) -> Any:
    return th.InferenceServerClient(worker["http"])


def http_input(name: str, array: np.ndarray, binary: bool = True) -> Any:
    datatype = "BYTES" if array.dtype == np.object_ else {np.float32: "FP32"}[array.dtype.type]
    inp = th.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def call(
    worker: dict[str, Any], method: str, path: str, body: bytes | str | None = None, **headers: str
) -> tuple[int, dict[str, Any] | list[Any] | None, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", worker["port"], timeout=30)
    try:
        conn.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None), dict(resp.getheaders())
    finally:
        conn.close()


# -- every endpoint through tritonclient.http --------------------------------------------------


def test_health_metadata_and_config(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "ferry" and "model_repository" in meta["extensions"]
    model = client.get_model_metadata("mlp")
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
    assert client.get_model_metadata("mlp", "1")["outputs"][0]["shape"] == [-1, 3]
    config = client.get_model_config("mlp")
    assert config["max_batch_size"] == 16 and config["input"][0]["data_type"] == "TYPE_FP32"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_onnxruntime(client: Any, store: Path, binary: bool) -> None:
    x = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
    out = th.InferRequestedOutput("output", binary_data=binary)
    result = client.infer("mlp", [http_input("input", x, binary)], outputs=[out], request_id="h-1")
    np.testing.assert_allclose(
        result.as_numpy("output"), ort_run(store / "models/mlp/1/model.onnx", x), atol=1e-5
    )
    response = result.get_response()
    assert response["id"] == "h-1" and response["model_version"] == "1"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) is binary


def test_the_same_request_over_grpc_and_http_gives_the_same_bytes(
    client: Any, worker: dict[str, Any]
) -> None:
    x = np.random.default_rng(4).standard_normal((2, 8)).astype(np.float32)
    over_http = client.infer("mlp", [http_input("input", x)]).as_numpy("output")
    with SyncInferenceClient(worker["grpc"]) as grpc_client:
        over_grpc = grpc_client.infer("mlp", {"input": x})["output"]
    assert over_http.tobytes() == over_grpc.tobytes()


def test_strings_and_classification(client: Any) -> None:
    text = np.array([[b"hello", "wörld".encode()], [b"", b"x"]], dtype=np.object_)
    for binary in (True, False):
        result = client.infer("echo", [http_input("text", text, binary)])
        assert result.as_numpy("same").tolist() == text.tolist()
    x = np.eye(3, 8, dtype=np.float32)
    out = th.InferRequestedOutput("output", class_count=2)
    top = client.infer("mlp", [http_input("input", x)], outputs=[out]).as_numpy("output")
    assert top.shape == (3, 2)
    score, index, label = top[0, 0].decode().split(":")
    assert LABELS[int(index)] == label and float(score) >= float(top[0, 1].decode().split(":")[0])


def test_statistics_count_exactly_this_tests_requests(client: Any) -> None:
    before = client.get_inference_statistics("mlp")["model_stats"][0]
    client.infer("mlp", [http_input("input", np.ones((4, 8), np.float32))])
    after = client.get_inference_statistics("mlp", "1")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 4
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 1
    assert isinstance(after["inference_stats"]["compute_infer"]["ns"], int)


def test_repository_index_unload_load_with_config(client: Any) -> None:
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["mlp"]["state"] == "READY" and index["mlp"]["version"] == "1"
    client.unload_model("echo")
    assert not client.is_model_ready("echo")
    client.load_model("echo")
    assert client.is_model_ready("echo")
    client.load_model("echo", config=json.dumps({"max_batch_size": 4}))
    assert client.get_model_config("echo")["max_batch_size"] == 4


def test_aio_client(worker: dict[str, Any], store: Path) -> None:
    x = np.random.default_rng(5).standard_normal((1, 8)).astype(np.float32)

    async def run() -> np.ndarray:
        async with th_aio.InferenceServerClient(worker["http"]) as c:
            assert await c.is_server_ready()
            return (await c.infer("mlp", [http_input("input", x)])).as_numpy("output")

    np.testing.assert_allclose(asyncio.run(run()), ort_run(store / "models/mlp/1/model.onnx", x), atol=1e-5)


def test_prometheus_metrics_share_the_rest_port(worker: dict[str, Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", worker["port"], timeout=30)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/plain")
    assert any(line.startswith("ferry_worker_in_flight ") for line in text.splitlines())


def test_request_id_is_echoed(worker: dict[str, Any]) -> None:
    status, _, headers = call(worker, "GET", "/v2/health/live", x_request_id="trace-42")
    assert status == 200 and headers["x-request-id"] == "trace-42"


# -- bad input: each with its status and message -----------------------------------------------

GOOD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": [0.0] * 8}]}


def _infer_body(**changes: Any) -> str:
    entry = {**GOOD["inputs"][0], **changes}
    return json.dumps({"inputs": [entry]})


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        ("{not json", {}, 400, "malformed JSON in the request body"),
        (
            _infer_body(data=[0.0] * 7),
            {},
            400,
            "input 'input': 'data' has 7 elements but shape [1, 8] needs 8",
        ),
        (_infer_body(data=["a"] * 8), {}, 400, "input 'input': FP32 data must be numbers, got str"),
        (
            _infer_body(shape=[1, 9], data=[0.0] * 9),
            {},
            400,
            "shape [1, 9] does not match the model's [-1, 8]",
        ),
        (
            _infer_body(datatype="INT32", data=[0] * 8),
            {},
            400,
            "datatype INT32 does not match the model's FP32",
        ),
        (
            _infer_body(shape=[17, 8], data=[0.0] * 136),
            {},
            400,
            "batch size 17 exceeds the model's max_batch_size 16",
        ),
        (json.dumps(GOOD), {"Inference-Header-Content-Length": "9999"}, 400, "lies past the end of the"),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "datatype": "FP32",
                            "shape": [1, 8],
                            "parameters": {"binary_data_size": 31},
                        }
                    ]
                }
            ),
            {},
            400,
            "binary_data_size 31 runs past the end of the binary data (0 bytes left)",
        ),
    ],
    ids=[
        "malformed",
        "data-length",
        "string-for-number",
        "dims",
        "dtype",
        "batch-limit",
        "header-length",
        "binary-size",
    ],
)
def test_bad_infer_bodies_are_400_with_the_reason(
    worker: dict[str, Any], body: str, headers: dict[str, str], status: int, message: str
) -> None:
    got, doc, _ = call(worker, "POST", "/v2/models/mlp/infer", body, **headers)
    assert got == status and isinstance(doc, dict) and message in doc["error"], doc


def test_binary_size_disagreeing_with_the_shape(worker: dict[str, Any]) -> None:
    head = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 8], "parameters": {"binary_data_size": 28}}
            ]
        }
    ).encode()
    got, doc, _ = call(
        worker,
        "POST",
        "/v2/models/mlp/infer",
        head + b"\0" * 28,
        Inference_Header_Content_Length=str(len(head)),
    )
    assert got == 400 and doc == {
        "error": "tensor 'input': raw content is 28 bytes but shape [1, 8] of FP32 needs 32"
    }


def test_a_passed_timeout_is_504(worker: dict[str, Any]) -> None:
    body = {**GOOD, "parameters": {"timeout": 300_000}}  # µs; the held model waits for 7 more rows
    got, doc, _ = call(worker, "POST", "/v2/models/held/infer", json.dumps(body))
    assert got == 504 and isinstance(doc, dict) and "expired in the queue" in doc["error"], doc


def test_body_over_the_limit_is_413(worker: dict[str, Any]) -> None:
    got, doc, _ = call(worker, "POST", "/v2/models/mlp/infer", "x" * (2 << 20))
    assert got == 413 and isinstance(doc, dict) and "over the limit of 1048576 bytes" in doc["error"]


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("POST", "/v2/models/nope/infer", 404, "unknown model 'nope'"),
        ("POST", "/v2/models/mlp/versions/9/infer", 404, "has no version 9"),
        ("GET", "/v2/models/mlp/versions/9", 404, "has no version 9"),
        ("GET", "/v2/models/mlp/infer", 405, "method GET is not allowed on /v2/models/mlp/infer; use POST"),
        ("GET", "/v2/nothing-here", 404, "no endpoint GET /v2/nothing-here"),
        ("GET", "/v2/models/nope/ready", 503, "model 'nope' is not ready"),
    ],
)
def test_routing_errors(worker: dict[str, Any], method: str, path: str, status: int, message: str) -> None:
    got, doc, _ = call(worker, method, path, json.dumps(GOOD) if method == "POST" else None)
    assert got == status and isinstance(doc, dict) and message in doc["error"], doc


def _closed_by_server(sock: socket.socket, seconds: float) -> bool:
    """Drips a header line a second until the server hangs up. A reset counts as hanging up: a drip line
    still unread when the server closes turns its close into a reset."""
    deadline = time.monotonic() + seconds
    sock.settimeout(1)
    while time.monotonic() < deadline:
        try:
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        try:
            sock.sendall(b"X-Drip: 1\r\n")  # the timer is on the whole head, not on each line
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def test_a_slow_client_is_cut_off_while_others_are_served(worker: dict[str, Any]) -> None:
    with socket.create_connection(("127.0.0.1", worker["port"]), timeout=30) as slow:
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
        status, _, _ = call(worker, "GET", "/v2/health/ready")  # the others go on meanwhile
        assert status == 200
        assert _closed_by_server(slow, 20), "the server kept a connection whose request head never ended"


# -- the same keys and roles as over gRPC ------------------------------------------------------


@pytest.fixture(scope="module")
def secured(store: Path) -> Iterator[dict[str, Any]]:
    keys = {
        "keys": [
            {"name": "reader", "sha256": hash_key(KEYS["reader"]), "roles": ["infer", "read"]},
            {"name": "loader", "sha256": hash_key(KEYS["loader"]), "roles": ["models"]},
        ]
    }
    proc, port = serve(store, "--api-keys", json.dumps(keys))
    yield {"proc": proc, "port": port}
    proc.stop()


def test_keys_and_roles_over_http(secured: dict[str, Any]) -> None:
    body = json.dumps(GOOD)
    assert call(secured, "GET", "/v2/health/ready")[0] == 200  # probes carry no key
    assert call(secured, "POST", "/v2/models/mlp/infer", body)[:2] == (
        401,
        {"error": "missing or unknown API key (send 'authorization: Bearer <key>')"},
    )
    reader = {"Authorization": f"Bearer {KEYS['reader']}"}
    assert call(secured, "POST", "/v2/models/mlp/infer", body, **reader)[0] == 200
    assert call(secured, "POST", "/v2/repository/models/mlp/unload", "", **reader)[:2] == (
        403,
        {"error": "API key 'reader' lacks the role 'models' that RepositoryModelUnload needs"},
    )
    assert call(secured, "GET", "/metrics")[0] == 401  # metrics need the read role when keys are on
    assert call(secured, "GET", "/v2/models/stats", **reader)[0] == 200
    loader = {"Authorization": f"Bearer {KEYS['loader']}"}
    assert call(secured, "POST", "/v2/repository/models/mlp/load", "", **loader)[0] == 200
    audit = [json.loads(line) for line in secured["proc"].output().splitlines() if '"audit"' in line]
    assert any(
        a["method"] == "RepositoryModelLoad" and a["key"] == "loader" and a["outcome"] == "OK" for a in audit
    )
    assert any(
        a["method"] == "RepositoryModelUnload"
        and a["key"] == "reader"
        and a["outcome"] == "PERMISSION_DENIED"
        for a in audit
    )


# -- TLS and mTLS with the gRPC port's certificate files ----------------------------------------


@pytest.fixture(scope="module")
def tls_worker(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tests.integration.test_gateway_security import make_pki

    pki = make_pki(tmp_path_factory.mktemp("pki"))
    proc, port = serve(
        store, "--tls-cert", str(pki["server_crt"]), "--tls-key", str(pki["server_key"]),
        "--tls-client-ca", str(pki["ca_crt"]),
    )  # fmt: skip
    yield {"proc": proc, "port": port, "pki": pki}
    proc.stop()


def test_https_with_a_client_certificate(tls_worker: dict[str, Any], store: Path) -> None:
    import ssl

    pki = tls_worker["pki"]
    context = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    address = f"localhost:{tls_worker['port']}"
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):  # mTLS: no certificate, no call
        conn = http.client.HTTPSConnection("localhost", tls_worker["port"], context=context, timeout=10)
        conn.request("GET", "/v2/health/ready")
        conn.getresponse().read()
    context.load_cert_chain(str(pki["client_crt"]), str(pki["client_key"]))
    client = th.InferenceServerClient(address, ssl=True, ssl_context_factory=lambda: context)
    assert client.is_server_ready()
    x = np.random.default_rng(9).standard_normal((1, 8)).astype(np.float32)
    got = client.infer("mlp", [http_input("input", x)]).as_numpy("output")
    np.testing.assert_allclose(got, ort_run(store / "models/mlp/1/model.onnx", x), atol=1e-5)
    plain = http.client.HTTPConnection("127.0.0.1", tls_worker["port"], timeout=10)
    with pytest.raises(ConnectionError):  # and no plaintext on the TLS port: the server hangs up
        plain.request("GET", "/v2/health/ready")
        plain.getresponse()
