"""One request's trace through a real gateway and a real worker.

Both run with ``OTEL_TRACES_EXPORTER=console``, which writes each finished span as one JSON line on
stderr; the test sends a request carrying its own W3C ``traceparent`` and rebuilds the span tree
from the two processes' output: the caller's span, the gateway's call, its local cache lookup and
its upstream batch, the worker's call under that batch, and the worker's queue wait and run, which
name the batch the request joined.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.integration.test_gateway import mlp_request, wait_until
from tests.support.deps import require_module
from tests.support.models import export_mlp, publish
from tests.support.procs import ServiceProcess

tc = require_module("tritonclient.grpc")
require_module("opentelemetry.sdk")

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"
CONSOLE = {"OTEL_TRACES_EXPORTER": "console"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    root = tmp_path_factory.mktemp("store")
    publish(root, "mlp", 1, export_mlp(Path(tmp_path_factory.mktemp("onnx")) / "mlp.onnx"))
    worker = ServiceProcess.serve(
        "worker", "--store", str(root), "--port", "0", "--poll-interval-s", "0", env=CONSOLE
    ).start()
    procs = {"worker": worker}
    try:
        procs["gateway"] = ServiceProcess.serve(
            "gateway", "--workers", worker.address, "--port", "0", "--http-port", "0", env=CONSOLE
        ).start()
        client = tc.InferenceServerClient(procs["gateway"].address)
        wait_until(lambda: client.is_model_ready("mlp"), 30, "mlp ready at the gateway")
        yield procs
    finally:
        for p in reversed(procs.values()):
            p.stop()


def spans_of(proc: ServiceProcess) -> list[dict[str, Any]]:
    out = []
    for line in list(proc.lines):
        if line.startswith("{") and '"context"' in line and '"trace_id"' in line:
            out.append(json.loads(line))
    return out


def trace_spans(stack: dict[str, ServiceProcess], want: int) -> dict[str, dict[str, Any]]:
    """The spans of our trace, by name, once ``want`` of them have been written."""
    deadline = time.monotonic() + 20
    while True:
        found = [
            s
            for p in stack.values()
            for s in spans_of(p)
            if s["context"]["trace_id"].removeprefix("0x") == TRACE
        ]
        if len(found) >= want or time.monotonic() > deadline:
            return {s["name"]: s for s in found}
        time.sleep(0.05)


def span_id(span: dict[str, Any]) -> str:
    return str(span["context"]["span_id"]).removeprefix("0x")


def parent_id(span: dict[str, Any]) -> str:
    return str(span["parent_id"] or "").removeprefix("0x")


def test_one_requests_span_tree_through_gateway_and_worker(stack: dict[str, ServiceProcess]) -> None:
    metadata = (("traceparent", f"00-{TRACE}-{CALLER}-01"),)
    with grpc.insecure_channel(stack["gateway"].address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            mlp_request(1, seed=99), timeout=30, metadata=metadata
        )
    assert response.outputs and np.frombuffer(response.raw_output_contents[0], np.float32).shape == (3,)
    names = (
        "ModelInfer",
        "gateway.cache.local",
        "gateway.batch",
        "gateway.upstream",
        "worker.queue",
        "worker.run",
    )
    spans = trace_spans(stack, len(names) + 1)
    gateway_calls = [
        s for s in spans_of(stack["gateway"]) if s["name"] == "ModelInfer" and parent_id(s) == CALLER
    ]
    worker_calls = [s for s in spans_of(stack["worker"]) if s["name"] == "ModelInfer"]
    assert len(gateway_calls) == 1, [s["name"] for s in spans.values()]
    call = gateway_calls[0]
    assert (
        call["kind"] == "SpanKind.SERVER"
        and call["resource"]["attributes"]["service.name"] == "ferry-gateway"
    )
    assert parent_id(spans["gateway.cache.local"]) == span_id(call)
    batch = spans["gateway.batch"]
    assert parent_id(batch) == span_id(call) and batch["attributes"]["ferry.batch.size"] == 1
    upstream = spans["gateway.upstream"]
    assert parent_id(upstream) == span_id(batch)
    at_worker = [s for s in worker_calls if parent_id(s) == span_id(upstream)]
    assert len(at_worker) == 1, "the worker's call continues the gateway's upstream span"
    assert at_worker[0]["resource"]["attributes"]["service.name"] == "ferry-worker"
    queue, run = spans["worker.queue"], spans["worker.run"]
    assert parent_id(queue) == parent_id(run) == span_id(at_worker[0])
    assert queue["attributes"]["ferry.batch.id"] == run["attributes"]["ferry.batch.id"] >= 1
    assert run["attributes"]["ferry.batch.size"] == 1 and run["attributes"]["ferry.model"] == "mlp"


def test_a_request_without_traceparent_starts_its_own_trace(stack: dict[str, ServiceProcess]) -> None:
    before = {span_id(s) for s in spans_of(stack["gateway"])}
    with grpc.insecure_channel(stack["gateway"].address) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(mlp_request(1, seed=7), timeout=30)
    deadline = time.monotonic() + 20
    fresh: list[dict[str, Any]] = []
    while not fresh and time.monotonic() < deadline:
        fresh = [
            s
            for s in spans_of(stack["gateway"])
            if s["name"] == "ModelInfer" and span_id(s) not in before and not s["parent_id"]
        ]
        time.sleep(0.05)
    assert fresh, "a root span for the untraced call"
