"""CUDA IPC for Triton's CUDA shared-memory extension: the few CUDA runtime and driver calls it needs,
through ctypes, so the worker needs no CUDA Python package.

A client on the worker's host allocates device memory, exports it with ``cudaIpcGetMemHandle``
and registers the 64-byte handle (tritonclient's ``register_cuda_shared_memory``). The worker
opens the handle once, checks with the driver that the client's claimed size lies inside the
allocation (the CUDA twin of the ``fstat`` check on a system region), and then copies a
request's input bytes device-to-host and its outputs host-to-device. The copies go through host
memory because the worker feeds ONNX Runtime host arrays; what a client saves is the bytes in
the gRPC message and their encoding, as with system shared memory.

``load_runtime`` never raises: on a host without ``libcudart`` or a GPU it returns the reason,
which the worker gives callers in its UNIMPLEMENTED answer.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
from typing import Protocol

from ferry.core.errors import InvalidArgument

HANDLE_BYTES = 64  # CUDA_IPC_HANDLE_SIZE
_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_HOST_TO_DEVICE, _DEVICE_TO_HOST = 1, 2
RUNTIME_NAMES = ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0")
DRIVER_NAMES = ("libcuda.so.1", "libcuda.so")


class DeviceMemory(Protocol):
    """What a CUDA region needs of the device: ``CudaRuntime`` on a GPU host."""

    def device_count(self) -> int: ...
    def open(self, handle: bytes, device: int, what: str) -> tuple[int, int]: ...
    def close(self, device: int, address: int) -> None: ...
    def read(self, device: int, address: int, size: int) -> bytes: ...
    def write(self, device: int, address: int, data: bytes) -> None: ...


class IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_BYTES)]


def _candidates() -> list[str]:
    """Library names the loader finds, then the pip wheels' copies (nvidia-cuda-runtime-cu12,
    which onnxruntime-gpu's CUDA 12 builds use)."""
    found = list(RUNTIME_NAMES)
    for root in sys.path:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
    return found


def open_library() -> ctypes.CDLL | None:
    """The CUDA runtime library, or None where it is not installed."""
    return _open_first(_candidates())


def _open_first(names: list[str] | tuple[str, ...]) -> ctypes.CDLL | None:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class CudaRuntime:
    """The CUDA calls behind the worker's CUDA regions. Calls are serialised: the current device is
    per thread, and the worker makes them from its event loop thread and nowhere else."""

    def __init__(self, runtime: ctypes.CDLL, driver: ctypes.CDLL) -> None:
        self._rt, self._drv = runtime, driver
        self._lock = threading.Lock()
        rt = runtime
        rt.cudaGetErrorString.restype = ctypes.c_char_p
        rt.cudaGetErrorString.argtypes = [ctypes.c_int]
        rt.cudaGetDeviceCount.argtypes = [ctypes.POINTER(ctypes.c_int)]
        rt.cudaSetDevice.argtypes = [ctypes.c_int]
        rt.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), IpcHandle, ctypes.c_uint]
        rt.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        rt.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        driver.cuMemGetAddressRange_v2.argtypes = [
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_uint64,
        ]

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            text = self._rt.cudaGetErrorString(status)
            shown = (text or b"").decode(errors="replace")
            raise InvalidArgument(f"{what}: CUDA error {status} ({shown})")

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        with self._lock:
            self._check(self._rt.cudaGetDeviceCount(ctypes.byref(count)), "cudaGetDeviceCount")
        return count.value

    def open(self, handle: bytes, device: int, what: str) -> tuple[int, int]:
        """Map a client's IPC handle on ``device``: (device pointer, bytes from it to the end of the
        allocation it points into)."""
        raw = IpcHandle.from_buffer_copy(handle)  # (the field itself reads as NUL-truncated bytes)
        pointer = ctypes.c_void_p()
        with self._lock:
            self._check(self._rt.cudaSetDevice(device), f"{what}: device {device}")
            self._check(
                self._rt.cudaIpcOpenMemHandle(ctypes.byref(pointer), raw, _LAZY_PEER_ACCESS),
                f"{what}: cannot open the CUDA IPC handle",
            )
            address = int(pointer.value or 0)
            base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
            status = self._drv.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), address)
            if status != 0:
                self._rt.cudaIpcCloseMemHandle(pointer)
                raise InvalidArgument(f"{what}: no allocation behind the handle (driver error {status})")
        return address, int(base.value) + int(size.value) - address

    def close(self, device: int, address: int) -> None:
        with self._lock:
            self._rt.cudaSetDevice(device)
            self._rt.cudaIpcCloseMemHandle(ctypes.c_void_p(address))

    def read(self, device: int, address: int, size: int) -> bytes:
        out = ctypes.create_string_buffer(size)
        with self._lock:
            self._check(self._rt.cudaSetDevice(device), f"device {device}")
            status = self._rt.cudaMemcpy(out, address, size, _DEVICE_TO_HOST)
            self._check(status, "copying from the device")
        return out.raw

    def write(self, device: int, address: int, data: bytes) -> None:
        with self._lock:
            self._check(self._rt.cudaSetDevice(device), f"device {device}")
            status = self._rt.cudaMemcpy(address, data, len(data), _HOST_TO_DEVICE)
            self._check(status, "copying to the device")


def load_runtime() -> CudaRuntime | str:
    """The CUDA runtime with at least one device, or why there is none here."""
    runtime = open_library()
    if runtime is None:
        return "the CUDA runtime library (libcudart) is not installed on this worker's host"
    driver = _open_first(DRIVER_NAMES)
    if driver is None:
        return "the CUDA driver library (libcuda.so.1) is not on this worker's host"
    try:
        cuda = CudaRuntime(runtime, driver)
        count = cuda.device_count()
    except (AttributeError, InvalidArgument) as err:  # an old library, or no usable device
        return f"the CUDA runtime did not start: {err}"
    if count < 1:
        return "this worker's host has no CUDA device"
    return cuda
