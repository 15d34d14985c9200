from __future__ import annotations

import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core import codec
from ferry.core.errors import InvalidArgument

NUMERIC = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    rng = np.random.default_rng(0)
    if datatype == "BYTES":
        return np.array([f"s{i}".encode() * (i % 3) for i in range(6)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return rng.random(shape) > 0.5
    dt = codec.DATATYPES[datatype]
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)


@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_raw_round_trip_every_datatype(datatype: str) -> None:
    array = sample(datatype)
    request = pb.ModelInferRequest()
    codec.add_input(request, "x", array)
    assert request.inputs[0].datatype == datatype
    decoded = codec.decode_inputs(request)["x"]
    assert decoded.shape == array.shape
    assert decoded.tolist() == array.tolist()


@pytest.mark.parametrize("datatype", [d for d in [*NUMERIC, "BYTES"] if d != "FP16"])
def test_typed_round_trip_every_datatype(datatype: str) -> None:
    array = sample(datatype)
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=list(array.shape))
    codec.set_typed_contents(tensor.contents, array)
    decoded = codec.decode_inputs(request)["x"]
    assert decoded.dtype == codec.DATATYPES[datatype]
    assert decoded.tolist() == array.tolist()


def test_fp16_has_no_typed_field() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP16", shape=[1])
    with pytest.raises(InvalidArgument, match="FP16 has no typed contents field"):
        codec.decode_inputs(request)


def test_output_round_trip() -> None:
    response = pb.ModelInferResponse()
    codec.add_output(response, "y", np.arange(6, dtype=np.float32).reshape(2, 3))
    out = codec.decode_outputs(response)["y"]
    assert out.dtype == np.float32 and out.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_raw_byte_size_must_match_shape() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    request.raw_input_contents.append(b"\0" * 20)
    with pytest.raises(InvalidArgument, match=r"raw content is 20 bytes but shape \[2, 3\] of FP32 needs 24"):
        codec.decode_inputs(request)


def test_mixing_raw_and_typed_is_rejected() -> None:
    request = pb.ModelInferRequest()
    codec.add_input(request, "a", np.zeros(2, np.float32))
    typed = request.inputs.add(name="b", datatype="FP32", shape=[2])
    typed.contents.fp32_contents.extend([1, 2])
    with pytest.raises(InvalidArgument, match="cannot be mixed"):
        codec.decode_inputs(request)


def test_typed_count_must_match_shape() -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype="INT32", shape=[3])
    tensor.contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidArgument, match="int_contents holds 2 values but shape"):
        codec.decode_inputs(request)


def test_truncated_bytes_tensor() -> None:
    with pytest.raises(InvalidArgument, match="runs past the end"):
        codec.array_from_raw("s", "BYTES", [1], b"\x05\x00\x00\x00ab")


def test_unknown_datatype() -> None:
    with pytest.raises(InvalidArgument, match="unsupported datatype 'FP8'"):
        codec.array_from_raw("x", "FP8", [1], b"\0")


def test_big_endian_arrays_are_sent_little_endian() -> None:
    array = np.arange(3, dtype=">i4")
    assert codec.raw_bytes(array) == np.arange(3, dtype="<i4").tobytes()


def test_bytes_become_utf8_strings_by_element() -> None:
    array = np.array([["héllo".encode(), b""], ["日本".encode(), "already text"]], dtype=object)
    out = codec.utf8_strings("text", array)
    assert out.shape == (2, 2) and out.tolist() == [["héllo", ""], ["日本", "already text"]]
    with pytest.raises(
        InvalidArgument, match=r"input 'text': element 2 is not valid UTF-8 \(invalid start byte at byte 0\)"
    ):
        codec.utf8_strings("text", np.array([b"a", b"b", b"\xff"], dtype=object))
