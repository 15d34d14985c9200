"""The KServe v2 REST codec (``ferry.core.rest``) by values, without a server: JSON and binary
infer bodies into ModelInferRequest, ModelInferResponse back into JSON (and binary) bodies,
the other v2 messages as REST JSON, and every bad body an ``InvalidArgument`` naming the problem."""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import model_config_pb2 as mc
from ferry.core import codec, rest
from ferry.core.errors import InvalidArgument

# -- helpers ----------------------------------------------------------------------------------


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _infer(doc: Any, model: str = "m", version: str = "") -> tuple[pb.ModelInferRequest, rest.OutputForm]:
    return rest.infer_request(_json(doc), None, model, version)


def _binary(doc: Any, *tails: bytes) -> tuple[bytes, str]:
    """A binary-extension body: the JSON header, then the raw tensors; and its header length."""
    head = _json(doc)
    return head + b"".join(tails), str(len(head))


def _fp32(name: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": shape, "data": data}


def _bin_input(name: str, datatype: str, shape: list[int], size: int, **params: Any) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": size, **params},
    }


def _length_prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _strict_json(data: bytes) -> Any:
    """JSON as RFC 8259 has it: NaN and Infinity are not JSON."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(data, parse_constant=refuse)


def _response(*outputs: tuple[str, np.ndarray], **fields: Any) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="m", model_version="1", **fields)
    for name, array in outputs:
        codec.add_output(response, name, array)
    return response


def _split_response(body: bytes, header_length: int | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        return _strict_json(body), b""
    return _strict_json(body[:header_length]), body[header_length:]


def _outputs_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {out["name"]: out for out in doc["outputs"]}


# -- JSON inputs ------------------------------------------------------------------------------


def test_json_fp32_flat_input_carries_tensor_and_request_fields() -> None:
    doc = {"id": "req-7", "inputs": [_fp32("x", [2, 2], [1.0, -2.5, 3, 0.125])]}
    request, form = _infer(doc, model="resnet", version="3")
    assert request.model_name == "resnet"
    assert request.model_version == "3"
    assert request.id == "req-7"
    [tensor] = request.inputs
    assert tensor.name == "x"
    assert tensor.datatype == "FP32"
    assert list(tensor.shape) == [2, 2]
    assert list(request.raw_input_contents) == [np.array([1.0, -2.5, 3, 0.125], dtype="<f4").tobytes()]
    assert not tensor.HasField("contents")
    assert not request.parameters
    assert not request.outputs
    assert form == rest.OutputForm()
    assert not form.is_binary("anything")


def test_json_fp32_nested_data_is_read_row_major() -> None:
    request, _ = _infer({"inputs": [_fp32("x", [2, 3], [[1, 2, 3], [4, 5, 6]])]})
    expected = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    assert request.raw_input_contents[0] == expected.tobytes()
    assert codec.decode_inputs(request)["x"].tolist() == expected.tolist()


def test_json_deeply_nested_data_matches_flat() -> None:
    flat, _ = _infer({"inputs": [_fp32("x", [2, 2, 2], list(range(8)))]})
    nested, _ = _infer({"inputs": [_fp32("x", [2, 2, 2], [[[0, 1], [2, 3]], [[4, 5], [6, 7]]])]})
    assert flat.raw_input_contents[0] == nested.raw_input_contents[0]
    assert flat.raw_input_contents[0] == np.arange(8, dtype="<f4").tobytes()


def test_no_id_leaves_the_request_id_empty() -> None:
    request, _ = _infer({"inputs": [_fp32("x", [1], [1])]})
    assert request.id == ""


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("INT64", [0, -1, 2**63 - 1, -(2**63)]),
        ("INT32", [7, -7, 2**31 - 1, -(2**31)]),
        ("INT8", [127, -128, 0, 1]),
        ("UINT8", [0, 255, 1, 2]),
        ("UINT64", [0, 2**64 - 1, 1, 2]),
        ("FP64", [0.1, -1e300, 5, 2.5]),
        ("BOOL", [True, False, False, True]),
    ],
)
def test_json_typed_inputs_become_little_endian_raw(datatype: str, values: list[Any]) -> None:
    request, _ = _infer({"inputs": [{"name": "t", "datatype": datatype, "shape": [4], "data": values}]})
    expected = np.array(values, dtype=codec.DATATYPES[datatype])
    assert request.inputs[0].datatype == datatype
    assert request.raw_input_contents[0] == expected.tobytes()
    assert codec.decode_inputs(request)["t"].tolist() == values


def test_json_bool_input_is_one_byte_per_element() -> None:
    request, _ = _infer(
        {"inputs": [{"name": "b", "datatype": "BOOL", "shape": [3], "data": [True, False, True]}]}
    )
    assert request.raw_input_contents[0] == b"\x01\x00\x01"


def test_json_bytes_input_is_length_prefixed_utf8() -> None:
    doc = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [3], "data": ["abc", "", "héllo"]}]}
    request, _ = _infer(doc)
    assert request.raw_input_contents[0] == _length_prefixed(b"abc", b"", "héllo".encode())
    assert request.raw_input_contents[0][:4] == b"\x03\x00\x00\x00"
    assert codec.decode_inputs(request)["s"].tolist() == [b"abc", b"", "héllo".encode()]


def test_json_bytes_nested_input() -> None:
    doc = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2, 1], "data": [["a"], ["bc"]]}]}
    request, _ = _infer(doc)
    assert request.raw_input_contents[0] == _length_prefixed(b"a", b"bc")


def test_json_empty_tensor() -> None:
    request, _ = _infer({"inputs": [_fp32("x", [0, 3], [])]})
    assert list(request.inputs[0].shape) == [0, 3]
    assert request.raw_input_contents[0] == b""


def test_several_json_inputs_keep_their_order() -> None:
    doc = {
        "inputs": [
            _fp32("a", [1], [1]),
            {"name": "b", "datatype": "INT32", "shape": [2], "data": [2, 3]},
            {"name": "c", "datatype": "BYTES", "shape": [1], "data": ["z"]},
        ]
    }
    request, _ = _infer(doc)
    assert [t.name for t in request.inputs] == ["a", "b", "c"]
    assert list(request.raw_input_contents) == [
        np.float32(1).tobytes(),
        np.array([2, 3], dtype="<i4").tobytes(),
        _length_prefixed(b"z"),
    ]


# -- parameters -------------------------------------------------------------------------------


def test_request_parameters_land_in_their_oneof_and_binary_data_output_is_not_forwarded() -> None:
    doc = {
        "parameters": {
            "flag": True,
            "priority": 3,
            "timeout": 2.5,
            "tag": "blue",
            "binary_data_output": True,
        },
        "inputs": [_fp32("x", [1], [1])],
    }
    request, form = _infer(doc)
    params = request.parameters
    assert set(params) == {"flag", "priority", "timeout", "tag"}
    assert params["flag"].WhichOneof("parameter_choice") == "bool_param"
    assert params["flag"].bool_param is True
    assert params["priority"].WhichOneof("parameter_choice") == "int64_param"
    assert params["priority"].int64_param == 3
    assert params["timeout"].WhichOneof("parameter_choice") == "double_param"
    assert params["timeout"].double_param == 2.5
    assert params["tag"].WhichOneof("parameter_choice") == "string_param"
    assert params["tag"].string_param == "blue"
    assert form.binary_default is True
    assert form.is_binary("any output")


def test_binary_data_output_false_keeps_json_default() -> None:
    _, form = _infer({"parameters": {"binary_data_output": False}, "inputs": [_fp32("x", [1], [1])]})
    assert form.binary_default is False


def test_input_parameters_are_forwarded_less_binary_data_size() -> None:
    body, length = _binary(
        {"inputs": [_bin_input("x", "FP32", [1], 4, note="hi", level=2)]}, np.float32(1).tobytes()
    )
    request, _ = rest.infer_request(body, length, "m", "")
    params = request.inputs[0].parameters
    assert set(params) == {"note", "level"}
    assert params["note"].string_param == "hi"
    assert params["level"].int64_param == 2


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (True, "bool_param", True),
        (False, "bool_param", False),
        (0, "int64_param", 0),
        (-(2**63), "int64_param", -(2**63)),
        (2**63 - 1, "int64_param", 2**63 - 1),
        (1.5, "double_param", 1.5),
        (1.0, "double_param", 1.0),
        ("", "string_param", ""),
        ("text", "string_param", "text"),
    ],
)
def test_set_parameter_picks_the_oneof(value: Any, kind: str, expected: Any) -> None:
    target = pb.InferParameter()
    rest.set_parameter(target, "k", value, "request")
    assert target.WhichOneof("parameter_choice") == kind
    assert getattr(target, kind) == expected
    assert rest.parameter_value(target) == expected


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1])
def test_set_parameter_refuses_ints_outside_int64(value: int) -> None:
    with pytest.raises(InvalidArgument, match=re.escape("where: parameter 'k' is out of the int64 range")):
        rest.set_parameter(pb.InferParameter(), "k", value, "where")


@pytest.mark.parametrize(("value", "kind"), [([1], "list"), ({"a": 1}, "dict"), (None, "NoneType")])
def test_set_parameter_refuses_other_json_values(value: Any, kind: str) -> None:
    message = f"where: parameter 'k' must be a boolean, number or string, got {kind}"
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        rest.set_parameter(pb.InferParameter(), "k", value, "where")


def test_parameter_value_of_an_unset_parameter_is_none() -> None:
    assert rest.parameter_value(pb.InferParameter()) is None


# -- binary inputs ----------------------------------------------------------------------------


def test_one_binary_input() -> None:
    array = np.array([[1.5, -2.0, 3.25]], dtype=np.float32)
    body, length = _binary({"inputs": [_bin_input("x", "FP32", [1, 3], 12)]}, array.tobytes())
    request, _ = rest.infer_request(body, length, "m", "1")
    assert request.inputs[0].name == "x"
    assert list(request.inputs[0].shape) == [1, 3]
    assert list(request.raw_input_contents) == [array.tobytes()]
    assert not request.inputs[0].parameters


def test_two_binary_inputs_back_to_back() -> None:
    a = np.array([1, 2, 3], dtype="<i8")
    b = np.array([[0.5, 0.25]], dtype="<f8")
    doc = {"inputs": [_bin_input("a", "INT64", [3], 24), _bin_input("b", "FP64", [1, 2], 16)]}
    body, length = _binary(doc, a.tobytes(), b.tobytes())
    request, _ = rest.infer_request(body, length, "m", "")
    assert list(request.raw_input_contents) == [a.tobytes(), b.tobytes()]


def test_mixed_json_and_binary_inputs_keep_tensor_order() -> None:
    b = np.array([7, 8], dtype="<i4")
    d = _length_prefixed(b"x\x00y", b"")
    doc = {
        "inputs": [
            _fp32("a", [1], [9]),
            _bin_input("b", "INT32", [2], 8),
            {"name": "c", "datatype": "BOOL", "shape": [1], "data": [True]},
            _bin_input("d", "BYTES", [2], len(d)),
        ]
    }
    body, length = _binary(doc, b.tobytes(), d)
    request, _ = rest.infer_request(body, length, "m", "")
    assert [t.name for t in request.inputs] == ["a", "b", "c", "d"]
    assert list(request.raw_input_contents) == [np.float32(9).tobytes(), b.tobytes(), b"\x01", d]


def test_binary_data_size_wins_over_data() -> None:
    entry = {**_bin_input("x", "FP32", [1], 4), "data": [123.0]}
    body, length = _binary({"inputs": [entry]}, np.float32(5).tobytes())
    request, _ = rest.infer_request(body, length, "m", "")
    assert request.raw_input_contents[0] == np.float32(5).tobytes()


def test_zero_byte_binary_input() -> None:
    body, length = _binary({"inputs": [_bin_input("x", "FP32", [0], 0)]})
    request, _ = rest.infer_request(body, length, "m", "")
    assert list(request.raw_input_contents) == [b""]


def test_header_length_equal_to_the_body_means_no_tail() -> None:
    body = _json({"inputs": [_fp32("x", [1], [2])]})
    request, _ = rest.infer_request(body, str(len(body)), "m", "")
    assert request.raw_input_contents[0] == np.float32(2).tobytes()


def test_split_body() -> None:
    assert rest.split_body(b"{}tail", None) == (b"{}tail", b"")
    assert rest.split_body(b"{}tail", "2") == (b"{}", b"tail")
    assert rest.split_body(b"{}", "2") == (b"{}", b"")
    assert rest.split_body(b"{}", "0") == (b"", b"{}")


def test_shared_memory_input_takes_no_raw_entry_and_keeps_its_parameters() -> None:
    doc = {
        "inputs": [
            {
                "name": "s",
                "datatype": "FP32",
                "shape": [4],
                "parameters": {"shared_memory_region": "r0", "shared_memory_byte_size": 16},
            },
            _fp32("j", [1], [3]),
        ]
    }
    request, _ = _infer(doc)
    assert [t.name for t in request.inputs] == ["s", "j"]
    assert list(request.raw_input_contents) == [np.float32(3).tobytes()]
    params = request.inputs[0].parameters
    assert params["shared_memory_region"].string_param == "r0"
    assert params["shared_memory_byte_size"].int64_param == 16


# -- requested outputs ------------------------------------------------------------------------


def test_requested_outputs_binary_classification_and_shared_memory() -> None:
    doc = {
        "inputs": [_fp32("x", [1], [1])],
        "outputs": [
            {"name": "probs", "parameters": {"binary_data": True}},
            {"name": "top", "parameters": {"classification": 3, "binary_data": False}},
            {"name": "plain"},
            {"name": "in_shm", "parameters": {"shared_memory_region": "out0", "shared_memory_byte_size": 64}},
        ],
    }
    request, form = _infer(doc)
    assert [o.name for o in request.outputs] == ["probs", "top", "plain", "in_shm"]
    by_name = {o.name: o for o in request.outputs}
    assert not by_name["probs"].parameters  # binary_data says how it travels, nothing more
    assert set(by_name["top"].parameters) == {"classification"}
    assert by_name["top"].parameters["classification"].WhichOneof("parameter_choice") == "int64_param"
    assert by_name["top"].parameters["classification"].int64_param == 3
    assert not by_name["plain"].parameters
    assert by_name["in_shm"].parameters["shared_memory_region"].string_param == "out0"
    assert by_name["in_shm"].parameters["shared_memory_byte_size"].int64_param == 64
    assert form.binary == {"probs": True, "top": False}
    assert form.shm == frozenset({"in_shm"})
    assert form.binary_default is False
    assert form.is_binary("probs")
    assert not form.is_binary("top")
    assert not form.is_binary("plain")


def test_binary_data_false_overrides_binary_data_output() -> None:
    doc = {
        "parameters": {"binary_data_output": True},
        "inputs": [_fp32("x", [1], [1])],
        "outputs": [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}],
    }
    _, form = _infer(doc)
    assert not form.is_binary("a")
    assert form.is_binary("b")


def test_outputs_null_means_none_requested() -> None:
    request, form = _infer({"inputs": [_fp32("x", [1], [1])], "outputs": None})
    assert not request.outputs
    assert form.shm == frozenset()


# -- infer_response ---------------------------------------------------------------------------


def test_response_as_json() -> None:
    probs = np.array([[0.5, 0.25, -1.0]], dtype=np.float32)
    labels = np.array([b"cat", "héllo".encode(), b""], dtype=object)
    response = _response(("probs", probs), ("labels", labels), id="req-1")
    response.parameters["sequence_end"].bool_param = True
    response.parameters["note"].string_param = "ok"
    body, header_length = rest.infer_response(response, rest.OutputForm())
    assert header_length is None
    doc = _strict_json(body)
    assert doc["model_name"] == "m"
    assert doc["model_version"] == "1"
    assert doc["id"] == "req-1"
    assert doc["parameters"] == {"sequence_end": True, "note": "ok"}
    outs = _outputs_by_name(doc)
    assert [o["name"] for o in doc["outputs"]] == ["probs", "labels"]
    assert outs["probs"] == {"name": "probs", "datatype": "FP32", "shape": [1, 3], "data": [0.5, 0.25, -1.0]}
    assert outs["labels"] == {
        "name": "labels",
        "datatype": "BYTES",
        "shape": [3],
        "data": ["cat", "héllo", ""],
    }


def test_response_json_values_of_other_datatypes() -> None:
    response = _response(
        ("i", np.array([[1, -2], [3, 2**62]], dtype="<i8")),
        ("b", np.array([True, False])),
        ("u", np.array([255, 0], dtype=np.uint8)),
        ("d", np.array([0.1], dtype=np.float64)),
    )
    doc, tail = _split_response(*rest.infer_response(response, rest.OutputForm()))
    outs = _outputs_by_name(doc)
    assert tail == b""
    assert outs["i"]["data"] == [1, -2, 3, 2**62]  # flat, row-major
    assert outs["i"]["shape"] == [2, 2]
    assert outs["b"]["data"] == [True, False]
    assert outs["b"]["datatype"] == "BOOL"
    assert outs["u"]["data"] == [255, 0]
    assert outs["d"]["data"] == [0.1]


def test_response_without_id_or_parameters_leaves_them_out() -> None:
    doc, _ = _split_response(
        *rest.infer_response(_response(("o", np.zeros(1, np.float32))), rest.OutputForm())
    )
    assert "id" not in doc
    assert "parameters" not in doc
    assert "parameters" not in doc["outputs"][0]


def test_response_as_binary() -> None:
    probs = np.array([[0.5, 0.25, -1.0]], dtype=np.float32)
    labels = np.array([b"cat", b"\xff\x00"], dtype=object)
    response = _response(("probs", probs), ("labels", labels))
    body, header_length = rest.infer_response(response, rest.OutputForm(binary_default=True))
    assert header_length is not None
    doc, tail = _split_response(body, header_length)
    outs = _outputs_by_name(doc)
    labels_raw = _length_prefixed(b"cat", b"\xff\x00")
    assert outs["probs"] == {
        "name": "probs",
        "datatype": "FP32",
        "shape": [1, 3],
        "parameters": {"binary_data_size": 12},
    }
    assert outs["labels"]["parameters"] == {"binary_data_size": len(labels_raw)}
    assert "data" not in outs["labels"]
    assert tail == probs.tobytes() + labels_raw
    assert codec.array_from_raw("probs", "FP32", [1, 3], tail[:12]).tolist() == probs.tolist()


def test_response_binary_per_output() -> None:
    a = np.array([1.0, 2.0], dtype=np.float32)
    b = np.array([3.0], dtype=np.float32)
    body, header_length = rest.infer_response(
        _response(("a", a), ("b", b)), rest.OutputForm(binary={"b": True})
    )
    doc, tail = _split_response(body, header_length)
    outs = _outputs_by_name(doc)
    assert outs["a"]["data"] == [1.0, 2.0]
    assert "parameters" not in outs["a"]
    assert outs["b"]["parameters"] == {"binary_data_size": 4}
    assert tail == b.tobytes()
    assert header_length == len(body) - 4


def test_bytes_output_with_invalid_utf8_falls_back_to_binary() -> None:
    good = np.array([b"fine"], dtype=object)
    bad = np.array([b"ok", b"\xc3\x28"], dtype=object)
    body, header_length = rest.infer_response(_response(("good", good), ("bad", bad)), rest.OutputForm())
    assert header_length is not None
    doc, tail = _split_response(body, header_length)
    outs = _outputs_by_name(doc)
    assert outs["good"]["data"] == ["fine"]
    assert "data" not in outs["bad"]
    raw = _length_prefixed(b"ok", b"\xc3\x28")
    assert outs["bad"]["parameters"] == {"binary_data_size": len(raw)}
    assert tail == raw


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
def test_fp32_output_that_json_cannot_hold_falls_back_to_binary(special: float) -> None:
    array = np.array([1.0, special, 3.0], dtype=np.float32)
    body, header_length = rest.infer_response(_response(("o", array)), rest.OutputForm())
    assert header_length is not None
    doc, tail = _split_response(body, header_length)  # the header is strict JSON: no NaN in it
    assert "data" not in doc["outputs"][0]
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert tail == array.tobytes()


def test_shared_memory_output_carries_no_data() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="s", datatype="FP32", shape=[2])
    response.raw_output_contents.append(b"")  # as the data plane leaves a shared-memory output
    codec.add_output(response, "j", np.array([4.0], dtype=np.float32))
    form = rest.OutputForm(binary_default=True, shm=frozenset({"s"}))
    body, header_length = rest.infer_response(response, form)
    doc, tail = _split_response(body, header_length)
    outs = _outputs_by_name(doc)
    assert outs["s"] == {"name": "s", "datatype": "FP32", "shape": [2]}
    assert outs["j"]["parameters"] == {"binary_data_size": 4}
    assert tail == np.float32(4).tobytes()


def test_every_output_in_shared_memory() -> None:
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="s", datatype="INT64", shape=[3])
    body, header_length = rest.infer_response(response, rest.OutputForm(shm=frozenset({"s"})))
    assert header_length is None
    assert _strict_json(body)["outputs"] == [{"name": "s", "datatype": "INT64", "shape": [3]}]


def test_output_parameters_are_carried() -> None:
    response = _response(("o", np.array([1.0], dtype=np.float32)))
    response.outputs[0].parameters["label"].string_param = "x"
    doc, _ = _split_response(*rest.infer_response(response, rest.OutputForm(binary_default=True)))
    assert doc["outputs"][0]["parameters"] == {"label": "x", "binary_data_size": 4}


# -- round trips ------------------------------------------------------------------------------


def test_binary_request_round_trips_through_decode_inputs() -> None:
    arrays: dict[str, np.ndarray] = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "i": np.array([[-(2**63), 2**63 - 1]], dtype=np.int64),
        "h": np.array([0.5, -1.5], dtype=np.float16),
        "b": np.array([True, False, True]),
        "s": np.array([b"\x00\xff", b"text", b""], dtype=object),
    }
    raws = [codec.raw_bytes(a) for a in arrays.values()]
    doc = {
        "inputs": [
            _bin_input(name, codec.datatype_of(a), list(a.shape), len(raw))
            for (name, a), raw in zip(arrays.items(), raws, strict=True)
        ]
    }
    body, length = _binary(doc, *raws)
    request, _ = rest.infer_request(body, length, "m", "")
    decoded = codec.decode_inputs(request)
    assert list(decoded) == list(arrays)
    for name, array in arrays.items():
        assert decoded[name].dtype == array.dtype
        assert decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], array)


def test_json_request_round_trips_through_decode_inputs() -> None:
    doc = {
        "inputs": [
            _fp32("f", [2, 2], [[0.5, 1.5], [2.5, 3.5]]),
            {"name": "u", "datatype": "UINT16", "shape": [3], "data": [0, 1, 65535]},
            {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["a", "ü"]},
        ]
    }
    decoded = codec.decode_inputs(_infer(doc)[0])
    np.testing.assert_array_equal(decoded["f"], np.array([[0.5, 1.5], [2.5, 3.5]], dtype=np.float32))
    np.testing.assert_array_equal(decoded["u"], np.array([0, 1, 65535], dtype=np.uint16))
    assert decoded["s"].tolist() == [b"a", "ü".encode()]


def test_binary_response_tail_decodes_to_the_outputs() -> None:
    a = np.arange(4, dtype=np.int32).reshape(2, 2)
    s = np.array([b"x", b"yz"], dtype=object)
    body, header_length = rest.infer_response(
        _response(("a", a), ("s", s)), rest.OutputForm(binary_default=True)
    )
    doc, tail = _split_response(body, header_length)
    offset = 0
    decoded = {}
    for out in doc["outputs"]:
        size = out["parameters"]["binary_data_size"]
        decoded[out["name"]] = codec.array_from_raw(
            out["name"], out["datatype"], out["shape"], tail[offset : offset + size]
        )
        offset += size
    assert offset == len(tail)
    np.testing.assert_array_equal(decoded["a"], a)
    assert decoded["s"].tolist() == [b"x", b"yz"]


# -- array_from_json and parse_json -----------------------------------------------------------


def test_array_from_json_shapes_and_dtypes() -> None:
    out = rest.array_from_json("x", "INT16", [3, 1], [[1], [2], [3]])
    assert out.dtype == np.dtype("<i2")
    assert out.shape == (3, 1)
    assert out.tolist() == [[1], [2], [3]]
    strings = rest.array_from_json("s", "BYTES", [1, 2], ["a", "b"])
    assert strings.dtype == np.object_
    assert strings.tolist() == [[b"a", b"b"]]
    floats = rest.array_from_json("f", "FP32", [2], [1, 2.5])
    assert floats.dtype == np.float32
    assert floats.tolist() == [1.0, 2.5]


def test_parse_json() -> None:
    assert rest.parse_json(b'{"a": [1, 2]}') == {"a": [1, 2]}
    assert rest.parse_json("[true]") == [True]
    with pytest.raises(InvalidArgument, match="malformed JSON in the load body"):
        rest.parse_json(b"{", "load body")
    with pytest.raises(InvalidArgument, match="malformed JSON in the request body"):
        rest.parse_json(b"\xff\xfe")


def test_dumps_is_compact_and_refuses_nan() -> None:
    assert rest.dumps({"a": [1, "b"]}) == b'{"a":[1,"b"]}'
    with pytest.raises(ValueError):
        rest.dumps({"a": float("nan")})


# -- message_json -----------------------------------------------------------------------------


def test_message_json_server_metadata() -> None:
    msg = pb.ServerMetadataResponse(
        name="ferry", version="1.2", extensions=["binary_tensor_data", "statistics"]
    )
    assert rest.message_json(msg) == {
        "name": "ferry",
        "version": "1.2",
        "extensions": ["binary_tensor_data", "statistics"],
    }
    assert rest.message_json(pb.ServerMetadataResponse()) == {"name": "", "version": "", "extensions": []}


def test_message_json_model_metadata() -> None:
    msg = pb.ModelMetadataResponse(name="m", versions=["1", "2"], platform="onnxruntime_onnx")
    msg.inputs.add(name="x", datatype="FP32", shape=[-1, 3, 224, 224])
    msg.outputs.add(name="y", datatype="INT64", shape=[-1])
    out = rest.message_json(msg)
    assert out == {
        "name": "m",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}],
    }
    assert json.loads(rest.dumps(out)) == out


def test_message_json_statistics_writes_uint64_as_numbers() -> None:
    msg = pb.ModelStatisticsResponse()
    stats = msg.model_stats.add(
        name="m", version="1", last_inference=1_700_000_000_000, inference_count=2**64 - 1, execution_count=7
    )
    stats.inference_stats.success.count = 5
    stats.inference_stats.success.ns = 123_456_789_012
    stats.batch_stats.add(batch_size=4).compute_infer.count = 2
    text = rest.dumps(rest.message_json(msg))
    assert b'"inference_count":18446744073709551615' in text
    assert b'"execution_count":7' in text
    assert b'"count":"' not in text
    doc = json.loads(text)
    [model] = doc["model_stats"]
    assert model["last_inference"] == 1_700_000_000_000
    assert model["inference_count"] == 2**64 - 1
    assert type(model["inference_stats"]["success"]["count"]) is int
    assert model["inference_stats"]["success"] == {"count": 5, "ns": 123_456_789_012}
    assert "fail" not in model["inference_stats"]  # an unset message is left out
    assert model["batch_stats"][0]["batch_size"] == 4
    assert model["batch_stats"][0]["compute_infer"] == {"count": 2, "ns": 0}
    assert "compute_input" not in model["batch_stats"][0]  # unset message: left out
    assert model["memory_usage"] == []


def test_message_json_repository_index_entry() -> None:
    entry = pb.RepositoryIndexResponse.ModelIndex(name="m", version="2", state="READY")
    assert rest.message_json(entry) == {"name": "m", "version": "2", "state": "READY", "reason": ""}


def test_message_json_model_config() -> None:
    config = mc.ModelConfig(name="m", platform="onnxruntime_onnx", max_batch_size=0)
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[-1, 3])
    config.output.add(name="y", data_type=mc.TYPE_STRING, dims=[1])
    config.parameters["k"].string_value = "v"
    response = pb.ModelConfigResponse(config=config)
    out = rest.message_json(response.config)
    assert out["max_batch_size"] == 0
    assert out["name"] == "m"
    assert out["input"][0]["name"] == "x"
    assert out["input"][0]["data_type"] == "TYPE_FP32"
    assert out["input"][0]["dims"] == [-1, 3]
    assert out["input"][0]["format"] == "FORMAT_NONE"
    assert out["output"][0]["data_type"] == "TYPE_STRING"
    assert out["parameters"] == {"k": {"string_value": "v"}}
    assert out["instance_group"] == []
    assert "dynamic_batching" not in out  # unset messages are left out
    assert "version_policy" not in out
    assert json.loads(rest.dumps(out)) == out


def test_message_json_oneof_message_and_infer_parameter_map() -> None:
    config = mc.ModelConfig(name="m")
    config.version_policy.latest.num_versions = 2
    assert rest.message_json(config)["version_policy"] == {"latest": {"num_versions": 2}}
    response = pb.ModelInferResponse(model_name="m")
    response.parameters["a"].int64_param = 3
    response.parameters["b"].bool_param = False
    assert rest.message_json(response)["parameters"] == {"a": 3, "b": False}


# -- bad bodies -------------------------------------------------------------------------------

_X = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "the infer request must be a JSON object, got list"),
        ("text", "the infer request must be a JSON object, got str"),
        ({}, "the infer request needs a non-empty 'inputs' array"),
        ({"inputs": []}, "the infer request needs a non-empty 'inputs' array"),
        ({"inputs": {"name": "x"}}, "the infer request needs a non-empty 'inputs' array"),
        ({"inputs": [1]}, "each input must be a JSON object, got int"),
        ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, "each input needs a 'name'"),
        (
            {"inputs": [{"name": "", "datatype": "FP32", "shape": [1], "data": [1]}]},
            "each input needs a 'name'",
        ),
        (
            {"inputs": [{"name": 5, "datatype": "FP32", "shape": [1], "data": [1]}]},
            "each input needs a 'name'",
        ),
        ({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}, "input 'x' needs a 'datatype'"),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]},
            "input 'x' needs a 'shape' of integers",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": 1, "data": [1]}]},
            "input 'x' needs a 'shape' of integers",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1.0], "data": [1]}]},
            "input 'x' needs a 'shape' of integers",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [True], "data": [1]}]},
            "input 'x' needs a 'shape' of integers",
        ),
        ({"inputs": [_fp32("x", [2, -1], [1])]}, "tensor 'x': shape [2, -1] has a negative dimension"),
        (
            {"inputs": [_fp32("x", [2, 2], [1, 2, 3])]},
            "input 'x': 'data' has 3 elements but shape [2, 2] needs 4",
        ),
        (
            {"inputs": [_fp32("x", [2, 2], [[1, 2], [3, 4], [5]])]},
            "input 'x': 'data' has 5 elements but shape [2, 2] needs 4",
        ),
        ({"inputs": [_fp32("x", [1], 1.0)]}, "input 'x': 'data' must be a JSON array"),
        ({"inputs": [_fp32("x", [2], [1.0, "2"])]}, "input 'x': FP32 data must be numbers, got str"),
        ({"inputs": [_fp32("x", [1], [True])]}, "input 'x': FP32 data must be numbers, got bool"),
        ({"inputs": [_fp32("x", [1], [None])]}, "input 'x': FP32 data must be numbers, got NoneType"),
        (
            {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2.5]}]},
            "input 'x': INT32 data must be integers, got 2.5",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.0]}]},
            "input 'x': INT32 data must be integers, got 1.0",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [False]}]},
            "input 'x': INT64 data must be integers, got false",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "INT8", "shape": [2], "data": [1, 128]}]},
            "input 'x': a value is out of the INT8 range",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [-129]}]},
            "input 'x': a value is out of the INT8 range",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [-1]}]},
            "input 'x': a value is out of the UINT8 range",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [2**63]}]},
            "input 'x': a value is out of the INT64 range",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP16", "shape": [1], "data": [1.0]}]},
            "input 'x': FP16 data cannot travel as JSON; send it as binary data",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "BF16", "shape": [1], "data": [1.0]}]},
            "input 'x': BF16 data cannot travel as JSON; send it as binary data",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": ["a", 1]}]},
            "input 'x': BYTES data must be strings, got int",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "BOOL", "shape": [2], "data": [True, 1]}]},
            "input 'x': BOOL data must be true or false",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]},
            "input 'x' has neither 'data' nor a binary_data_size parameter",
        ),
        ({"id": 7, "inputs": [_X]}, "'id' must be a string"),
        ({"id": None, "inputs": [_X]}, "'id' must be a string"),
        (
            {"parameters": {"p": [1]}, "inputs": [_X]},
            "request: parameter 'p' must be a boolean, number or string, got list",
        ),
        (
            {"parameters": {"p": {"q": 1}}, "inputs": [_X]},
            "request: parameter 'p' must be a boolean, number or string, got dict",
        ),
        ({"parameters": [1], "inputs": [_X]}, "request: parameters must be a JSON object, got list"),
        ({"parameters": None, "inputs": [_X]}, "request: parameters must be a JSON object, got NoneType"),
        (
            {"parameters": {"big": 2**64}, "inputs": [_X]},
            "request: parameter 'big' is out of the int64 range",
        ),
        (
            {"inputs": [{**_X, "parameters": {"p": [1]}}]},
            "input 'x': parameter 'p' must be a boolean, number or string, got list",
        ),
        ({"inputs": [{**_X, "parameters": "p"}]}, "input 'x': parameters must be a JSON object, got str"),
        ({"inputs": [_X], "outputs": [{}]}, "each requested output needs a 'name'"),
        ({"inputs": [_X], "outputs": [{"name": ""}]}, "each requested output needs a 'name'"),
        (
            {"inputs": [_X], "outputs": [{"parameters": {"binary_data": True}}]},
            "each requested output needs a 'name'",
        ),
        ({"inputs": [_X], "outputs": ["y"]}, "each requested output must be a JSON object, got str"),
        (
            {"inputs": [_X], "outputs": [{"name": "y", "parameters": {"classification": [3]}}]},
            "output 'y': parameter 'classification' must be a boolean, number or string, got list",
        ),
        (
            {"inputs": [_X], "outputs": [{"name": "y", "parameters": 1}]},
            "output 'y': parameters must be a JSON object, got int",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": -4}}
                ]
            },
            "input 'x': binary_data_size must be a non-negative integer",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4.0}}
                ]
            },
            "input 'x': binary_data_size must be a non-negative integer",
        ),
    ],
)
def test_bad_json_body(doc: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        rest.infer_request(_json(doc), None, "m", "")


@pytest.mark.parametrize(
    "body",
    [b'{"inputs": [', b"", b"not json", b'{"inputs": []} trailing', b"\xff\xfe{}", b"{'a': 1}"],
)
def test_malformed_json(body: bytes) -> None:
    with pytest.raises(InvalidArgument, match="malformed JSON in the request body"):
        rest.infer_request(body, None, "m", "")


def test_binary_tail_without_a_header_length_is_malformed_json() -> None:
    body, _ = _binary({"inputs": [_bin_input("x", "FP32", [1], 4)]}, np.float32(1).tobytes())
    with pytest.raises(InvalidArgument, match="malformed JSON in the request body"):
        rest.infer_request(body, None, "m", "")


@pytest.mark.parametrize("header_length", ["abc", "", "1.5", "0x10", "-1", " 2 ", "+2", "1_0"])
def test_header_length_not_an_integer(header_length: str) -> None:
    body = _json({"inputs": [_X]})
    message = f"Inference-Header-Content-Length must be a non-negative integer, got {header_length!r}"
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        rest.infer_request(body, header_length, "m", "")
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        rest.split_body(body, header_length)


@pytest.mark.parametrize("header_length", [11, 1000])
def test_header_length_past_the_body(header_length: int) -> None:
    body = b"0123456789"
    message = f"Inference-Header-Content-Length {header_length} lies past the end of the 10-byte body"
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        rest.infer_request(body, str(header_length), "m", "")


def test_header_length_cutting_the_json_short_is_malformed() -> None:
    body = _json({"inputs": [_X]})
    with pytest.raises(InvalidArgument, match="malformed JSON in the request body"):
        rest.infer_request(body, str(len(body) - 1), "m", "")


def test_binary_data_size_past_the_end_of_the_tail() -> None:
    body, length = _binary({"inputs": [_bin_input("x", "FP32", [2], 8)]}, b"\x00" * 4)
    message = "input 'x': binary_data_size 8 runs past the end of the binary data (4 bytes left)"
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        rest.infer_request(body, length, "m", "")


def test_second_binary_input_past_the_end_of_the_tail() -> None:
    doc = {"inputs": [_bin_input("a", "FP32", [1], 4), _bin_input("b", "FP32", [2], 8)]}
    body, length = _binary(doc, b"\x00" * 10)
    message = "input 'b': binary_data_size 8 runs past the end of the binary data (6 bytes left)"
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        rest.infer_request(body, length, "m", "")


def test_binary_data_size_disagreeing_with_shape_and_datatype() -> None:
    body, length = _binary({"inputs": [_bin_input("x", "FP32", [2], 4)]}, b"\x00" * 4)
    message = "tensor 'x': raw content is 4 bytes but shape [2] of FP32 needs 8"
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        rest.infer_request(body, length, "m", "")


def test_binary_bytes_input_that_is_not_length_prefixed() -> None:
    body, length = _binary({"inputs": [_bin_input("s", "BYTES", [2], 7)]}, _length_prefixed(b"abc"))
    with pytest.raises(
        InvalidArgument, match=re.escape("tensor 's': raw BYTES content ends before element 1 of 2")
    ):
        rest.infer_request(body, length, "m", "")


def test_binary_input_of_an_unknown_datatype() -> None:
    body, length = _binary({"inputs": [_bin_input("x", "FP8", [1], 1)]}, b"\x00")
    with pytest.raises(InvalidArgument, match=re.escape("unsupported datatype 'FP8'")):
        rest.infer_request(body, length, "m", "")


def test_leftover_binary_bytes_after_the_last_binary_input() -> None:
    body, length = _binary({"inputs": [_bin_input("x", "FP32", [1], 4)]}, b"\x00" * 8)
    message = "the body has 4 bytes of binary data after the last binary input"
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        rest.infer_request(body, length, "m", "")


def test_binary_tail_with_only_json_inputs_is_left_over() -> None:
    body, length = _binary({"inputs": [_X]}, b"\x01\x02\x03")
    with pytest.raises(InvalidArgument, match=re.escape("the body has 3 bytes of binary data after")):
        rest.infer_request(body, length, "m", "")


# -- client input that once escaped as something other than InvalidArgument (a generic 500) ----


def test_shape_dim_past_int64_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        _infer({"inputs": [_fp32("x", [2**63], [])]})


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}',
        b'{"inputs": [{"name": "\\ud800", "datatype": "FP32", "shape": [1], "data": [1]}]}',
        b'{"id": "\\udfff", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}',
    ],
)
def test_lone_surrogate_is_invalid_argument(body: bytes) -> None:
    with pytest.raises(InvalidArgument):
        rest.infer_request(body, None, "m", "")


@pytest.mark.parametrize("data", [[None], ["a", None]])
def test_null_in_bytes_data_is_invalid_argument(data: list[Any]) -> None:
    with pytest.raises(InvalidArgument, match="BYTES data must be strings, got NoneType"):
        rest.array_from_json("x", "BYTES", [len(data)], data)


def test_deeply_nested_json_is_invalid_argument() -> None:
    depth = 100_000
    with pytest.raises(InvalidArgument):
        rest.parse_json(b"[" * depth + b"]" * depth)


def test_repository_parameters_take_no_numbers_and_stay_in_range() -> None:
    """Load and unload parameters go through the same converter as infer parameters."""
    from ferry.core.rest_routes import _repository_parameters

    req = pb.RepositoryModelLoadRequest(model_name="m")
    _repository_parameters(req.parameters, {"config": "{}", "version": 2, "flag": True}, "m")
    assert req.parameters["config"].string_param == "{}" and req.parameters["version"].int64_param == 2
    for value, message in (
        (1.5, "repository: parameter 'p' must be a boolean, integer or string, got float"),
        (2**63, "repository: parameter 'p' is out of the int64 range"),
        ("\ud800", "repository: parameter 'p' holds a lone UTF-16 surrogate escape"),
    ):
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            _repository_parameters(pb.RepositoryModelLoadRequest().parameters, {"p": value}, "m")
