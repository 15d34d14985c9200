"""The KServe v2 REST codec: JSON bodies (and Triton's binary tensor data) <-> the v2 messages.

The HTTP front door turns each request into the same ``grpc_service_pb2`` message the gRPC
path receives, hands it to the same data plane, and turns the answer back, so a request
means the same thing whichever way it arrives. Pure: no sockets, every problem an
``InvalidArgument`` naming the tensor and what is wrong.

Binary tensor data (Triton's extension): the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the tensors whose parameters carry
``binary_data_size``, back to back in tensor order, raw v2 layout (BYTES length-prefixed).
An output comes back binary when its ``binary_data`` parameter says so, or by default
when the request's ``binary_data_output`` parameter is true.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.codec import array_from_raw, check_shape, element_count, numpy_dtype, raw_bytes
from ferry.core.datatypes import BY_NAME
from ferry.core.errors import InvalidArgument

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
BINARY = "binary_data"
BINARY_OUTPUT = "binary_data_output"
SHM_REGION = "shared_memory_region"
# Parameters that only say how a tensor travels over HTTP: they do not reach the data plane.
_TRANSPORT_ONLY = frozenset({BINARY_SIZE, BINARY, BINARY_OUTPUT})


@dataclass
class OutputForm:
    """How the answer's outputs travel back: binary or JSON, per output, and which are in
    shared memory (no data in the body at all)."""

    binary_default: bool = False
    binary: dict[str, bool] = field(default_factory=dict)
    shm: frozenset[str] = frozenset()

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


# -- JSON and parameters ----------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: bytes | str, what: str = "request body") -> Any:
    """Strict JSON: no NaN or Infinity literals, and no nesting deep enough to exhaust the stack."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"malformed JSON in the {what}: {err}") from None
    except RecursionError:
        raise InvalidArgument(f"malformed JSON in the {what}: nested too deeply") from None


def _utf8(text: str, what: str) -> bytes:
    """A JSON string as UTF-8; a lone surrogate escape (valid JSON, not text) is the caller's error."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} holds a lone UTF-16 surrogate escape, which is not text") from None


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def set_parameter(target: Any, key: str, value: Any, where: str, numbers: bool = True) -> None:
    """One JSON parameter value into a v2 parameter oneof: bool, integer, number or string.
    Repository parameters (``ModelRepositoryParameter``) have no number: ``numbers=False``."""
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidArgument(f"{where}: parameter {key!r} is out of the int64 range")
        target.int64_param = value
    elif isinstance(value, float) and numbers:
        target.double_param = value
    elif isinstance(value, str):
        _utf8(value, f"{where}: parameter {key!r}")
        target.string_param = value
    else:
        kinds = "a boolean, number or string" if numbers else "a boolean, integer or string"
        raise InvalidArgument(f"{where}: parameter {key!r} must be {kinds}, got {type(value).__name__}")


def fill_parameters(target: Any, params: Any, where: str) -> None:
    """A JSON ``parameters`` object into a v2 parameter map, less the transport-only keys."""
    for key, value in _object(params, f"{where}: parameters").items():
        if key not in _TRANSPORT_ONLY:
            set_parameter(target[key], key, value, where)


def parameter_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def parameters_json(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {k: parameter_value(v) for k, v in params.items()}


# -- tensors ----------------------------------------------------------------------------------


def _leaves(data: Any) -> Iterator[Any]:
    for item in data:
        if isinstance(item, list):
            yield from _leaves(item)
        else:
            yield item


_NUMBER = (int, float)


def array_from_json(name: str, datatype: str, shape: Sequence[int], data: Any) -> np.ndarray:
    """A JSON ``data`` array (flat or nested, row-major) as a numpy array of ``datatype``."""
    what = f"input {name!r}"
    if not isinstance(data, list):
        raise InvalidArgument(f"{what}: 'data' must be a JSON array")
    flat = list(_leaves(data)) if any(isinstance(x, list) for x in data) else data
    count = element_count(shape)
    if len(flat) != count:
        raise InvalidArgument(
            f"{what}: 'data' has {len(flat)} elements but shape {list(shape)} needs {count}"
        )
    if datatype not in BY_NAME:
        numpy_dtype(datatype)  # raises "unsupported datatype", naming the ones there are
    if datatype == "BYTES":
        for v in flat:
            if not isinstance(v, str):
                raise InvalidArgument(f"{what}: BYTES data must be strings, got {type(v).__name__}")
        out = np.empty(count, dtype=np.object_)
        out[:] = [_utf8(v, what) for v in flat]
        return out.reshape(shape)
    if BY_NAME[datatype].numpy is None or datatype in ("FP16", "BF16"):
        raise InvalidArgument(f"{what}: {datatype} data cannot travel as JSON; send it as binary data")
    dtype = numpy_dtype(datatype)
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise InvalidArgument(f"{what}: BOOL data must be true or false")
    elif dtype.kind == "f":
        if not all(type(v) in _NUMBER for v in flat):
            bad = next(v for v in flat if type(v) not in _NUMBER)
            raise InvalidArgument(f"{what}: {datatype} data must be numbers, got {type(bad).__name__}")
    elif not all(type(v) is int for v in flat):
        bad = next(v for v in flat if type(v) is not int)
        raise InvalidArgument(f"{what}: {datatype} data must be integers, got {json.dumps(bad)}")
    try:
        return np.array(flat, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InvalidArgument(f"{what}: a value is out of the {datatype} range") from None


def _json_data(name: str, array: np.ndarray) -> list[Any] | None:
    """An output's elements as JSON values, or None when they cannot be (non-UTF-8 bytes)."""
    flat = array.reshape(-1)
    if array.dtype == np.object_:
        try:
            return [bytes(v).decode() if not isinstance(v, str) else v for v in flat]
        except UnicodeDecodeError:
            return None
    values = flat.tolist()
    if array.dtype.kind == "f" and not all(math.isfinite(v) for v in values):
        return None  # JSON has no NaN or infinity
    return values


