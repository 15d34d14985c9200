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

# A one-node ONNX model, y = Identity(x) over FLOAT [1], opset 17, IR version 8, as serialized
# bytes: the worker image has ONNX Runtime but not the onnx package that builds graphs.
# tests/unit/test_providers.py rebuilds it with onnx.helper and compares.
PROBE_MODEL = (
    b'\x08\x08\x12\x00:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08'
    b"\x01\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11"
)


def providers_that_load(providers: list[Any]) -> list[str]:
    """The providers a session asked for ``providers`` (names or ``(name, options)``) ends up with."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the fallback's INFO line is what this function reports
    session = ort.InferenceSession(PROBE_MODEL, options, providers=providers)
    return list(session.get_providers())
