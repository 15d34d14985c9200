"""The shared-memory checks without a server, and the registry on real /dev/shm objects."""

from __future__ import annotations

import os
from collections.abc import Iterator
from multiprocessing import shared_memory

import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.auth import RULES, ApiKey, decide
from ferry.core.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from services.inference.shm import (
    ShmLimits,
    ShmRegistry,
    TensorRef,
    add_shm_outputs,
    check_key,
    check_register,
    check_span,
    fixed_byte_size,
    output_refs,
    tensor_ref,
    with_shm_inputs,
)

LIMITS = ShmLimits(max_regions=2, max_region_bytes=1024)


@pytest.mark.parametrize(("key", "file_name"), [("/input_simple", "input_simple"), ("plain", "plain")])
def test_keys_are_plain_posix_names(key: str, file_name: str) -> None:
    assert check_key(key) == file_name


@pytest.mark.parametrize(
    "key", ["", "/", "/a/b", "a/b", "/..", "..x", "/x" + "y" * 300, "/dev/shm/x", "/a\0b"]
)
def test_keys_that_are_paths_are_refused(key: str) -> None:
    with pytest.raises(InvalidArgument, match="POSIX shm name"):
        check_key(key)


def test_register_checks() -> None:
    assert check_register("a", "/k", 16, [], LIMITS) == "k"
    with pytest.raises(AlreadyExists, match="'a' is already registered"):
        check_register("a", "/k", 16, ["a"], LIMITS)
    with pytest.raises(ResourceExhausted, match="limit is 2"):
        check_register("c", "/k", 16, ["a", "b"], LIMITS)
    with pytest.raises(ResourceExhausted, match="limit of 1024 bytes"):
        check_register("c", "/k", 2048, [], LIMITS)
    with pytest.raises(InvalidArgument, match="byte_size must be positive"):
        check_register("c", "/k", 0, [], LIMITS)
    with pytest.raises(InvalidArgument, match="region name"):
        check_register("", "/k", 16, [], LIMITS)


def test_spans() -> None:
    check_span("input 'x'", "r", 64, 32, 32)
    with pytest.raises(
        InvalidArgument, match="offset 40 \\+ byte size 32 runs past the end of region 'r' \\(64"
    ):
        check_span("input 'x'", "r", 64, 40, 32)


def _params(tensor: object, **values: object) -> object:
    params = tensor.parameters  # type: ignore[attr-defined]
    for k, v in values.items():
        if isinstance(v, str):
            params[k].string_param = v
        else:
            params[k].int64_param = v
    return params


def test_tensor_params() -> None:
    t = pb.ModelInferRequest.InferInputTensor(name="x")
    assert tensor_ref(t.parameters, "input 'x'") is None
    _params(t, shared_memory_region="r", shared_memory_byte_size=8)
    assert tensor_ref(t.parameters, "input 'x'") == TensorRef("r", 0, 8)
    _params(t, shared_memory_offset=4)
    assert tensor_ref(t.parameters, "input 'x'") == TensorRef("r", 4, 8)
    lone = pb.ModelInferRequest.InferInputTensor(name="y")
    _params(lone, shared_memory_region="r")
    with pytest.raises(InvalidArgument, match="must be given together"):
        tensor_ref(lone.parameters, "input 'y'")
    offset_only = pb.ModelInferRequest.InferInputTensor(name="z")
    _params(offset_only, shared_memory_offset=3)
    with pytest.raises(InvalidArgument, match="needs"):
        tensor_ref(offset_only.parameters, "input 'z'")


def test_byte_sizes() -> None:
    assert fixed_byte_size("x", "FP32", [2, 16]) == 128
    assert fixed_byte_size("x", "BYTES", [2]) is None
    with pytest.raises(InvalidArgument, match="unsupported datatype"):
        fixed_byte_size("x", "BF16", [1])


@pytest.fixture
def region() -> Iterator[shared_memory.SharedMemory]:
    mem = shared_memory.SharedMemory(f"ferry_unit_{os.getpid()}", create=True, size=256)
    yield mem
    mem.close()
    mem.unlink()


def test_registry_reads_and_writes_real_memory(region: shared_memory.SharedMemory) -> None:
    registry = ShmRegistry(LIMITS)
    with pytest.raises(NotFound, match="does not exist"):
        registry.register("a", f"/{region.name}_missing", 0, 64)
    with pytest.raises(InvalidArgument, match="runs past the end of the object"):
        registry.register("a", f"/{region.name}", 200, 64)
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    region.buf[64 : 64 + x.nbytes] = x.tobytes()
    registry.register("a", f"/{region.name}", 64, 128)  # the region starts 64 bytes in
    assert [(r.name, r.offset, r.byte_size) for r in registry.status("")] == [("a", 64, 128)]

    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="INT32", shape=[1, 16])
    _params(tensor, shared_memory_region="a", shared_memory_byte_size=x.nbytes)
    out = request.outputs.add(name="y")
    _params(out, shared_memory_region="a", shared_memory_byte_size=x.nbytes, shared_memory_offset=64)
    plain = with_shm_inputs(request, registry)
    assert plain.raw_input_contents[0] == x.tobytes() and not plain.inputs[0].parameters

    refs = output_refs(request, registry)
    response = pb.ModelInferResponse()
    add_shm_outputs(response, [("y", x * 2)], refs, registry)
    assert list(response.outputs[0].shape) == [1, 16] and not response.raw_output_contents
    assert bytes(region.buf[128 : 128 + x.nbytes]) == (x * 2).tobytes()
    with pytest.raises(InvalidArgument, match="too small"):
        add_shm_outputs(pb.ModelInferResponse(), [("y", np.zeros((1, 32), np.int32))], refs, registry)

    tensor.parameters["shared_memory_byte_size"].int64_param = 60
    with pytest.raises(InvalidArgument, match="does not match shape"):
        with_shm_inputs(request, registry)
    registry.unregister("unknown")  # the spec's no-op
    registry.unregister("")
    tensor.parameters["shared_memory_byte_size"].int64_param = x.nbytes
    with pytest.raises(NotFound, match="'a' is not registered"):
        with_shm_inputs(request, registry)


def test_registering_is_a_models_right_not_an_infer_right() -> None:
    infer = ApiKey("team", "0" * 64, roles=frozenset({"infer"}), models=("simple",))
    operator = ApiKey("ops", "1" * 64, roles=frozenset({"models"}), models=("other*",))
    reader = ApiKey("dash", "2" * 64, roles=frozenset({"read"}))
    kserve = "/inference.GRPCInferenceService/"
    for rpc in ("SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryRegister"):
        with pytest.raises(PermissionDenied, match="lacks the role 'models'"):
            decide(infer, kserve + rpc)
        decide(operator, kserve + rpc)  # region names are not models: its globs do not apply
        assert RULES[kserve + rpc].audit
    decide(reader, kserve + "SystemSharedMemoryStatus")
    with pytest.raises(PermissionDenied):
        decide(infer, kserve + "SystemSharedMemoryStatus")