# -- infer ------------------------------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tail of a body (all JSON without the header)."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit():
        raise InvalidArgument(f"{HEADER_LENGTH} must be a non-negative integer, got {header_length!r}")
    n = int(header_length)
    if n < 0 or n > len(body):
        raise InvalidArgument(f"{HEADER_LENGTH} {n} lies past the end of the {len(body)}-byte body")
    return body[:n], body[n:]


def infer_request(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[pb.ModelInferRequest, OutputForm]:
    """A v2 REST infer body as the ModelInferRequest the gRPC path takes, and the output form."""
    head, tail = split_body(body, header_length)
    doc = _object(parse_json(head), "the infer request")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in doc:
        if not isinstance(doc["id"], str):
            raise InvalidArgument("'id' must be a string")
        _utf8(doc["id"], "'id'")
        request.id = doc["id"]
    params = doc.get("parameters", {})
    fill_parameters(request.parameters, params, "request")
    form = OutputForm(binary_default=_flag(_object(params, "request: parameters"), BINARY_OUTPUT, "request"))
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("the infer request needs a non-empty 'inputs' array")
    offset = 0
    for entry in inputs:
        offset = _add_input(request, _object(entry, "each input"), tail, offset)
    if offset != len(tail):
        raise InvalidArgument(
            f"the body has {len(tail) - offset} bytes of binary data after the last binary input"
        )
    shm: set[str] = set()
    for entry in doc.get("outputs", []) or []:
        out = _object(entry, "each requested output")
        name = out.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("each requested output needs a 'name'")
        tensor = request.outputs.add(name=name)
        out_params = _object(out.get("parameters", {}), f"output {name!r}: parameters")
        fill_parameters(tensor.parameters, out_params, f"output {name!r}")
        if BINARY in out_params:
            form.binary[name] = _flag(out_params, BINARY, f"output {name!r}")
        if SHM_REGION in out_params:
            shm.add(name)
    form.shm = frozenset(shm)
    return request, form


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}: parameter {key!r} must be true or false")
    return value


