"""Triton's CUDA shared memory against a worker started with ``--cuda-shm``.

Everywhere: the worker says why it does not offer it when it cannot (no CUDA runtime or device),
and lists the extension only when it does. On a GPU host (``gpu`` marker): the client's device
memory, allocated and exported here with the CUDA runtime itself, carries the inputs and receives
the outputs of Triton's add/sub example, registered and used with tritonclient's own calls.
"""

from __future__ import annotations

import base64
import ctypes
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from services.inference.cuda_ipc import HANDLE_BYTES, IpcHandle, load_runtime, open_library
from tests.integration.test_gateway import start_workers, wait_until
from tests.support.deps import require_module
from tests.support.models import export_add_sub, publish
from tests.support.procs import free_port

tc = require_module("tritonclient.grpc")
utils = require_module("tritonclient.utils")
FOUND = load_runtime()
needs_cuda = pytest.mark.skipif(isinstance(FOUND, str), reason=f"no CUDA here: {FOUND}")


@dataclass(frozen=True)
class Worker:
    address: str
    http_port: int


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    root = tmp_path_factory.mktemp("store")
    onnx_file = export_add_sub(tmp_path_factory.mktemp("onnx") / "simple.onnx", 16, "INT32")
    publish(root, "simple", 1, onnx_file, {"max_batch_size": 8, "dynamic_batching": {}})
    http_port = free_port()
    (proc,) = start_workers(root, 1, "--cuda-shm", "--http-port", str(http_port))
    try:
        client = tc.InferenceServerClient(proc.address)
        wait_until(lambda: client.is_model_ready("simple"), 30, "simple ready")
        yield Worker(proc.address, http_port)
    finally:
        proc.stop()


def test_the_extension_is_listed_exactly_when_offered(worker: Worker) -> None:
    extensions = tc.InferenceServerClient(worker.address).get_server_metadata().extensions
    assert ("cuda_shared_memory" in extensions) == (not isinstance(FOUND, str))


@pytest.mark.skipif(not isinstance(FOUND, str), reason="CUDA is here: the refusal does not apply")
def test_without_cuda_registering_says_why(worker: Worker) -> None:
    client = tc.InferenceServerClient(worker.address)
    with pytest.raises(utils.InferenceServerException) as info:
        client.register_cuda_shared_memory("gpu", base64.b64encode(b"\0" * HANDLE_BYTES), 0, 64)
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert f"CUDA shared memory is not offered on this worker ({FOUND})" in str(info.value)
    client.unregister_cuda_shared_memory()  # the spec's no-op: clients start clean this way
    assert client.get_cuda_shared_memory_status().regions == {}


def register_over_rest(worker: Worker, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{worker.http_port}/v2/cudasharedmemory/region/gpu/register",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_rest_takes_triton_s_b64_handle(worker: Worker) -> None:
    handle = base64.b64encode(b"\0" * HANDLE_BYTES).decode()
    good = json.dumps({"raw_handle": {"b64": handle}, "device_id": 0, "byte_size": 64}).encode()
    status, doc = register_over_rest(worker, good)
    if isinstance(FOUND, str):
        assert status == 501 and "CUDA shared memory is not offered on this worker" in doc["error"], doc
    else:  # a handle of zeros opens nothing: the CUDA error, as a bad argument
        assert status == 400 and "cannot open the CUDA IPC handle" in doc["error"], doc
    bad = json.dumps({"raw_handle": {"b64": "not base64!"}, "device_id": 0, "byte_size": 64}).encode()
    status, doc = register_over_rest(worker, bad)
    assert status == 400 and 'raw_handle must be {"b64": "<base64>"}' in doc["error"], doc


class DeviceBuffer:
    """Device memory this test owns, exported as a CUDA IPC handle for the worker to open."""

    def __init__(self, size: int) -> None:
        rt = open_library()
        assert rt is not None
        self.rt, self.size = rt, size
        self.pointer = ctypes.c_void_p()
        assert rt.cudaMalloc(ctypes.byref(self.pointer), ctypes.c_size_t(size)) == 0
        handle = IpcHandle()
        assert rt.cudaIpcGetMemHandle(ctypes.byref(handle), self.pointer) == 0
        self.handle = ctypes.string_at(ctypes.addressof(handle), HANDLE_BYTES)

    def put(self, data: bytes, offset: int = 0) -> None:
        target = ctypes.c_void_p((self.pointer.value or 0) + offset)
        assert self.rt.cudaMemcpy(target, data, ctypes.c_size_t(len(data)), 1) == 0

    def get(self, size: int, offset: int = 0) -> bytes:
        out = ctypes.create_string_buffer(size)
        source = ctypes.c_void_p((self.pointer.value or 0) + offset)
        assert self.rt.cudaMemcpy(out, source, ctypes.c_size_t(size), 2) == 0
        return out.raw

    def free(self) -> None:
        self.rt.cudaFree(self.pointer)


@pytest.mark.gpu
@needs_cuda
def test_inputs_and_outputs_travel_through_device_memory(worker: Worker) -> None:
    size = 64  # one [1, 16] INT32 tensor
    inputs, outputs, spare = DeviceBuffer(2 * size), DeviceBuffer(2 * size), DeviceBuffer(size)
    client: Any = tc.InferenceServerClient(worker.address)
    try:
        x0 = np.arange(16, dtype=np.int32).reshape(1, 16)
        x1 = np.full((1, 16), 3, dtype=np.int32)
        inputs.put(x0.tobytes() + x1.tobytes())
        client.register_cuda_shared_memory("in", base64.b64encode(inputs.handle), 0, 2 * size)
        client.register_cuda_shared_memory("out", base64.b64encode(outputs.handle), 0, 2 * size)
        status = client.get_cuda_shared_memory_status().regions
        assert {name: (r.device_id, r.byte_size) for name, r in status.items()} == {
            "in": (0, 2 * size),
            "out": (0, 2 * size),
        }
        sent = []
        for n in range(2):
            tensor = tc.InferInput(f"INPUT{n}", [1, 16], "INT32")
            tensor.set_shared_memory("in", size, offset=n * size)
            sent.append(tensor)
        asked = []
        for n in range(2):
            out = tc.InferRequestedOutput(f"OUTPUT{n}")
            out.set_shared_memory("out", size, offset=n * size)
            asked.append(out)
        client.infer("simple", sent, outputs=asked)
        got = np.frombuffer(outputs.get(2 * size), np.int32).reshape(2, 16)
        np.testing.assert_array_equal(got[0], (x0 + x1)[0])
        np.testing.assert_array_equal(got[1], (x0 - x1)[0])
        with pytest.raises(
            utils.InferenceServerException, match="runs past the end of the device allocation"
        ):
            client.register_cuda_shared_memory("big", base64.b64encode(spare.handle), 0, 4 * size)
    finally:
        client.unregister_cuda_shared_memory()
        for buffer in (inputs, outputs, spare):
            buffer.free()
