"""System shared memory on a real worker, driven by tritonclient as Triton's own example does,
every bad input with its status, the gateway's refusal, and a stream that batches."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from benchmarks.shm import triton_shm
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client.inference import build_request
from tests.integration.test_gateway import start_gateway, start_workers, stats, wait_until
from tests.support.deps import require_module
from tests.support.models import export_add_sub, publish
from tests.support.procs import ServiceProcess

tc = require_module("tritonclient.grpc")
utils = require_module("tritonclient.utils")
shm = triton_shm()

TAG = f"ferry_test_{os.getpid()}"  # keys of this run only: parallel runs share /dev/shm
MAX_REGIONS = 4


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    root = tmp_path_factory.mktemp("store")
    onnx_file = export_add_sub(tmp_path_factory.mktemp("onnx") / "simple.onnx", 16, "INT32")
    publish(root, "simple", 1, onnx_file, {"max_batch_size": 64, "dynamic_batching": {}})
    workers = start_workers(root, 1, "--shm-max-regions", str(MAX_REGIONS))
    procs = list(workers)
    try:
        procs.append(start_gateway(workers))
        for p in procs:
            client = tc.InferenceServerClient(p.address)
            wait_until(lambda c=client: c.is_model_ready("simple"), 30, f"simple ready at {p.address}")
        yield {"worker": procs[0], "gateway": procs[1]}
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture
def triton(servers: dict[str, ServiceProcess]) -> Iterator[Any]:
    client = tc.InferenceServerClient(servers["worker"].address)
    client.unregister_system_shared_memory()
    yield client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture
def regions() -> Iterator[Callable[[str, int], Any]]:
    """Creates shm objects for one test and destroys them after it."""
    made: list[Any] = []

    def make(name: str, size: int) -> Any:
        handle = shm.create_shared_memory_region(name, f"/{TAG}_{name}", size)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def key(name: str) -> str:
    return f"/{TAG}_{name}"


def fails(call: Callable[[], Any], status: str, *words: str) -> None:
    with pytest.raises(utils.InferenceServerException) as info:
        call()
    assert info.value.status() == f"StatusCode.{status}", info.value
    for word in words:
        assert word in info.value.message(), info.value.message()


def add_sub_inputs(
    name: str, size: int, *, byte_size: int | None = None, shape: list[int] | None = None
) -> list[Any]:
    inputs = [tc.InferInput(f"INPUT{i}", shape or [1, 16], "INT32") for i in (0, 1)]
    for i, inp in enumerate(inputs):
        inp.set_shared_memory(name, byte_size or size, offset=i * size)
    return inputs


# --- Triton's simple_grpc_shm_client flow, unchanged client code ----------------------------------


def test_triton_shm_example_flow(triton: Any, regions: Callable[[str, int], Any]) -> None:
    triton.unregister_system_shared_memory()
    triton.unregister_cuda_shared_memory()  # the example starts clean of both kinds
    x0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    x1 = np.ones((1, 16), dtype=np.int32)
    size = x0.nbytes
    out = regions("output_data", 2 * size)
    triton.register_system_shared_memory("output_data", key("output_data"), 2 * size)
    inp = regions("input_data", 2 * size)
    shm.set_shared_memory_region(inp, [x0])
    shm.set_shared_memory_region(inp, [x1], offset=size)
    triton.register_system_shared_memory("input_data", key("input_data"), 2 * size)
    status = triton.get_system_shared_memory_status()
    assert {r.name: (r.key, r.byte_size) for r in status.regions.values()} == {
        "output_data": (key("output_data"), 2 * size),
        "input_data": (key("input_data"), 2 * size),
    }
    outputs = [tc.InferRequestedOutput(f"OUTPUT{i}") for i in (0, 1)]
    for i, o in enumerate(outputs):
        o.set_shared_memory("output_data", size, offset=i * size)
    result = triton.infer("simple", add_sub_inputs("input_data", size), outputs=outputs)
    got = []
    for i in (0, 1):
        tensor = result.get_output(f"OUTPUT{i}")
        assert tensor is not None and tensor.datatype == "INT32" and list(tensor.shape) == [1, 16]
        got.append(
            shm.get_contents_as_numpy(
                out, utils.triton_to_np_dtype(tensor.datatype), tensor.shape, offset=i * size
            )
        )
    np.testing.assert_array_equal(got[0], x0 + x1)
    np.testing.assert_array_equal(got[1], x0 - x1)
    assert not result.get_response().raw_output_contents  # the results live in the region only
    triton.unregister_system_shared_memory("input_data")
    assert list(triton.get_system_shared_memory_status().regions) == ["output_data"]


def test_shm_input_with_plain_output(triton: Any, regions: Callable[[str, int], Any]) -> None:
    x0 = np.full((1, 16), 5, np.int32)
    x1 = np.full((1, 16), 2, np.int32)
    inp = regions("mixed_in", 2 * x0.nbytes)
    shm.set_shared_memory_region(inp, [x0, x1])
    triton.register_system_shared_memory("mixed_in", key("mixed_in"), 2 * x0.nbytes)
    result = triton.infer("simple", add_sub_inputs("mixed_in", x0.nbytes))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x0 + x1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x0 - x1)


# --- bad inputs, each with its status ---------------------------------------------------------------


def test_register_refusals(triton: Any, regions: Callable[[str, int], Any]) -> None:
    fails(
        lambda: triton.register_system_shared_memory("ghost", key("ghost"), 64), "NOT_FOUND", "does not exist"
    )
    for bad in ("/a/b", "/..", "../etc/passwd", "/dev/shm/x"):
        fails(
            lambda b=bad: triton.register_system_shared_memory("bad", b, 64),
            "INVALID_ARGUMENT",
            "plain POSIX shm name",
        )
    regions("r0", 64)
    fails(
        lambda: triton.register_system_shared_memory("r0", key("r0"), 64, offset=32),
        "INVALID_ARGUMENT",
        "runs past the end",
    )
    triton.register_system_shared_memory("r0", key("r0"), 64)
    fails(lambda: triton.register_system_shared_memory("r0", key("r0"), 64), "ALREADY_EXISTS", "'r0'")
    triton.unregister_system_shared_memory("never_registered")  # the spec's no-op, not an error
    for n in range(1, MAX_REGIONS):
        regions(f"r{n}", 64)
        triton.register_system_shared_memory(f"r{n}", key(f"r{n}"), 64)
    regions("one_too_many", 64)
    fails(
        lambda: triton.register_system_shared_memory("one_too_many", key("one_too_many"), 64),
        "RESOURCE_EXHAUSTED",
        f"limit is {MAX_REGIONS}",
    )
    fails(lambda: triton.get_system_shared_memory_status("ghost"), "NOT_FOUND", "'ghost'")
    fails(
        lambda: triton.register_cuda_shared_memory("gpu", base64.b64encode(b"handle"), 0, 64),
        "UNIMPLEMENTED",
        "CUDA",
    )


def test_infer_refusals(triton: Any, regions: Callable[[str, int], Any]) -> None:
    size = 64  # one [1, 16] INT32 tensor
    regions("io", 2 * size)
    triton.register_system_shared_memory("io", key("io"), 2 * size)
    regions("small_out", size)
    triton.register_system_shared_memory("small_out", key("small_out"), size)
    fails(lambda: triton.infer("simple", add_sub_inputs("nowhere", size)), "NOT_FOUND", "'nowhere'")
    fails(
        lambda: triton.infer("simple", add_sub_inputs("io", size, byte_size=size - 4)),
        "INVALID_ARGUMENT",
        "does not match shape",
    )
    fails(
        lambda: triton.infer("simple", add_sub_inputs("io", 2 * size, shape=[2, 16])),
        "INVALID_ARGUMENT",
        "runs past the end of region 'io'",
    )
    outputs = [tc.InferRequestedOutput("OUTPUT0")]
    outputs[0].set_shared_memory("small_out", size // 2)
    fails(
        lambda: triton.infer("simple", add_sub_inputs("io", size), outputs=outputs),
        "INVALID_ARGUMENT",
        "too small",
    )


def test_gateway_refuses_shared_memory(servers: dict[str, ServiceProcess]) -> None:
    client = tc.InferenceServerClient(servers["gateway"].address)
    fails(
        lambda: client.register_system_shared_memory("g", "/g", 64),
        "UNIMPLEMENTED",
        "not available through the gateway",
    )
    fails(lambda: client.get_system_shared_memory_status(), "UNIMPLEMENTED", "client's host")
    fails(
        lambda: client.infer("simple", add_sub_inputs("g", 64)),
        "INVALID_ARGUMENT",
        "input 'INPUT0'",
        "gateway",
    )


# --- a stream's requests run concurrently and batch --------------------------------------------------


def test_stream_requests_batch_and_keep_their_ids(servers: dict[str, ServiceProcess]) -> None:
    worker = servers["worker"].address
    n = 200
    values = {str(i): np.full((1, 16), i, np.int32) for i in range(n)}
    requests = []
    for rid, x in values.items():
        request = build_request("simple", {"INPUT0": x, "INPUT1": np.ones_like(x)})
        request.id = rid
        requests.append(request)
    before = stats(worker, "simple")
    with grpc.insecure_channel(worker) as channel:
        answers = list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=60))
    after = stats(worker, "simple")
    assert len(answers) == n and not any(a.error_message for a in answers)
    for answer in answers:
        response = answer.infer_response
        got = dict(zip((o.name for o in response.outputs), response.raw_output_contents, strict=True))
        x = values[response.id]
        assert np.frombuffer(got["OUTPUT0"], np.int32).tolist() == (x + 1).ravel().tolist()
        assert np.frombuffer(got["OUTPUT1"], np.int32).tolist() == (x - 1).ravel().tolist()
    assert sorted(a.infer_response.id for a in answers) == sorted(values)
    assert after.inference_stats.success.count - before.inference_stats.success.count == n
    assert after.execution_count - before.execution_count < n  # batched, not one run per request


def test_stream_error_keeps_its_id(servers: dict[str, ServiceProcess]) -> None:
    good = build_request(
        "simple", {"INPUT0": np.zeros((1, 16), np.int32), "INPUT1": np.zeros((1, 16), np.int32)}
    )
    good.id = "good"
    bad = pb.ModelInferRequest(model_name="simple", id="bad")
    with grpc.insecure_channel(servers["worker"].address) as channel:
        answers = list(
            pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([bad, good]), timeout=30)
        )
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"good", "bad"}
    assert "missing input" in by_id["bad"].error_message and not by_id["good"].error_message


def test_worker_lists_the_extension(servers: dict[str, ServiceProcess]) -> None:
    meta = tc.InferenceServerClient(servers["worker"].address).get_server_metadata()
    assert "system_shared_memory" in meta.extensions and "cuda_shared_memory" not in meta.extensions
