"""A real worker process on a loopback port, driven by the Ferry client and by tritonclient."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.client.inference import InferenceClient, SyncInferenceClient, build_request
from ferry.core.errors import DeadlineExceeded, InvalidArgument, ModelUnavailable, NotFound, ResourceExhausted
from tests.support.deps import require_module
from tests.support.gate import HELD_ROWS, held_config, until_metric
from tests.support.models import export_cnn, export_mlp, ort_run, publish
from tests.support.procs import ServiceProcess

tc = require_module("tritonclient.grpc")


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    return {
        "mlp": export_mlp(d / "mlp.onnx"),
        "mlp2": export_mlp(d / "mlp2.onnx", seed=1),
        "cnn": export_cnn(d / "cnn.onnx"),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, onnx_files: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("store")
    publish(root, "mlp", 1, onnx_files["mlp"], {"max_batch_size": 16})
    publish(root, "cnn", 1, onnx_files["cnn"])
    publish(root, "held", 1, onnx_files["mlp"], held_config())
    publish(root, "full", 1, onnx_files["mlp"], held_config(dynamic_batching={"max_queue_size": 2}))
    broken = root / "models" / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not an onnx file")
    return root


@pytest.fixture(scope="module")
def metrics_port() -> int:
    from tests.support.procs import free_port

    return free_port()


@pytest.fixture(scope="module")
def worker(store: Path, metrics_port: int) -> Iterator[ServiceProcess]:
    proc = ServiceProcess.serve(
        "worker",
        "--store",
        str(store),
        "--port",
        "0",
        "--poll-interval-s",
        "0.3",
        "--max-message-bytes",
        "1048576",
        "--metrics-port",
        str(metrics_port),
    ).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(worker: ServiceProcess) -> Iterator[SyncInferenceClient]:
    with SyncInferenceClient(worker.address) as c:
        yield c


@pytest.fixture(scope="module")
def triton(worker: ServiceProcess) -> object:
    return tc.InferenceServerClient(worker.address)


def triton_input(name: str, array: np.ndarray, datatype: str = "FP32") -> object:
    inp = tc.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


# --- every RPC through tritonclient -----------------------------------------------------------


def test_triton_health_and_metadata(triton: object) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("mlp") and not triton.is_model_ready("broken")
    meta = triton.get_server_metadata()
    assert meta.name == "ferry" and "statistics" in meta.extensions and "model_repository" in meta.extensions
    model = triton.get_model_metadata("cnn")
    assert (
        model.versions == ["1"]
        and model.inputs[0].datatype == "FP32"
        and list(model.inputs[0].shape) == [-1, 3, 8, 8]
    )
    config = triton.get_model_config("mlp").config
    assert (
        config.max_batch_size == 16
        and config.platform == "onnxruntime_onnx"
        and list(config.input[0].dims) == [8]
    )


@pytest.mark.parametrize(("model", "shape"), [("mlp", (5, 8)), ("cnn", (3, 3, 8, 8))])
def test_triton_infer_matches_onnxruntime(
    triton: object, onnx_files: dict[str, Path], model: str, shape: tuple
) -> None:
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    result = triton.infer(model, [triton_input("input", x)], outputs=[tc.InferRequestedOutput("output")])
    np.testing.assert_allclose(result.as_numpy("output"), ort_run(onnx_files[model], x), atol=1e-5)


def test_triton_stream_infer(triton: object, onnx_files: dict[str, Path]) -> None:
    results: list[object] = []
    triton.start_stream(callback=lambda result, error: results.append(error or result))
    x = np.ones((2, 8), np.float32)
    try:
        for i in range(3):
            triton.async_stream_infer("mlp", [triton_input("input", x)], request_id=str(i))
        triton.async_stream_infer(
            "mlp", [triton_input("input", np.ones((2, 7), np.float32))], request_id="bad"
        )
        deadline = time.monotonic() + 20
        while len(results) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        triton.stop_stream()
    good = [r for r in results if not isinstance(r, Exception)]
    bad = [r for r in results if isinstance(r, Exception)]
    assert len(good) == 3 and len(bad) == 1 and "does not match" in str(bad[0])
    for r in good:
        np.testing.assert_allclose(r.as_numpy("output"), ort_run(onnx_files["mlp"], x), atol=1e-5)


def test_triton_repository_and_statistics(triton: object) -> None:
    index = {m.name: m for m in triton.get_model_repository_index().models}
    assert index["mlp"].state == "READY" and index["broken"].state == "UNAVAILABLE"
    # the kind and an incident id; ONNX Runtime's own text (with the file's path) stays in the log
    reason = index["broken"].reason
    assert reason.startswith("failed to load: InvalidProtobuf (incident ") and "/" not in reason
    before = triton.get_inference_statistics("mlp").model_stats[0]
    triton.infer("mlp", [triton_input("input", np.ones((3, 8), np.float32))])
    stats = triton.get_inference_statistics("mlp").model_stats[0]
    assert stats.name == "mlp"
    assert stats.inference_count - before.inference_count == 3  # rows
    assert stats.execution_count - before.execution_count == 1
    assert stats.inference_stats.success.count - before.inference_stats.success.count == 1
    assert stats.inference_stats.queue.count - before.inference_stats.queue.count == 1
    assert stats.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    triton.unload_model("cnn")
    assert not triton.is_model_ready("cnn")
    with pytest.raises(tc.InferenceServerException, match="not loaded"):
        triton.infer("cnn", [triton_input("input", np.ones((1, 3, 8, 8), np.float32))])
    triton.load_model("cnn")
    assert triton.is_model_ready("cnn")


# --- the Ferry client -------------------------------------------------------------------------


def test_client_infer_int_and_outputs(client: SyncInferenceClient, onnx_files: dict[str, Path]) -> None:
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    result = client.infer("mlp", {"input": x}, request_id="abc")
    assert result.id == "abc" and result.model_version == "1"
    np.testing.assert_allclose(result["output"], ort_run(onnx_files["mlp"], x), atol=1e-5)


def test_concurrent_requests_are_batched(worker: ServiceProcess, onnx_files: dict[str, Path]) -> None:
    # The held model runs only whole batches of HELD_ROWS rows: two batches' worth of one-row
    # calls must run as exactly two executions, whatever the calls' arrival times.
    xs = [np.random.default_rng(i).standard_normal((1, 8)).astype(np.float32) for i in range(2 * HELD_ROWS)]

    async def run() -> tuple[list[object], object]:
        async with InferenceClient(worker.address) as c:
            before = (await c.statistics("held")).model_stats[0]
            results = await asyncio.gather(*(c.infer("held", {"input": x}, timeout=60) for x in xs))
            after = (await c.statistics("held")).model_stats[0]
            return results, (before, after)

    results, (before, after) = asyncio.run(run())
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_allclose(r["output"], ort_run(onnx_files["mlp"], x), atol=1e-5)
    assert after.inference_count - before.inference_count == 2 * HELD_ROWS
    assert after.execution_count - before.execution_count == 2
    sizes = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    was = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    assert sizes[HELD_ROWS] - was.get(HELD_ROWS, 0) == 2


# --- bad input --------------------------------------------------------------------------------


def test_unknown_model_and_version(client: SyncInferenceClient) -> None:
    x = {"input": np.ones((1, 8), np.float32)}
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        client.infer("nope", x)
    with pytest.raises(NotFound, match="has no version 9"):
        client.infer("mlp", x, version=9)
    with pytest.raises(InvalidArgument, match="invalid model version 'x'"):
        client.infer("mlp", x, version="x")


def raw_request(
    shape: list[int], datatype: str = "FP32", raw: bytes | None = None, name: str = "input"
) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name=name, datatype=datatype, shape=shape)
    count = int(np.prod(shape)) if shape else 1
    r.raw_input_contents.append(raw if raw is not None else b"\0" * 4 * count)
    return r


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.ModelInferRequest(model_name="mlp"), "missing input(s) 'input'"),
        (raw_request([1, 8], name="features"), "has no input 'features'"),
        (
            raw_request([1, 8], datatype="FP64", raw=b"\0" * 64),
            "datatype FP64 does not match the model's FP32",
        ),
        (raw_request([8]), "has rank 1 but the model expects [-1, 8]"),
        (raw_request([1, 9]), "shape [1, 9] does not match the model's [-1, 8]"),
        (raw_request([1, 8], raw=b"\0" * 31), "raw content is 31 bytes but shape [1, 8] of FP32 needs 32"),
        (raw_request([17, 8]), "batch size 17 exceeds the model's max_batch_size 16"),
        (raw_request([0, 8]), "empty batch"),
    ],
    ids=["missing", "unknown-input", "dtype", "rank", "dims", "byte-size", "batch-limit", "empty-batch"],
)
def test_bad_inputs_are_invalid_argument(
    client: SyncInferenceClient, request_: pb.ModelInferRequest, message: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.infer_request(request_)
    assert message in err.value.message


def test_mixed_raw_and_typed_contents(client: SyncInferenceClient) -> None:
    r = raw_request([1, 8])
    typed = r.inputs.add(name="extra", datatype="FP32", shape=[1])
    typed.contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgument, match="raw and typed contents cannot be mixed"):
        client.infer_request(r)


def test_unknown_requested_output(client: SyncInferenceClient) -> None:
    with pytest.raises(InvalidArgument, match="has no output 'probs'"):
        client.infer("mlp", {"input": np.ones((1, 8), np.float32)}, outputs=["probs"])


def test_message_over_limit_is_resource_exhausted(client: SyncInferenceClient) -> None:
    with pytest.raises(ResourceExhausted, match="larger than max"):
        client.infer("mlp", {"input": np.ones((16, 20000), np.float32)})


def test_typed_contents_are_accepted(client: SyncInferenceClient, onnx_files: dict[str, Path]) -> None:
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="input", datatype="FP32", shape=[1, 8]).contents.fp32_contents.extend(
        x.ravel().tolist()
    )
    from ferry.core.codec import decode_outputs

    out = decode_outputs(client.infer_request(r))["output"]
    np.testing.assert_allclose(out, ort_run(onnx_files["mlp"], x), atol=1e-5)


def test_full_queue_is_resource_exhausted(
    worker: ServiceProcess, metrics_port: int, onnx_files: dict[str, Path]
) -> None:
    x = np.ones((1, 8), np.float32)
    whole = np.ones((HELD_ROWS, 8), np.float32)

    async def run() -> tuple[ResourceExhausted, dict]:
        async with InferenceClient(worker.address) as c:
            held = [asyncio.create_task(c.infer("full", {"input": x}, timeout=60)) for _ in range(2)]
            await until_metric(metrics_port, "ferry_worker_queue_depth", 2, model="full")
            with pytest.raises(ResourceExhausted) as refused:
                await c.infer("full", {"input": x}, timeout=60)
            for t in held:
                t.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            # callers that gave up leave the queue at once: it takes a whole batch again
            await until_metric(metrics_port, "ferry_worker_queue_depth", 0, model="full")
            return refused.value, await c.infer("full", {"input": whole}, timeout=60)

    refused, answer = asyncio.run(run())
    assert refused.message == "queue of model full:1 is full (2 requests)"
    np.testing.assert_allclose(answer["output"], ort_run(onnx_files["mlp"], whole), atol=1e-5)


def test_deadline_expired_in_queue_is_not_run(worker: ServiceProcess) -> None:
    async def run() -> tuple[object, int, int]:
        async with InferenceClient(worker.address) as c:
            before = (await c.statistics("held")).model_stats[0].inference_count
            # one row of a held model waits for seven more that never come, past its deadline
            late = await asyncio.gather(
                c.infer("held", {"input": np.ones((1, 8), np.float32)}, timeout=0.5), return_exceptions=True
            )
            await c.infer("held", {"input": np.ones((HELD_ROWS, 8), np.float32)}, timeout=60)
            after = (await c.statistics("held")).model_stats[0].inference_count
            return late[0], before, after

    late, before, after = asyncio.run(run())
    assert isinstance(late, DeadlineExceeded)
    assert after - before == HELD_ROWS, "only the whole batch ran; the expired request left the queue"


def test_an_unloaded_model_says_so_with_its_reason(
    client: SyncInferenceClient, store: Path, onnx_files: dict[str, Path]
) -> None:
    publish(store, "gone", 1, onnx_files["mlp"])
    client.load("gone")
    client.unload("gone")
    with pytest.raises(ModelUnavailable) as err:  # the reason travels in the trailing metadata
        client.infer("gone", {"input": np.ones((1, 8), np.float32)})
    assert err.value.message == "model 'gone' has no version ready (the model is not loaded)"


def test_corrupt_model_does_not_stop_the_others(client: SyncInferenceClient) -> None:
    index = {(m.name, m.version): m for m in client.repository_index()}
    assert index[("broken", "1")].state == "UNAVAILABLE" and "failed to load" in index[("broken", "1")].reason
    assert client.model_ready("mlp")


# --- versions, hot swap and drain ------------------------------------------------------------


def test_load_and_unload_a_specific_version(
    client: SyncInferenceClient, store: Path, onnx_files: dict[str, Path]
) -> None:
    publish(store, "pinned", 1, onnx_files["mlp"])
    publish(store, "pinned", 2, onnx_files["mlp2"])
    deadline = time.monotonic() + 20
    while not client.model_ready("pinned", 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.model_ready("pinned", 2) and not client.model_ready("pinned", 1)  # latest 1 by default
    client.load("pinned", version=1)
    assert client.model_ready("pinned", 1) and client.model_ready("pinned", 2)
    client.unload("pinned", version=2)
    assert not client.model_ready("pinned", 2) and client.model_ready("pinned", 1)
    assert client.infer("pinned", {"input": np.ones((1, 8), np.float32)}).model_version == "1"
    with pytest.raises(NotFound, match="no version 5"):
        client.load("pinned", version=5)


def test_hot_swap_under_load_fails_nothing(
    worker: ServiceProcess, store: Path, onnx_files: dict[str, Path]
) -> None:
    shutil.copytree(store / "models" / "mlp", store / "models" / "swap")
    x = np.ones((1, 8), np.float32)
    expected = {"1": ort_run(onnx_files["mlp"], x), "2": ort_run(onnx_files["mlp2"], x)}

    async def run() -> tuple[list[str], int]:
        async with InferenceClient(worker.address) as c:
            ready_by = time.monotonic() + 30
            while not await c.model_ready("swap"):
                assert time.monotonic() < ready_by, "model 'swap' never became ready"
                await asyncio.sleep(0.1)
            seen: list[str] = []
            failures = 0
            stop_at = time.monotonic() + 30

            async def loop() -> None:
                nonlocal failures
                while time.monotonic() < stop_at and seen.count("2") < 50:
                    try:
                        r = await c.infer("swap", {"input": x})
                    except Exception:
                        failures += 1
                        continue
                    np.testing.assert_allclose(r["output"], expected[r.model_version], atol=1e-5)
                    seen.append(r.model_version)

            tasks = [asyncio.create_task(loop()) for _ in range(8)]
            while len(seen) < 40 and time.monotonic() < stop_at:  # the load is running on version 1
                await asyncio.sleep(0.01)
            publish(store, "swap", 2, onnx_files["mlp2"])
            await asyncio.gather(*tasks)
            return seen, failures

    seen, failures = asyncio.run(run())
    assert failures == 0
    assert "1" in seen and "2" in seen
    assert seen.index("2") > 0 and "1" not in seen[seen.index("2") + 8 * 2 :], "the old version kept serving"


def test_sigterm_drains_in_flight_requests(store: Path) -> None:
    from tests.support.procs import free_port

    port = free_port()
    proc = ServiceProcess.serve(
        "worker",
        "--store",
        str(store),
        "--port",
        "0",
        "--models",
        "held",
        "--poll-interval-s",
        "0",
        "--metrics-port",
        str(port),
    ).start()
    x = np.ones((1, 8), np.float32)

    async def run() -> list[object]:
        async with InferenceClient(proc.address) as c:
            tasks = [asyncio.create_task(c.infer("held", {"input": x}, timeout=60)) for _ in range(2)]
            # Signal once both calls wait inside the worker (a held model runs only whole
            # batches), so the test proves a drain of queued work, not a refusal of calls not yet
            # arrived: the drain must send on the batch it was holding back.
            await until_metric(port, "ferry_worker_in_flight", 2)
            assert not any(t.done() for t in tasks), "a held call finished before the drain"
            proc.signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(run())
        assert proc.wait(30) == 0
    finally:
        proc.stop()
    assert all(isinstance(r, dict) for r in results), [
        repr(r)[:200] for r in results if not isinstance(r, dict)
    ]
    assert '"stopping: draining in-flight calls"' in proc.output()


def test_health_service_reports_serving(worker: ServiceProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(worker.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_request_builder_round_trip() -> None:
    r = build_request("m", {"a": np.zeros((1, 2), np.int64)}, parameters={"priority": 1, "x": "y"})
    assert r.inputs[0].datatype == "INT64" and r.parameters["priority"].int64_param == 1
    assert json.dumps(list(r.inputs[0].shape)) == "[1, 2]"


def test_prometheus_metrics(store: Path) -> None:
    import urllib.request

    from tests.support.procs import free_port

    port = free_port()
    proc = ServiceProcess.serve(
        "worker", "--store", str(store), "--port", "0", "--models", "mlp", "--metrics-port", str(port)
    ).start()
    try:
        with SyncInferenceClient(proc.address) as c:
            c.infer("mlp", {"input": np.ones((1, 8), np.float32)})
            with pytest.raises(NotFound):
                c.infer("nope", {"input": np.ones((1, 8), np.float32)})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        proc.stop()
    assert 'ferry_worker_requests_total{model="mlp",status="OK"} 1.0' in body
    assert 'ferry_worker_requests_total{model="_unknown",status="NOT_FOUND"} 1.0' in body
    assert "ferry_worker_request_seconds_bucket" in body
