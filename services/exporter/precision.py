"""Graph optimisation and reduced precision, each one file in, one file out.

- ``optimize``: ONNX Runtime's offline graph optimisation. ``basic`` (the default)
  folds constants and removes redundant nodes but keeps standard ONNX ops, so the
  served file runs on any execution provider; ``extended`` adds CPU-specific fusions.
- ``to_fp16``: weights and compute in float16 with float32 inputs and outputs kept
  (``keep_io_types``), so clients and the serving config do not change.
- ``to_int8``: dynamic quantisation (weights int8, activations quantised at run
  time), or static with calibration samples (QDQ format, activations calibrated).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ferry.core.errors import FailedPrecondition, InvalidArgument

PRECISIONS = ("fp32", "fp16", "int8")
QUANTIZATIONS = ("dynamic", "static")
OPTIMIZATIONS = ("none", "basic", "extended")


def optimize(src: Path, dst: Path, level: str = "basic") -> Path:
    """Write the ORT-optimised graph of ``src`` to ``dst`` (a plain copy when ``level`` is none)."""
    if level not in OPTIMIZATIONS:
        raise InvalidArgument(f"unknown optimization {level!r}; choose one of {', '.join(OPTIMIZATIONS)}")
    if level == "none":
        dst.write_bytes(src.read_bytes())
        return dst
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if level == "basic"
        else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    )
    opts.optimized_model_filepath = str(dst)
    opts.intra_op_num_threads = 1
    try:
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types for graphs it cannot load
        raise FailedPrecondition(f"ONNX Runtime cannot load the exported graph: {err}") from err
    return dst


def to_fp16(src: Path, dst: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(dst))
    return dst


class _Calibration:
    """Feeds calibration batches to ORT's static quantiser (its CalibrationDataReader protocol)."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._name = input_name
        self._items: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._items, None)
        return None if batch is None else {self._name: batch}

    def rewind(self) -> None:  # the quantiser may not call it; kept for the protocol
        pass


def to_int8(
    src: Path,
    dst: Path,
    mode: str = "dynamic",
    input_name: str = "input",
    calibration: Sequence[np.ndarray] = (),
) -> Path:
    """Quantise ``src`` to int8 weights; ``static`` also calibrates activations on ``calibration``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in QUANTIZATIONS:
        raise InvalidArgument(f"unknown quantization {mode!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if mode == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst
    if not calibration:
        raise FailedPrecondition("static int8 quantisation needs calibration samples; none were found")
    quantize_static(
        str(src),
        str(dst),
        _Calibration(input_name, calibration),  # type: ignore[arg-type]
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return dst
