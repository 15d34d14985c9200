"""The v2 tensor codec: protobuf tensors <-> numpy arrays, for every v2 datatype.

A v2 tensor travels either in ``raw_*_contents`` (little-endian bytes, one entry
per tensor, in tensor order) or in the typed ``contents`` field. Ferry reads
both and answers raw by default, which is what clients decode fastest. BYTES
tensors are raw-encoded as a 4-byte little-endian length before each element.
Every check here raises ``InvalidArgument`` naming the tensor and the problem.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.datatypes import NUMPY, TABLE
from ferry.core.errors import InvalidArgument

DATATYPES: dict[str, np.dtype] = NUMPY

# Which typed ``InferTensorContents`` field carries each datatype. FP16 has none in
# the protocol: it travels raw only.
CONTENTS_FIELD: dict[str, str] = {d.name: d.contents for d in TABLE if d.contents}

_BY_KIND: dict[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name not in ("BYTES", "BOOL")
}


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name of a numpy array."""
    dt = array.dtype
    if dt == np.bool_:
        return "BOOL"
    if dt.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _BY_KIND[(dt.kind, dt.itemsize)]
    except KeyError:
        raise InvalidArgument(f"numpy dtype {dt} has no v2 datatype") from None


def numpy_dtype(datatype: str) -> np.dtype:
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise InvalidArgument(
            f"unsupported datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
        ) from None


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def check_shape(name: str, shape: Sequence[int]) -> None:
    if any(int(d) < 0 for d in shape):
        raise InvalidArgument(f"tensor {name!r}: shape {list(shape)} has a negative dimension")


def serialize_bytes(array: np.ndarray) -> bytes:
    """Raw encoding of a BYTES tensor: each element as <u4 length + bytes, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    out = np.empty(count, dtype=np.object_)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"tensor {name!r}: raw BYTES content ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(f"tensor {name!r}: raw BYTES element {i} runs past the end of the content")
        out[i] = raw[offset : offset + length]
        offset += length
    if offset != len(raw):
        raise InvalidArgument(
            f"tensor {name!r}: {len(raw) - offset} bytes left over after {count} BYTES elements"
        )
    return out


def utf8_strings(name: str, array: np.ndarray) -> np.ndarray:
    """A BYTES tensor as the ``str`` elements an ONNX STRING input takes: v2 carries bytes,
    ONNX Runtime wants text. Invalid UTF-8 is the caller's INVALID_ARGUMENT, by element."""
    flat = array.reshape(-1)
    out = np.empty(flat.shape, dtype=np.object_)
    for i, item in enumerate(flat):
        if isinstance(item, str):
            out[i] = item
            continue
        try:
            out[i] = bytes(item).decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidArgument(
                f"input {name!r}: element {i} is not valid UTF-8 ({err.reason} at byte {err.start})"
            ) from err
    return out.reshape(array.shape)


def array_from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """Decode one raw tensor, checking its byte size against shape x datatype."""
    dtype = numpy_dtype(datatype)
    check_shape(name, shape)
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(name, raw, count).reshape(shape)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"tensor {name!r}: raw content is {len(raw)} bytes but shape {list(shape)} "
            f"of {datatype} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def array_from_contents(
    name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents
) -> np.ndarray:
    """Decode one tensor sent in the typed ``contents`` field."""
    dtype = numpy_dtype(datatype)
    check_shape(name, shape)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"tensor {name!r}: {datatype} has no typed contents field; send it raw")
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"tensor {name!r}: {field} holds {len(values)} values but shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=np.object_)
        out[:] = list(values)
        return out.reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _populated_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> bool:
    return tensor.HasField("contents") and any(
        len(getattr(tensor.contents, f)) for f in set(CONTENTS_FIELD.values())
    )


