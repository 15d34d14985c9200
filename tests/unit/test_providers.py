"""Execution providers: what the worker asks ONNX Runtime for, on CPU here and on CUDA where lent.

The ``gpu`` tests need onnxruntime-gpu and a working CUDA device; they are skipped elsewhere
(CI has no GPU) and run on the lent GPU machine: ``pytest -m gpu tests/unit/test_providers.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.inference.provider_probe import PROBE_MODEL, providers_that_load
from services.inference.runner import OrtRunner, default_providers, provider_list

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def affine_model(path: Path) -> Path:
    """y = x @ W with a dynamic batch axis: small enough to build without torch."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])],
        "affine",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(WEIGHTS, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_explicit_cpu_is_passed_through_as_a_name() -> None:
    assert provider_list([CPU]) == [CPU]


def test_cuda_gets_its_device_memory_limit_and_cudnn_search() -> None:
    providers = provider_list(
        [CUDA, CPU], cuda_device_id=3, cuda_mem_limit=1 << 30, cudnn_search="EXHAUSTIVE"
    )
    assert providers == [
        (CUDA, {"device_id": 3, "cudnn_conv_algo_search": "EXHAUSTIVE", "gpu_mem_limit": 1 << 30}),
        CPU,
    ]


def test_no_memory_limit_leaves_the_option_out() -> None:
    assert provider_list([CUDA]) == [(CUDA, {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"})]


def test_the_default_is_cuda_first_only_where_onnxruntime_offers_it() -> None:
    available = ort.get_available_providers()
    expected = [p for p in (CUDA, CPU) if p in available]
    assert default_providers() == expected
    assert [p if isinstance(p, str) else p[0] for p in provider_list([])] == expected
    assert default_providers()[-1] == CPU  # CPU is always the fallback


def test_a_cpu_session_runs_on_cpu(tmp_path: Path) -> None:
    runner = OrtRunner(affine_model(tmp_path / "m.onnx"), providers=provider_list([CPU]), instances=2)
    assert runner.providers == [CPU] and len(runner.sessions) == 2
    x = np.ones((5, 4), np.float32)
    np.testing.assert_allclose(runner.run({"input": x})["output"], x @ WEIGHTS, rtol=1e-6)


def _cuda_works() -> bool:
    """Listed is not enough: only a session that kept CUDA proves the GPU path."""
    if CUDA not in ort.get_available_providers():
        return False
    try:
        return providers_that_load([CUDA])[0] == CUDA
    except Exception:
        return False


needs_cuda = pytest.mark.skipif(not _cuda_works(), reason="no working CUDA device for onnxruntime-gpu")


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_session_keeps_cuda_and_matches_cpu(tmp_path: Path) -> None:
    path = affine_model(tmp_path / "m.onnx")
    gpu = OrtRunner(path, providers=provider_list([CUDA, CPU]))
    cpu = OrtRunner(path, providers=provider_list([CPU]))
    assert gpu.providers[0] == CUDA
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    np.testing.assert_allclose(gpu.run({"input": x})["output"], cpu.run({"input": x})["output"], atol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_the_default_providers_pick_cuda_when_it_works() -> None:
    assert default_providers()[0] == CUDA


def test_the_start_up_probe_reports_what_a_session_got() -> None:
    assert providers_that_load([CPU]) == [CPU]


@pytest.mark.gpu
@needs_cuda
def test_the_start_up_probe_sees_cuda_load() -> None:
    assert providers_that_load(provider_list([CUDA, CPU]))[0] == CUDA


def test_the_probe_model_is_the_one_node_graph_it_says() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="")
    model.ir_version = 8
    assert model.SerializeToString() == PROBE_MODEL
