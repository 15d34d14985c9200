"""Triton's shared-memory extensions: regions a client on this host registers (POSIX shm objects, or
device memory through ``cuda_ipc``), and the tensors that travel through them instead of through
the gRPC message.

Why it exists: a client on the worker's own host can hand over a 16 MB input by writing it
into a POSIX shared-memory object and naming it, which skips serialising it into protobuf,
copying it through the socket and parsing it again. What it must never become: a way for
a caller to make the server open a file. A key is a plain POSIX shm name (one optional
leading ``/``, no other ``/``, no ``..``, bounded length) resolved under ``/dev/shm`` without
following links; the object must already exist and is only mapped, never created or
truncated. Counts and sizes are capped by the worker's settings.

The checks (``check_key``, ``check_register``, ``check_span``, ``tensor_ref``) are pure and
unit-tested without a server; ``ShmRegistry`` holds the maps and does the reads and writes.
All of it runs on the event loop, so a region is never unmapped under a read or a write.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.codec import (
    array_from_contents,
    check_shape,
    datatype_of,
    element_count,
    numpy_dtype,
    raw_bytes,
)
from ferry.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unimplemented,
)
from ferry.core.params import int_param
from services.inference.cuda_ipc import HANDLE_BYTES, DeviceMemory

SHM_ROOT = Path("/dev/shm")
SYSTEM, CUDA = "system", "cuda"
MAX_KEY_CHARS = 255  # NAME_MAX: the longest file name /dev/shm holds
MAX_NAME_CHARS = 128
REGION, OFFSET, BYTE_SIZE = "shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"


@dataclass(frozen=True)
class ShmLimits:
    """How much host memory callers may make the worker map."""

    max_regions: int
    max_region_bytes: int


@dataclass(frozen=True)
class TensorRef:
    """Where one input or output lives: ``offset`` is from the start of the registered region."""

    region: str
    offset: int
    byte_size: int


# --- pure checks ----------------------------------------------------------------------------------


def check_key(key: str) -> str:
    """The file name under /dev/shm for a POSIX shm ``key``; a key is a name, never a path."""
    name = key[1:] if key.startswith("/") else key
    if not name or len(name) > MAX_KEY_CHARS:
        raise InvalidArgument(
            f"shared memory key {key!r} must be a POSIX shm name of 1 to {MAX_KEY_CHARS} characters"
        )
    if "/" in name or ".." in name or "\0" in name or name in (".",):
        raise InvalidArgument(
            f"shared memory key {key!r} must be a plain POSIX shm name ('/name'): "
            "no '/' after the first character, no '..'"
        )
    return name


def check_name(name: str) -> None:
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise InvalidArgument(
            f"shared memory region name {name!r} must be 1 to {MAX_NAME_CHARS} printable characters"
        )


def check_register(
    name: str, key: str, byte_size: int, registered: Collection[str], limits: ShmLimits
) -> str:
    """Everything about a registration that needs no file (the offset is bounded by the object's
    size, which only the file knows); returns the file name to open."""
    check_name(name)
    file_name = check_key(key)
    check_room(name, byte_size, registered, limits)
    return file_name


def check_room(name: str, byte_size: int, registered: Collection[str], limits: ShmLimits) -> None:
    """A new region of ``byte_size`` fits the worker's limits; system and CUDA regions share one
    namespace and one count, as in Triton."""
    if name in registered:
        raise AlreadyExists(f"shared memory region {name!r} is already registered; unregister it first")
    if byte_size <= 0:
        raise InvalidArgument(f"shared memory region {name!r}: byte_size must be positive")
    if byte_size > limits.max_region_bytes:
        raise ResourceExhausted(
            f"shared memory region {name!r}: byte_size {byte_size} is over the worker's limit of "
            f"{limits.max_region_bytes} bytes per region"
        )
    if len(registered) >= limits.max_regions:
        raise ResourceExhausted(
            f"cannot register shared memory region {name!r}: {len(registered)} regions are registered, "
            f"the worker's limit is {limits.max_regions}"
        )


def check_span(what: str, region: str, region_bytes: int, offset: int, byte_size: int) -> None:
    """A tensor's bytes lie inside its region."""
    if offset < 0 or byte_size < 0 or offset + byte_size > region_bytes:
        raise InvalidArgument(
            f"{what}: shared memory offset {offset} + byte size {byte_size} runs past the end of "
            f"region {region!r} ({region_bytes} bytes)"
        )


