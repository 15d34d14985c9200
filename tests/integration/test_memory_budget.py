"""A worker's memory budget, with and without eviction, on real workers and real models.

Three copies of one small MLP fill a store; the budget holds two of them. Without eviction the
third does not load and an explicit load of it is RESOURCE_EXHAUSTED naming the budget. With
``--evict lru`` the third evicts the least recently used, and a request to an evicted model loads
it again (evicting the next least recently used) and is answered correctly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.integration.test_gateway import mlp_request, wait_until
from tests.support.deps import require_module
from tests.support.models import export_mlp, ort_run, publish
from tests.support.procs import ServiceProcess

tc = require_module("tritonclient.grpc")
MODELS = ("a", "b", "c")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    root = tmp_path_factory.mktemp("store")
    onnx_file = export_mlp(tmp_path_factory.mktemp("onnx") / "mlp.onnx")
    for name in MODELS:
        publish(root, name, 1, onnx_file)
    return root, onnx_file, onnx_file.stat().st_size


def worker(root: Path, budget: int, *extra: str) -> ServiceProcess:
    return ServiceProcess.serve(
        "worker",
        "--store",
        str(root),
        "--port",
        "0",
        "--poll-interval-s",
        "0",
        "--memory-budget-bytes",
        str(budget),
        *extra,
    ).start()


def index(address: str) -> dict[str, tuple[str, str]]:
    client = tc.InferenceServerClient(address)
    return {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}


def infer(address: str, model: str, seed: int) -> pb.ModelInferResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(mlp_request(1, seed, model), timeout=30)


@pytest.fixture
def strict(store: tuple[Path, Path, int]) -> Iterator[str]:
    root, _, size = store
    proc = worker(root, int(size * 2.5))
    try:
        yield proc.address
    finally:
        proc.stop()


@pytest.fixture
def evicting(store: tuple[Path, Path, int]) -> Iterator[str]:
    root, _, size = store
    proc = worker(root, int(size * 2.5), "--evict", "lru")
    try:
        yield proc.address
    finally:
        proc.stop()


def test_a_load_past_the_budget_is_refused_naming_it(strict: str, store: tuple[Path, Path, int]) -> None:
    size = store[2]
    states = index(strict)
    assert states["a"][0] == states["b"][0] == "READY"
    assert states["c"][0] == "UNAVAILABLE" and "memory budget of" in states["c"][1], states["c"]
    client = tc.InferenceServerClient(strict)
    with pytest.raises(tc.InferenceServerException) as info:
        client.load_model("c")
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert f"needs about {size} bytes, and {2 * size} of the worker's memory budget" in str(info.value)
    stats = {s.name: s for s in client.get_inference_statistics(as_json=False).model_stats}
    assert [(u.type, u.byte_size) for u in stats["a"].memory_usage] == [("CPU", size)]
    assert not stats.get("c") or not stats["c"].memory_usage


def test_eviction_makes_room_and_an_evicted_model_comes_back_on_request(
    evicting: str, store: tuple[Path, Path, int]
) -> None:
    _, onnx_file, _ = store
    states = index(evicting)
    assert [states[m][0] for m in MODELS] == ["UNAVAILABLE", "READY", "READY"]  # a: evicted for c
    assert "evicted to make room for model 'c' version 1" in states["a"][1]
    infer(evicting, "b", 1)  # b used before c: b is now the least recently used
    infer(evicting, "c", 2)
    x = np.random.default_rng(3).standard_normal((1, 8)).astype(np.float32)
    answer = infer(evicting, "a", 3)  # waits for a to load again
    np.testing.assert_allclose(
        np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(1, -1),
        ort_run(onnx_file, x),
        atol=1e-5,
    )
    wait_until(lambda: index(evicting)["b"][0] == "UNAVAILABLE", 10, "b evicted for a")
    assert (
        index(evicting)["c"][0] == "READY" and "evicted to make room for model 'a'" in index(evicting)["b"][1]
    )
