"""CUDA shared-memory regions in the worker's registry, without a GPU.

This host has no GPU, so the device is host memory standing in for device allocations behind
``DeviceMemory``: the registry's own rules (names shared with system regions, counts, sizes
checked against the allocation, offsets, unregistering by kind) are what these tests check.
The real CUDA calls run in ``tests/integration/test_cuda_shm.py`` on a GPU host.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.errors import (
    AlreadyExists,
    FerryError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unimplemented,
)
from services.inference.cuda_ipc import HANDLE_BYTES, load_runtime
from services.inference.shm import CUDA, SYSTEM, ShmLimits, ShmRegistry, TensorRef, with_shm_inputs

BASE = 1 << 32


class HostDevice:
    """Two 'devices' whose allocations are bytearrays, found by the handle's first byte."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self.memory = {tag: bytearray(size) for tag, size in sizes.items()}
        self.open_handles: list[int] = []

    def device_count(self) -> int:
        return 2

    def open(self, handle: bytes, device: int, what: str) -> tuple[int, int]:
        tag = handle[0]
        if tag not in self.memory:
            raise InvalidArgument(f"{what}: cannot open the CUDA IPC handle: CUDA error 1 (invalid argument)")
        address = BASE * (tag + 1)
        self.open_handles.append(address)
        return address, len(self.memory[tag])

    def close(self, device: int, address: int) -> None:
        self.open_handles.remove(address)

    def _at(self, address: int) -> tuple[bytearray, int]:
        return self.memory[address // BASE - 1], address % BASE

    def read(self, device: int, address: int, size: int) -> bytes:
        memory, at = self._at(address)
        return bytes(memory[at : at + size])

    def write(self, device: int, address: int, data: bytes) -> None:
        memory, at = self._at(address)
        memory[at : at + len(data)] = data


def handle(tag: int) -> bytes:
    return bytes([tag]) + b"\0" * (HANDLE_BYTES - 1)


def registry(device: HostDevice, max_regions: int = 3) -> ShmRegistry:
    return ShmRegistry(ShmLimits(max_regions, 1 << 20), lambda: device)


def test_a_cuda_region_reads_and_writes_at_its_offsets() -> None:
    device = HostDevice({1: 64})
    reg = registry(device)
    reg.register_cuda("gpu", handle(1), 0, 64)
    x = np.arange(4, dtype=np.int32)
    device.memory[1][16:32] = x.tobytes()
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="INT32", shape=[1, 4])
    tensor.parameters["shared_memory_region"].string_param = "gpu"
    tensor.parameters["shared_memory_offset"].int64_param = 16
    tensor.parameters["shared_memory_byte_size"].int64_param = 16
    raw = with_shm_inputs(request, reg).raw_input_contents[0]
    assert np.frombuffer(raw, np.int32).tolist() == [0, 1, 2, 3]
    reg.write(TensorRef("gpu", 48, 16), "output 'y'", (x * 10).tobytes())
    assert np.frombuffer(bytes(device.memory[1][48:64]), np.int32).tolist() == [0, 10, 20, 30]
    with pytest.raises(InvalidArgument, match="runs past the end of region 'gpu' \\(64 bytes\\)"):
        reg.read(TensorRef("gpu", 56, 16), "input 'x'")
    assert [r.name for r in reg.status("", CUDA)] == ["gpu"] and reg.status("", SYSTEM) == []


def test_registration_checks_the_handle_the_device_and_the_allocation() -> None:
    device = HostDevice({1: 64})
    reg = registry(device)
    cases: list[tuple[bytes, int, int, type[FerryError], str]] = [
        (
            b"short",
            0,
            8,
            InvalidArgument,
            f"raw_handle must be a {HANDLE_BYTES}-byte cudaIpcMemHandle_t, got 5",
        ),
        (handle(1), 2, 8, InvalidArgument, "device_id 2 is not one of the 2 devices here"),
        (
            handle(1),
            0,
            65,
            InvalidArgument,
            "byte_size 65 runs past the end of the device allocation (64 bytes)",
        ),
        (handle(9), 0, 8, InvalidArgument, "cannot open the CUDA IPC handle"),
        (handle(1), 0, 0, InvalidArgument, "byte_size must be positive"),
        (handle(1), 0, 2 << 20, ResourceExhausted, "over the worker's limit"),
    ]
    for raw, device_id, size, kind, message in cases:
        with pytest.raises(kind, match=re.escape(message)):
            reg.register_cuda("gpu", raw, device_id, size)
    assert device.open_handles == [], "a refused registration leaves no handle open"
    assert reg.status("", CUDA) == []


def test_cuda_and_system_regions_share_names_and_the_count() -> None:
    device = HostDevice({1: 64, 2: 64, 3: 64})
    reg = registry(device, max_regions=2)
    reg.register_cuda("a", handle(1), 0, 64)
    with pytest.raises(AlreadyExists, match="'a' is already registered"):
        reg.register_cuda("a", handle(2), 0, 64)
    reg.register_cuda("b", handle(2), 1, 64)
    with pytest.raises(ResourceExhausted, match="2 regions are registered, the worker's limit is 2"):
        reg.register_cuda("c", handle(3), 0, 64)
    with pytest.raises(NotFound, match="'a' is not a system region"):
        reg.status("a", SYSTEM)
    reg.unregister("a", SYSTEM)  # the system kind does not reach a CUDA region
    assert len(device.open_handles) == 2
    reg.unregister("", CUDA)
    assert device.open_handles == [] and reg.status("", CUDA) == []


def test_where_cuda_is_not_offered_registering_says_why() -> None:
    reg = ShmRegistry(ShmLimits(4, 1 << 20), "it is off; start the worker with --cuda-shm")
    with pytest.raises(
        Unimplemented,
        match=re.escape("not offered on this worker (it is off; start the worker with --cuda-shm)"),
    ):
        reg.register_cuda("gpu", handle(1), 0, 64)
    reg.unregister("", CUDA)  # the spec's no-op


def test_the_runtime_loads_or_says_why_not() -> None:
    found = load_runtime()
    if isinstance(found, str):  # this host: no GPU
        assert re.search(r"CUDA (runtime|driver) library|no CUDA device|did not start", found), found
    else:
        assert found.device_count() >= 1