def tensor_ref(params: Mapping[str, Any], what: str) -> TensorRef | None:
    """The shared-memory parameters of one tensor, or None when it travels in the message.
    Region and byte size come together or not at all (the spec's rule); the offset defaults to 0."""
    region_given = REGION in params
    size = int_param(params, BYTE_SIZE, what, digits=False)
    if not region_given and size is None:
        if OFFSET in params:
            raise InvalidArgument(f"{what}: {OFFSET!r} needs {REGION!r} and {BYTE_SIZE!r}")
        return None
    if not region_given or size is None:
        raise InvalidArgument(f"{what}: {REGION!r} and {BYTE_SIZE!r} must be given together")
    p = params[REGION]
    if p.WhichOneof("parameter_choice") != "string_param" or not p.string_param:
        raise InvalidArgument(f"{what}: parameter {REGION!r} must be a region name")
    offset = int_param(params, OFFSET, what, digits=False) or 0
    if offset < 0 or size < 0:
        raise InvalidArgument(f"{what}: shared memory offset and byte size must not be negative")
    return TensorRef(p.string_param, offset, size)


def fixed_byte_size(what: str, datatype: str, shape: Collection[int]) -> int | None:
    """Bytes a tensor of ``shape`` x ``datatype`` takes; None for BYTES (length-prefixed)."""
    dtype = numpy_dtype(datatype)
    check_shape(what, list(shape))
    if datatype == "BYTES":
        return None
    return element_count(list(shape)) * dtype.itemsize


# --- regions and their I/O ------------------------------------------------------------------------


class Region:
    """One registered region: ``byte_size`` bytes from ``offset`` of a mapped shm object."""

    kind = SYSTEM

    def __init__(self, name: str, key: str, offset: int, byte_size: int, mapped: mmap.mmap) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        self._map = mapped

    def read(self, offset: int, size: int) -> bytes:
        start = self.offset + offset
        return self._map[start : start + size]

    def write(self, offset: int, data: bytes) -> None:
        start = self.offset + offset
        self._map[start : start + len(data)] = data

    def close(self) -> None:
        self._map.close()


class CudaRegion:
    """``byte_size`` bytes of a client's device allocation, opened from its CUDA IPC handle."""

    kind = CUDA

    def __init__(self, name: str, device_id: int, byte_size: int, address: int, cuda: DeviceMemory) -> None:
        self.name, self.device_id, self.byte_size = name, device_id, byte_size
        self._address, self._cuda = address, cuda

    def read(self, offset: int, size: int) -> bytes:
        return self._cuda.read(self.device_id, self._address + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self._cuda.write(self.device_id, self._address + offset, data)

    def close(self) -> None:
        self._cuda.close(self.device_id, self._address)


def map_object(file_name: str, key: str, offset: int, byte_size: int) -> mmap.mmap:
    """Map an existing shm object read-write; never create, truncate or follow a link."""
    path = SHM_ROOT / file_name
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"shared memory key {key!r} does not exist on this host ({path})") from None
    except PermissionError:
        raise FailedPrecondition(f"the worker may not open shared memory key {key!r}") from None
    except OSError as err:
        raise InvalidArgument(f"cannot open shared memory key {key!r}: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"shared memory key {key!r} is not a shared memory object")
        if offset + byte_size > info.st_size:
            raise InvalidArgument(
                f"shared memory key {key!r}: offset {offset} + byte_size {byte_size} runs past the end "
                f"of the object ({info.st_size} bytes)"
            )
        return mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


class ShmRegistry:
    """The worker's registered shared-memory regions, system and CUDA, by name.

    ``cuda`` says whether CUDA regions are offered here: the runtime, loaded on first use (a host
    without CUDA pays nothing), or the reason they are not."""

    def __init__(self, limits: ShmLimits, cuda: Callable[[], DeviceMemory | str] | str = "") -> None:
        self.limits = limits
        self._regions: dict[str, AnyRegion] = {}
        self._cuda_source = cuda
        self._cuda: DeviceMemory | str | None = None

    def cuda(self) -> DeviceMemory | str:
        """The CUDA runtime, or why CUDA shared memory is not offered."""
        if self._cuda is None:
            source = self._cuda_source
            self._cuda = source() if callable(source) else (source or "CUDA shared memory is off")
        return self._cuda

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        file_name = check_register(name, key, byte_size, self._regions.keys(), self.limits)
        self._regions[name] = Region(
            name, key, offset, byte_size, map_object(file_name, key, offset, byte_size)
        )

    def offered_cuda(self, what: str) -> DeviceMemory:
        """The CUDA runtime, or UNIMPLEMENTED saying ``what`` cannot be done here, and why."""
        cuda = self.cuda()
        if isinstance(cuda, str):
            raise Unimplemented(
                f"{what}: CUDA shared memory is not offered on this worker ({cuda}); use system shared memory"
            )
        return cuda

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        what = f"CUDA shared memory region {name!r}"
        cuda = self.offered_cuda(f"cannot register {what}")
        check_name(name)
        check_room(name, byte_size, self._regions.keys(), self.limits)
        if len(raw_handle) != HANDLE_BYTES:
            raise InvalidArgument(
                f"{what}: raw_handle must be a {HANDLE_BYTES}-byte cudaIpcMemHandle_t, "
                f"got {len(raw_handle)} bytes"
            )
        devices = cuda.device_count()
        if not 0 <= device_id < devices:
            raise InvalidArgument(f"{what}: device_id {device_id} is not one of the {devices} devices here")
        address, room = cuda.open(raw_handle, device_id, what)
        if byte_size > room:
            cuda.close(device_id, address)
            raise InvalidArgument(
                f"{what}: byte_size {byte_size} runs past the end of the device allocation ({room} bytes)"
            )
        self._regions[name] = CudaRegion(name, device_id, byte_size, address, cuda)

    def unregister(self, name: str, kind: str = SYSTEM) -> None:
        """An empty name unregisters every region of the kind; an unknown one is not an error (the
        spec's rule)."""
        for n in [name] if name else list(self._regions):
            region = self._regions.get(n)
            if region is not None and region.kind == kind:
                del self._regions[n]
                region.close()

    def status(self, name: str, kind: str = SYSTEM) -> list[AnyRegion]:
        if not name:
            return [r for r in self._regions.values() if r.kind == kind]
        region = self._get(name, "status")
        if region.kind != kind:
            raise NotFound(f"status: shared memory region {name!r} is not a {kind} region")
        return [region]

    def close(self) -> None:
        self.unregister("", SYSTEM)
        self.unregister("", CUDA)

    def _get(self, name: str, what: str) -> AnyRegion:
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"{what}: shared memory region {name!r} is not registered")
        return region

    def check(self, ref: TensorRef, what: str) -> AnyRegion:
        region = self._get(ref.region, what)
        check_span(what, ref.region, region.byte_size, ref.offset, ref.byte_size)
        return region

    def read(self, ref: TensorRef, what: str) -> bytes:
        return self.check(ref, what).read(ref.offset, ref.byte_size)

    def write(self, ref: TensorRef, what: str, data: bytes) -> None:
        region = self.check(ref, what)
        if len(data) > ref.byte_size:
            raise InvalidArgument(
                f"{what}: shared memory byte size {ref.byte_size} is too small for the "
                f"{len(data)} bytes of the result"
            )
        region.write(ref.offset, data)


