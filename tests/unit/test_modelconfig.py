from __future__ import annotations

import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.configproto import config_proto, metadata_proto
from ferry.core.errors import InvalidArgument
from ferry.core.modelconfig import (
    BatchingPolicy,
    ModelSpec,
    TensorSpec,
    VersionPolicy,
    spec_from_config,
    spec_to_config,
    version_policy_of,
)
from ferry.core.validation import accept_request, validate_request

SPEC = ModelSpec(
    name="m",
    inputs=(TensorSpec("input", "FP32", (3, -1)),),
    outputs=(TensorSpec("output", "FP32", (4,)),),
    max_batch_size=8,
)


def request(shape: list[int], datatype: str = "FP32", name: str = "input") -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="m")
    r.inputs.add(name=name, datatype=datatype, shape=shape)
    return r


def test_valid_request_returns_rows() -> None:
    assert validate_request(SPEC, request([5, 3, 7])) == 5


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request([2, 3, 1], name="nope"), "has no input 'nope'"),
        (request([2, 3, 1], datatype="INT64"), "datatype INT64 does not match the model's FP32"),
        (request([2, 3]), "has rank 2 but the model expects"),
        (request([2, 4, 1]), r"shape \[2, 4, 1\] does not match"),
        (request([9, 3, 1]), "batch size 9 exceeds the model's max_batch_size 8"),
        (request([0, 3, 1]), "empty batch"),
        (pb.ModelInferRequest(model_name="m"), "missing input"),
    ],
)
def test_bad_requests(req: pb.ModelInferRequest, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_request(SPEC, req)
    raw = pb.ModelInferRequest()
    raw.CopyFrom(req)
    for t in raw.inputs:  # the same request in raw form, sized right: the one-pass path's errors
        count = 1
        for d in t.shape:
            count *= d
        raw.raw_input_contents.append(bytes(4 * count))
    with pytest.raises(InvalidArgument, match=message):
        accept_request(SPEC, raw)


def test_accept_request_decodes_in_one_pass_and_checks_byte_sizes() -> None:
    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    r = request([2, 3, 5])
    r.raw_input_contents.append(x.tobytes())
    rows, arrays = accept_request(SPEC, r)
    assert rows == 2
    np.testing.assert_array_equal(arrays["input"], x)
    short = request([2, 3, 5])
    short.raw_input_contents.append(x.tobytes()[:-4])
    with pytest.raises(InvalidArgument, match="116 bytes but shape"):
        accept_request(SPEC, short)


def test_unknown_requested_output() -> None:
    r = request([1, 3, 1])
    r.outputs.add(name="logits")
    with pytest.raises(InvalidArgument, match="has no output 'logits'"):
        validate_request(SPEC, r)


def test_version_policies() -> None:
    assert VersionPolicy().select([3, 1, 2]) == [3]
    assert VersionPolicy(num_versions=2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy(kind="all").select([2, 1]) == [1, 2]
    assert VersionPolicy(kind="specific", versions=(1, 5)).select([1, 2, 3]) == [1]
    assert VersionPolicy().select([]) == []
    assert version_policy_of({"version_policy": {"specific": {"versions": [2]}}}).versions == (2,)
    assert version_policy_of(None).kind == "latest"


def test_config_round_trip_and_overrides() -> None:
    spec = ModelSpec(
        name="m",
        inputs=SPEC.inputs,
        outputs=SPEC.outputs,
        max_batch_size=16,
        batching=BatchingPolicy(max_queue_delay_us=100, preferred_batch_sizes=(4, 8), max_queue_size=7),
        version_policy=VersionPolicy(kind="latest", num_versions=2),
        response_cache=False,
    )
    assert spec_from_config("m", spec_to_config(spec)) == spec
    partial = spec_from_config("m", {"max_batch_size": 2, "dynamic_batching": {"max_queue_size": 3}}, SPEC)
    assert (
        partial.inputs == SPEC.inputs and partial.max_batch_size == 2 and partial.batching.max_queue_size == 3
    )


def test_config_rejects_unknown_datatype() -> None:
    with pytest.raises(InvalidArgument, match="unknown datatype 'FLOAT'"):
        spec_from_config("m", {"input": [{"name": "x", "data_type": "FLOAT", "dims": [1]}], "output": []})


def test_protos_carry_batch_dimension() -> None:
    meta = metadata_proto(SPEC, [1, 2])
    assert list(meta.inputs[0].shape) == [-1, 3, -1] and meta.versions == ["1", "2"]
    cfg = config_proto(SPEC)
    assert cfg.max_batch_size == 8 and list(cfg.input[0].dims) == [3, -1]
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