def _add_input(request: pb.ModelInferRequest, entry: dict[str, Any], tail: bytes, offset: int) -> int:
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("each input needs a 'name'")
    what = f"input {name!r}"
    if not isinstance(datatype, str):
        raise InvalidArgument(f"{what} needs a 'datatype'")
    if not isinstance(shape, list) or not all(type(d) is int and d < 2**63 for d in shape):
        raise InvalidArgument(f"{what} needs a 'shape' of integers")
    _utf8(name, "an input name")
    check_shape(name, shape)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    params = _object(entry.get("parameters", {}), f"{what}: parameters")
    fill_parameters(tensor.parameters, params, what)
    if SHM_REGION in params:
        return offset  # read from the region by the data plane
    if BINARY_SIZE in params:
        size = params[BINARY_SIZE]
        if type(size) is not int or size < 0:
            raise InvalidArgument(f"{what}: {BINARY_SIZE} must be a non-negative integer")
        if offset + size > len(tail):
            raise InvalidArgument(
                f"{what}: {BINARY_SIZE} {size} runs past the end of the binary data "
                f"({len(tail) - offset} bytes left)"
            )
        raw = tail[offset : offset + size]
        array_from_raw(name, datatype, shape, raw)  # the size checked against shape x datatype
        request.raw_input_contents.append(raw)
        return offset + size
    if "data" not in entry:
        raise InvalidArgument(f"{what} has neither 'data' nor a {BINARY_SIZE} parameter")
    request.raw_input_contents.append(raw_bytes(array_from_json(name, datatype, shape, entry["data"])))
    return offset


def infer_response(response: pb.ModelInferResponse, form: OutputForm) -> tuple[bytes, int | None]:
    """The JSON (and binary) body of an answer; the header length when any output is binary."""
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = parameters_json(response.parameters)
    outputs: list[dict[str, Any]] = []
    binary: list[bytes] = []
    raw = response.raw_output_contents
    for i, tensor in enumerate(response.outputs):
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = parameters_json(tensor.parameters)
        if tensor.name not in form.shm:
            data = raw[i] if raw else b""
            values = None
            if not form.is_binary(tensor.name) and BY_NAME[tensor.datatype].numpy is not None:
                values = _json_data(
                    tensor.name, array_from_raw(tensor.name, tensor.datatype, tensor.shape, data)
                )
            if values is None:  # asked for binary, or not representable in JSON
                params[BINARY_SIZE] = len(data)
                binary.append(data)
            else:
                out["data"] = values
        if params:
            out["parameters"] = params
        outputs.append(out)
    doc["outputs"] = outputs
    head = dumps(doc)
    if not binary:
        return head, None
    return head + b"".join(binary), len(head)


# -- the other messages -----------------------------------------------------------------------

_INTS = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_FIXED32,
}


def message_json(message: Message) -> dict[str, Any]:
    """A v2 message as the REST protocol's JSON: proto field names, every scalar and list
    (zeros included, as Triton writes them; clients read ``max_batch_size: 0``), nested
    messages when set, 64-bit integers as numbers (protobuf's own JSON writes strings, which
    Triton's clients do not expect), enums by name."""
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
        singular_message = fd.type == FieldDescriptor.TYPE_MESSAGE and not is_map and not _repeated(fd)
        if singular_message and not message.HasField(fd.name):
            continue
        if fd.containing_oneof is not None and not message.HasField(fd.name):
            continue
        out[fd.name] = _field_json(fd, value)
    return out


def _repeated(fd: Any) -> bool:
    return bool(fd.is_repeated)


def _field_json(fd: Any, value: Any) -> Any:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        value_fd = fd.message_type.fields_by_name["value"]
        return {k: _scalar_json(value_fd, v) for k, v in value.items()}
    if _repeated(fd):
        return [_scalar_json(fd, v) for v in value]
    return _scalar_json(fd, value)


def _scalar_json(fd: Any, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        if fd.message_type.full_name == "inference.InferParameter":
            return parameter_value(value)
        return message_json(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name if value in fd.enum_type.values_by_number else value
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return value.decode(errors="replace")
    if fd.type in _INTS:
        return int(value)
    return value
