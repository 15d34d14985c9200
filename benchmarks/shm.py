"""Large tensors through the gRPC message vs through system shared memory, side by side.

``python -m benchmarks.shm`` starts one worker serving an add/sub model (two FP32 inputs of
``--width`` values per row, two outputs of the same size: 4 MB each at the default width), then
for each concurrency runs the same bounded loop twice with tritonclient: tensors in the
message, and tensors in per-client shared-memory regions. It prints one JSON line per point
and the shm/grpc ratios; every answer is checked against numpy.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.procs import ServerProcess
from benchmarks.stats import latency_summary

MODEL = "add_sub"


def export_add_sub(path: Path, width: int = 16, datatype: str = "INT32") -> Path:
    """Triton's ``simple`` model as ONNX: INPUT0, INPUT1 [batch, width] -> OUTPUT0 = sum,
    OUTPUT1 = difference, built with onnx.helper (no torch needed)."""
    import onnx
    from onnx import TensorProto, helper

    elem = {"INT32": TensorProto.INT32, "FP32": TensorProto.FLOAT}[datatype]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [helper.make_tensor_value_info(n, elem, ["batch", width]) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, elem, ["batch", width]) for n in ("OUTPUT0", "OUTPUT1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def triton_shm() -> types.ModuleType:
    """``tritonclient.utils.shared_memory``, importable here. The tritonclient this environment
    resolves (2.41: newer ones pin protobuf below 7) finds its bundled libcshm.so through
    ``pkg_resources``, which setuptools 81+ no longer ships; when it is missing, a stand-in
    answers that one call with the file beside the module. tritonclient itself is unchanged."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        def resource_filename(package: str, resource: str) -> str:
            spec = importlib.util.find_spec(package)
            assert spec is not None and spec.origin is not None
            return os.path.join(os.path.dirname(spec.origin), resource)

        shim.resource_filename = resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    return importlib.import_module("tritonclient.utils.shared_memory")


class Client:
    """One closed-loop caller: its own connection and, in shm mode, its own two regions."""

    def __init__(self, address: str, n: int, x0: np.ndarray, x1: np.ndarray, shm: bool) -> None:
        import tritonclient.grpc as tc

        shm_util = triton_shm()
        self.tc, self.shm_util = tc, shm_util
        self.client = tc.InferenceServerClient(address)
        self.x0, self.x1, self.shm = x0, x1, shm
        self.size = x0.nbytes
        self.handles: list[Any] = []
        self.names = (f"bench_in_{n}", f"bench_out_{n}")
        if shm:
            for name in self.names:
                handle = shm_util.create_shared_memory_region(name, f"/ferry_{name}", 2 * self.size)
                self.handles.append(handle)
                self.client.register_system_shared_memory(name, f"/ferry_{name}", 2 * self.size)

    def call(self) -> tuple[np.ndarray, np.ndarray]:
        tc = self.tc
        inputs = [tc.InferInput(f"INPUT{i}", list(self.x0.shape), "FP32") for i in (0, 1)]
        outputs = [tc.InferRequestedOutput(f"OUTPUT{i}") for i in (0, 1)]
        if not self.shm:
            inputs[0].set_data_from_numpy(self.x0)
            inputs[1].set_data_from_numpy(self.x1)
            result = self.client.infer(MODEL, inputs, outputs=outputs)
            return result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
        src, dst = self.names
        self.shm_util.set_shared_memory_region(self.handles[0], [self.x0])
        self.shm_util.set_shared_memory_region(self.handles[0], [self.x1], offset=self.size)
        for i in (0, 1):
            inputs[i].set_shared_memory(src, self.size, offset=i * self.size)
            outputs[i].set_shared_memory(dst, self.size, offset=i * self.size)
        self.client.infer(MODEL, inputs, outputs=outputs)
        get = self.shm_util.get_contents_as_numpy
        return tuple(  # type: ignore[return-value]
            get(self.handles[1], np.float32, list(self.x0.shape), offset=i * self.size).copy() for i in (0, 1)
        )

    def close(self) -> None:
        if self.shm:
            self.client.unregister_system_shared_memory()
            for handle in self.handles:
                self.shm_util.destroy_shared_memory_region(handle)
        self.client.close()


def measure(
    clients: list[Client], seconds: float, max_requests: int, check: Callable[[tuple[Any, Any]], None]
) -> dict[str, float]:
    """Every client calls in a closed loop until the time or the request budget runs out."""
    latencies: list[int] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    budget = [max_requests]
    errors: list[BaseException] = []

    def loop(c: Client) -> None:
        try:
            while time.monotonic() < stop:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                t0 = time.perf_counter_ns()
                answer = c.call()
                took = time.perf_counter_ns() - t0
                check(answer)
                with lock:
                    latencies.append(took)
        except BaseException as err:  # reported after the join: a failed point is no figure
            errors.append(err)

    for c in clients:  # one warm call each, outside the window
        check(c.call())
    threads = [threading.Thread(target=loop, args=(c,)) for c in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"requests": len(latencies), "rps": len(latencies) / wall, **latency_summary(latencies)}


def run(
    width: int, rows: int, concurrencies: list[int], seconds: float, max_requests: int
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((rows, width)).astype(np.float32)
    x1 = rng.standard_normal((rows, width)).astype(np.float32)
    want = (x0 + x1, x0 - x1)

    def check(answer: tuple[Any, Any]) -> None:
        for got, expected in zip(answer, want, strict=True):
            if not np.array_equal(got, expected):
                raise AssertionError("a wrong answer: the figures would mean nothing")

    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        folder = store / "models" / MODEL
        export_add_sub(folder / "1" / "model.onnx", width, "FP32")
        (folder / "config.json").write_text(json.dumps({"max_batch_size": 8}))
        message = 8 * x0.nbytes + (1 << 20)
        worker = ServerProcess.ferry(
            "worker", "worker", "--store", str(store), "--port", "0", "--max-message-bytes", str(message)
        ).start()
        try:
            for c in concurrencies:
                for mode in ("grpc", "shm"):
                    clients = [Client(worker.address, n, x0, x1, mode == "shm") for n in range(c)]
                    try:
                        point = measure(clients, seconds, max_requests, check)
                    finally:
                        for client in clients:
                            client.close()
                    point.update(mode=mode, concurrency=c, mb_per_request=round(4 * x0.nbytes / 1e6, 1))
                    points.append(point)
                    print(json.dumps(point), flush=True)
        finally:
            worker.stop()
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shm", description=__doc__)
    parser.add_argument("--width", type=int, default=1 << 20, help="FP32 values per row and tensor")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=5.0, help="longest time per point")
    parser.add_argument("--max-requests", type=int, default=400, help="most requests per point")
    args = parser.parse_args(argv)
    points = run(args.width, args.rows, args.concurrency, args.seconds, args.max_requests)
    by = {(p["mode"], p["concurrency"]): p for p in points}
    for c in args.concurrency:
        grpc_p, shm_p = by[("grpc", c)], by[("shm", c)]
        print(
            f"c={c}: shm/grpc throughput {shm_p['rps'] / grpc_p['rps']:.2f}x "
            f"({shm_p['rps']:.1f} vs {grpc_p['rps']:.1f} req/s), "
            f"p50 latency {shm_p['p50_ms'] / grpc_p['p50_ms']:.2f}x "
            f"({shm_p['p50_ms']:.2f} vs {grpc_p['p50_ms']:.2f} ms)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
