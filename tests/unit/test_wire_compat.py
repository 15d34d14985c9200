"""Ferry's v2 messages must match the public protocol field for field, or clients break.

tritonclient ships its own compiled copy of the protocol; every message, field
and RPC Ferry defines is compared with it (Ferry carries a subset of ModelConfig,
so only Ferry's fields are checked there, never the other way round).
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor

from ferry._proto.inference import grpc_service_pb2, model_config_pb2
from tests.support.deps import require_module

tc_service = require_module("tritonclient.grpc.service_pb2")
tc_config = require_module("tritonclient.grpc.model_config_pb2")


def compare(ours: Descriptor, theirs: Descriptor) -> None:
    assert ours.full_name == theirs.full_name
    for field in ours.fields:
        other = theirs.fields_by_name.get(field.name)
        assert other is not None, f"{ours.full_name}.{field.name} is not in the spec"
        assert (field.number, field.type, field.is_repeated) == (
            other.number,
            other.type,
            other.is_repeated,
        ), f"{ours.full_name}.{field.name} differs from the spec"
        if field.message_type is not None:
            assert field.message_type.full_name == other.message_type.full_name
    for nested in ours.nested_types:
        compare(nested, theirs.nested_types_by_name[nested.name])
    for enum in ours.enum_types:
        assert {v.name: v.number for v in enum.values}.items() <= {
            v.name: v.number for v in theirs.enum_types_by_name[enum.name].values
        }.items()


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(grpc_service_pb2, tc_service), (model_config_pb2, tc_config)],
    ids=["service", "config"],
)
def test_messages_match_the_spec(ours: object, theirs: object) -> None:
    ours_file, theirs_file = ours.DESCRIPTOR, theirs.DESCRIPTOR
    assert ours_file.package == theirs_file.package == "inference"
    for name, message in ours_file.message_types_by_name.items():
        compare(message, theirs_file.message_types_by_name[name])
    for name, enum in ours_file.enum_types_by_name.items():
        theirs_values = {v.name: v.number for v in theirs_file.enum_types_by_name[name].values}
        assert {v.name: v.number for v in enum.values} == theirs_values


def test_full_service_messages_are_complete() -> None:
    """Every field of the messages Ferry answers with exists in Ferry's copy too."""
    for name, message in grpc_service_pb2.DESCRIPTOR.message_types_by_name.items():
        theirs = tc_service.DESCRIPTOR.message_types_by_name[name]
        assert set(theirs.fields_by_name) == set(message.fields_by_name), name


def test_rpcs_match_the_spec() -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = tc_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
    expected = {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
        "RepositoryModelUnload", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
    }  # fmt: skip
    assert {m.name for m in ours.methods} == expected
