"""``class_count`` through tritonclient, on a real worker and a real gateway."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client.inference import build_request
from ferry.core.classify import write_labels
from tests.integration.test_gateway import worker_and_gateway
from tests.support.deps import require_module
from tests.support.models import export_cnn, export_mlp, publish

tc = require_module("tritonclient.grpc")
LABELS = ("cat", "dog", "bird")
IRIS = ("setosa", "versicolor", "virginica")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("store")
    onnx = tmp_path_factory.mktemp("onnx")
    publish(root, "mlp", 1, export_mlp(onnx / "mlp.onnx", classes=3))
    (root / "models" / "mlp" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    publish(root, "cnn", 1, export_cnn(onnx / "cnn.onnx", classes=4))
    # the exporter writes a version's labels into the version; they win over the model's
    named = publish(root, "named", 1, onnx / "mlp.onnx")
    (root / "models" / "named" / "labels.txt").write_text("x\ny\nz\n")
    write_labels(named, IRIS)
    with worker_and_gateway(root, ("mlp", "cnn", "named")) as (addresses, _):
        yield addresses


def _input(shape: list[int]) -> Any:
    x = tc.InferInput("input", shape, "FP32")
    x.set_data_from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    return x


@pytest.mark.parametrize("hop", ["worker", "gateway"])
@pytest.mark.parametrize(("model", "shape", "k"), [("mlp", [4, 8], 2), ("cnn", [3, 3, 8, 8], 4)])
def test_class_count_returns_the_top_k_as_strings(
    servers: dict[str, str], hop: str, model: str, shape: list[int], k: int
) -> None:
    client = tc.InferenceServerClient(servers[hop])
    x = _input(shape)
    scores = client.infer(model, [x]).as_numpy("output")
    ranked = client.infer(model, [x], outputs=[tc.InferRequestedOutput("output", class_count=k)])
    top = ranked.as_numpy("output")
    assert top.shape == (shape[0], k)
    for row, entries in zip(scores, top, strict=True):
        parts = [e.decode().split(":") for e in entries]
        assert [int(p[1]) for p in parts] == list(np.argsort(-row, kind="stable")[:k])
        assert np.allclose([float(p[0]) for p in parts], np.sort(row)[::-1][:k], atol=1e-5)
        if model == "mlp":
            assert [p[2] for p in parts] == [LABELS[int(p[1])] for p in parts]
        else:
            assert all(len(p) == 2 for p in parts)  # no labels file, no label


@pytest.mark.parametrize("hop", ["worker", "gateway"])
@pytest.mark.parametrize(
    ("count", "message"),
    [(0, "class_count must be at least 1, got 0"), (-3, "class_count must be at least 1, got -3"),
     (4, "class_count 4 is more than its 3 classes")],
)  # fmt: skip
def test_bad_class_counts_are_invalid_argument(
    servers: dict[str, str], hop: str, count: int, message: str
) -> None:
    request = build_request("mlp", {"input": np.ones((1, 8), np.float32)})
    out = request.outputs.add(name="output")
    out.parameters["classification"].int64_param = count
    with grpc.insecure_channel(servers[hop]) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")


def test_a_versions_own_labels_are_used(servers: dict[str, str]) -> None:
    client = tc.InferenceServerClient(servers["worker"])
    x = _input([2, 8])
    scores = client.infer("named", [x]).as_numpy("output")
    top = client.infer("named", [x], outputs=[tc.InferRequestedOutput("output", class_count=3)])
    for row, entries in zip(scores, top.as_numpy("output"), strict=True):
        parts = [e.decode().split(":") for e in entries]
        assert [p[2] for p in parts] == [IRIS[i] for i in np.argsort(-row, kind="stable")]
