"""The one datatype table agrees with ONNX, ONNX Runtime, numpy and the protocol's own messages."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import model_config_pb2 as mc
from ferry.core.datatypes import TABLE, Datatype, config_name, from_config
from ferry.core.errors import InvalidArgument

ONNX_NAMES = {"FP16": "FLOAT16", "FP32": "FLOAT", "FP64": "DOUBLE", "BYTES": "STRING", "BF16": "BFLOAT16"}


@pytest.mark.parametrize("d", TABLE, ids=[d.name for d in TABLE])
def test_each_row_matches_onnx_numpy_and_the_protocol(d: Datatype) -> None:
    assert TensorProto.DataType.Name(d.onnx) == ONNX_NAMES.get(d.name, d.name)
    if d.numpy is not None and d.name != "BYTES":
        assert np.dtype(helper.tensor_dtype_to_np_dtype(d.onnx)) == d.numpy
    assert mc.DataType.Value(config_name(d.name))  # Triton's config enum knows it
    if d.contents is not None:
        assert d.contents in pb.InferTensorContents.DESCRIPTOR.fields_by_name


def test_ort_type_strings_are_what_onnx_runtime_reports() -> None:
    import onnxruntime as ort

    for d in TABLE:
        if d.name == "BF16":
            continue  # ORT's CPU provider runs no BF16 Identity
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "id",
            [helper.make_tensor_value_info("x", d.onnx, [1])],
            [helper.make_tensor_value_info("y", d.onnx, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == d.ort, d.name


def test_config_spellings() -> None:
    assert from_config("TYPE_STRING", "w") == "BYTES" and from_config("FP32", "w") == "FP32"
    assert from_config("TYPE_INT64", "w") == "INT64"
    with pytest.raises(InvalidArgument, match=r"^w: unknown datatype 'TYPE_BF16'"):
        from_config("TYPE_BF16", "w")  # no numpy type: a config cannot serve it
