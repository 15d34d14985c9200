"""The one datatype table: each v2 datatype with its numpy dtype, ONNX element type, ONNX
Runtime type string and the ``InferTensorContents`` field that carries it typed.

The codec, the config reader, the worker's graph reader and the exporter's importer all
translate datatypes; they read these rows, so a type added here is known everywhere at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ferry.core.errors import InvalidArgument


@dataclass(frozen=True)
class Datatype:
    name: str  # the v2 protocol's name (FP32); Triton's config says TYPE_FP32, and TYPE_STRING for BYTES
    numpy: np.dtype | None  # None: numpy has no such type (BF16), so it cannot be decoded
    onnx: int  # onnx.TensorProto element type
    ort: str  # what ONNX Runtime's NodeArg.type says
    contents: str | None  # the typed InferTensorContents field; FP16 and BF16 travel raw only


TABLE: tuple[Datatype, ...] = (
    Datatype("BOOL", np.dtype(np.bool_), 9, "tensor(bool)", "bool_contents"),
    Datatype("UINT8", np.dtype("<u1"), 2, "tensor(uint8)", "uint_contents"),
    Datatype("UINT16", np.dtype("<u2"), 4, "tensor(uint16)", "uint_contents"),
    Datatype("UINT32", np.dtype("<u4"), 12, "tensor(uint32)", "uint_contents"),
    Datatype("UINT64", np.dtype("<u8"), 13, "tensor(uint64)", "uint64_contents"),
    Datatype("INT8", np.dtype("<i1"), 3, "tensor(int8)", "int_contents"),
    Datatype("INT16", np.dtype("<i2"), 5, "tensor(int16)", "int_contents"),
    Datatype("INT32", np.dtype("<i4"), 6, "tensor(int32)", "int_contents"),
    Datatype("INT64", np.dtype("<i8"), 7, "tensor(int64)", "int64_contents"),
    Datatype("FP16", np.dtype("<f2"), 10, "tensor(float16)", None),
    Datatype("FP32", np.dtype("<f4"), 1, "tensor(float)", "fp32_contents"),
    Datatype("FP64", np.dtype("<f8"), 11, "tensor(double)", "fp64_contents"),
    Datatype("BYTES", np.dtype(np.object_), 8, "tensor(string)", "bytes_contents"),
    Datatype("BF16", None, 16, "tensor(bfloat16)", None),
)

BY_NAME = {d.name: d for d in TABLE}
BY_ONNX = {d.onnx: d for d in TABLE}
BY_ORT = {d.ort: d for d in TABLE}
# The datatypes a request can carry: those numpy can hold.
NUMPY: dict[str, np.dtype] = {d.name: d.numpy for d in TABLE if d.numpy is not None}


def from_config(value: object, where: str) -> str:
    """A datatype as ``config.json`` writes it (``FP32``, ``TYPE_FP32``, ``TYPE_STRING``) -> its v2 name."""
    name = str(value).removeprefix("TYPE_")
    name = "BYTES" if name == "STRING" else name
    if name not in NUMPY:
        raise InvalidArgument(f"{where}: unknown datatype {value!r}")
    return name


def config_name(datatype: str) -> str:
    """The v2 name -> Triton's model-config enum name (``TYPE_FP32``, ``TYPE_STRING``)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
