"""Whether the execution providers a worker was told to use really load, before any model is there.

ONNX Runtime lists ``CUDAExecutionProvider`` as available whenever onnxruntime-gpu is installed,
even when the CUDA or cuDNN libraries it needs are missing; only creating a session finds out, and
then it falls back to CPU with an INFO line. A worker that checks only at its first model load
would start "healthy" on an empty store and refuse the first model published to it. So at start
the worker builds a one-node graph in memory and opens a session on the asked providers: what that
session got is what every model would get.
"""

from __future__ import annotations

from typing import Any

import onnxruntime as ort
from onnx import TensorProto, helper


def _probe_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def providers_that_load(providers: list[Any]) -> list[str]:
    """The providers a session asked for ``providers`` (names or ``(name, options)``) ends up with."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the fallback's INFO line is what this function reports
    session = ort.InferenceSession(_probe_model(), options, providers=providers)
    return list(session.get_providers())