AnyRegion = Region | CudaRegion


# --- requests and responses -----------------------------------------------------------------------


def with_shm_inputs(request: pb.ModelInferRequest, registry: ShmRegistry) -> pb.ModelInferRequest:
    """``request`` with every input raw: shared-memory inputs read from their regions, the rest
    as sent. The caller validates the result as any raw request; unchanged when none uses shm."""
    refs = [tensor_ref(t.parameters, f"input {t.name!r}") for t in request.inputs]
    if not any(refs):
        return request
    raw = request.raw_input_contents
    plain = sum(r is None for r in refs)
    if raw and len(raw) != plain:
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {plain} inputs not in shared memory"
        )
    out = pb.ModelInferRequest(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    out.outputs.extend(request.outputs)
    next_raw = iter(raw)
    for tensor, ref in zip(request.inputs, refs, strict=True):
        out.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        what = f"input {tensor.name!r}"
        if ref is None:
            if raw:
                out.raw_input_contents.append(next(next_raw))
            else:
                array = array_from_contents(tensor.name, tensor.datatype, tensor.shape, tensor.contents)
                out.raw_input_contents.append(raw_bytes(array))
            continue
        expected = fixed_byte_size(what, tensor.datatype, tensor.shape)
        if expected is not None and expected != ref.byte_size:
            raise InvalidArgument(
                f"{what}: shared_memory_byte_size {ref.byte_size} does not match shape "
                f"{list(tensor.shape)} of {tensor.datatype}, which needs {expected} bytes"
            )
        out.raw_input_contents.append(registry.read(ref, what))
    return out


def output_refs(request: pb.ModelInferRequest, registry: ShmRegistry) -> dict[str, TensorRef]:
    """The outputs asked for in shared memory, checked (region known, span inside) before the run."""
    refs: dict[str, TensorRef] = {}
    for out in request.outputs:
        what = f"output {out.name!r}"
        ref = tensor_ref(out.parameters, what)
        if ref is not None:
            registry.check(ref, what)
            refs[out.name] = ref
    return refs


def add_shm_outputs(
    response: pb.ModelInferResponse,
    values: list[tuple[str, np.ndarray]],
    refs: dict[str, TensorRef],
    registry: ShmRegistry,
) -> None:
    """Append outputs: those in ``refs`` written to their regions with no contents in the
    response (an empty raw entry keeps the others' indices), the rest raw as usual."""
    raw: list[bytes] = []
    for name, array in values:
        data = raw_bytes(array)
        response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        ref = refs.get(name)
        if ref is None:
            raw.append(data)
        else:
            registry.write(ref, f"output {name!r}", data)
            raw.append(b"")
    if len(refs) < len(values):
        response.raw_output_contents.extend(raw)
