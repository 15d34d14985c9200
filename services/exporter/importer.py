"""ImportOnnx: validate an uploaded ONNX file and publish it as the next version of a model.

An imported file has no PyTorch source to compare against, so there is no parity
gate; instead it must pass ``onnx.checker`` (full check), load in ONNX Runtime,
and have a batch dimension (a dynamic first axis) on every input, because the
serving config batches (``max_batch_size`` > 0). Each failure is INVALID_ARGUMENT
with the reason.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from ferry.core.datatypes import BY_ONNX
from ferry.core.errors import InvalidArgument
from ferry.core.modelconfig import ModelSpec, TensorSpec, spec_from_config, spec_to_config
from ferry.core.store import MODEL_FILE, Store, validate_name


def _tensor(value_info: Any, where: str, batched: bool) -> TensorSpec:
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        raise InvalidArgument(f"{where} {value_info.name!r} is a {kind}, not a tensor")
    tensor = value_info.type.tensor_type
    known = BY_ONNX.get(tensor.elem_type)
    datatype = known.name if known else None
    if datatype is None:
        raise InvalidArgument(
            f"{where} {value_info.name!r} has an unsupported element type {tensor.elem_type}"
        )
    if not tensor.HasField("shape"):
        raise InvalidArgument(f"{where} {value_info.name!r} has no shape; a batch dimension is required")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if batched:
        if not dims:
            raise InvalidArgument(
                f"{where} {value_info.name!r} is a scalar: it lacks a batch dimension (a dynamic first axis)"
            )
        if dims[0] != -1:
            raise InvalidArgument(
                f"{where} {value_info.name!r} lacks a batch dimension: its first axis is fixed at {dims[0]} "
                f"(shape {dims}); export it with a dynamic first axis"
            )
    return TensorSpec(value_info.name, datatype, tuple(dims[1:]) if dims else ())


def inspect_onnx(data: bytes) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, Any]]:
    """Check an ONNX file; returns its inputs and outputs (dims without batch) and facts for meta."""
    import onnx

    if not data:
        raise InvalidArgument("no ONNX bytes were uploaded")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf DecodeError and friends
        raise InvalidArgument(f"not a valid ONNX model: cannot parse it ({err})") from err
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # ValidationError, InferenceError
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InvalidArgument(f"not a valid ONNX model: {reason}") from err
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in initializers]
    if not graph_inputs or not model.graph.output:
        raise InvalidArgument("not a valid ONNX model: the graph has no inputs or no outputs")
    inputs = [_tensor(v, "input", True) for v in graph_inputs]
    outputs = [_tensor(v, "output", False) for v in model.graph.output]
    try:
        import onnxruntime as ort

        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT's own error types
        raise InvalidArgument(f"ONNX Runtime cannot load the model: {err}") from err
    facts = {
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }
    return inputs, outputs, facts


def import_onnx(
    store: Store,
    model_name: str,
    data: bytes,
    max_batch_size: int,
    config_json: str = "",
    source: str = "",
) -> tuple[int, dict[str, Any]]:
    """Validate ``data`` and publish it as the next version of ``model_name``; returns (version, meta)."""
    validate_name(model_name, "model name")
    overrides: dict[str, Any] = {}
    if config_json:
        try:
            overrides = json.loads(config_json)
        except ValueError as err:
            raise InvalidArgument(f"config_json is not JSON: {err}") from err
        if not isinstance(overrides, dict):
            raise InvalidArgument("config_json must be a JSON object")
    inputs, outputs, facts = inspect_onnx(data)
    outputs = [TensorSpec(t.name, t.datatype, t.dims) for t in outputs]
    spec = ModelSpec(model_name, tuple(inputs), tuple(outputs), max_batch_size=max_batch_size)
    config = {**spec_to_config(spec), **overrides, "name": model_name}
    spec_from_config(model_name, config)  # the merged config must still be a valid config
    meta = {
        "format": 1,
        "created_unix_ms": int(time.time() * 1000),
        "source": {"kind": "import", "origin": source, "sha256": hashlib.sha256(data).hexdigest()},
        "precision": "as uploaded",
        "onnx": facts,
        "files": {"model_bytes": len(data)},
        "parity": None,
    }
    version = store.publish_version(model_name, {MODEL_FILE: data}, meta, config)
    meta["version"] = version
    return version, meta