def check_content_form(request: pb.ModelInferRequest) -> None:
    """A request sends every input raw or every input typed; one raw entry per input."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "raw and typed contents cannot be mixed in one request"
        )


def _decode_raw_fast(request: pb.ModelInferRequest) -> dict[str, np.ndarray] | None:
    """The common case (every input raw, fixed-size datatype, sizes right) with no checks repeated;
    None sends the request through the full path, which names whatever is wrong."""
    raw = request.raw_input_contents
    inputs = request.inputs
    if not raw or len(raw) != len(inputs):
        return None
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(inputs):
        dtype = FIXED_DTYPES.get(tensor.datatype)
        name = tensor.name
        if dtype is None or name in arrays or tensor.HasField("contents"):
            return None
        shape = tuple(tensor.shape)
        count = 1
        for dim in shape:
            if dim < 0:
                return None
            count *= dim
        data = raw[i]
        if len(data) != count * dtype.itemsize:
            return None
        arrays[name] = np.ndarray(shape, dtype, data)  # a read-only view, no copy
    return arrays


FIXED_DTYPES = {name: dt for name, dt in DATATYPES.items() if name != "BYTES"}


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """All input tensors of a request as numpy arrays (raw and typed both accepted, not mixed)."""
    fast = _decode_raw_fast(request)
    if fast is not None:
        return fast
    check_content_form(request)
    raw = request.raw_input_contents
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidArgument(f"input {tensor.name!r} appears more than once")
        if raw:
            if _populated_contents(tensor):
                raise InvalidArgument(
                    f"input {tensor.name!r} has typed contents while the request uses raw_input_contents; "
                    "raw and typed contents cannot be mixed"
                )
            arrays[tensor.name] = array_from_raw(tensor.name, tensor.datatype, tensor.shape, raw[i])
        else:
            arrays[tensor.name] = array_from_contents(
                tensor.name, tensor.datatype, tensor.shape, tensor.contents
            )
    return arrays


def raw_bytes(array: np.ndarray) -> bytes:
    """The little-endian raw encoding of any array."""
    if array.dtype.kind in ("O", "S", "U"):
        return serialize_bytes(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


_FAST_OUT = {
    np.dtype("<f4"): "FP32",
    np.dtype("<i8"): "INT64",
    np.dtype("<i4"): "INT32",
    np.dtype("<f8"): "FP64",
}


def add_output(response: pb.ModelInferResponse, name: str, array: np.ndarray) -> None:
    """Append one output tensor to ``response`` in raw form."""
    datatype = _FAST_OUT.get(array.dtype)
    if datatype is not None and array.flags.c_contiguous:
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
        return
    tensor = response.outputs.add()
    tensor.name = name
    tensor.datatype = datatype_of(array)
    tensor.shape.extend(array.shape)
    response.raw_output_contents.append(raw_bytes(array))


def set_typed_contents(contents: pb.InferTensorContents, array: np.ndarray) -> None:
    """Fill the typed contents field for ``array`` (for clients that want typed outputs)."""
    datatype = datatype_of(array)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"{datatype} has no typed contents field")
    flat = array.reshape(-1)
    if datatype == "BYTES":
        getattr(contents, field).extend(x if isinstance(x, bytes) else str(x).encode() for x in flat)
    else:
        getattr(contents, field).extend(flat.tolist())


def add_input(request: pb.ModelInferRequest, name: str, array: np.ndarray) -> None:
    """Append one input tensor to ``request`` in raw form (the client side of ``decode_inputs``)."""
    tensor = request.inputs.add()
    tensor.name = name
    tensor.datatype = datatype_of(array)
    tensor.shape.extend(array.shape)
    request.raw_input_contents.append(raw_bytes(array))


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """All output tensors of a response as numpy arrays, raw or typed."""
    raw = response.raw_output_contents
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        if raw:
            out[tensor.name] = array_from_raw(tensor.name, tensor.datatype, tensor.shape, raw[i])
        else:
            out[tensor.name] = array_from_contents(
                tensor.name, tensor.datatype, tensor.shape, tensor.contents
            )
    return out
