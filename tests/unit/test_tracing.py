"""Tracing without a server: off costs nothing, on builds the spans a trace needs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ferry.core import tracing
from ferry.core.errors import InvalidArgument

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    assert tracing.configure("test", {}, SimpleSpanProcessor(memory))
    try:
        yield memory
    finally:
        tracing.shutdown()


def test_off_by_default_and_then_every_helper_is_a_no_op() -> None:
    assert not tracing.configure("test", {}) and not tracing.enabled()
    with tracing.server_span("ModelInfer", [("traceparent", PARENT)]), tracing.span("x"):
        pass
    with tracing.batch_span("b", [None, None], 2) as batch:
        assert batch is None
    assert tracing.current() is None and tracing.outgoing() == []
    tracing.record("worker.queue", 1, 2)


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, "none"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": " Console "}, "console"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, "none"),
    ],
)
def test_the_standard_variables_choose_the_exporter(env: dict[str, str], want: str) -> None:
    assert tracing.chosen_exporter(env) == want


def test_an_exporter_ferry_does_not_have_is_refused() -> None:
    with pytest.raises(
        InvalidArgument, match="OTEL_TRACES_EXPORTER='zipkin': Ferry exports traces by none, otlp"
    ):
        tracing.chosen_exporter({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_a_server_span_continues_the_callers_trace_and_passes_itself_on(spans: InMemorySpanExporter) -> None:
    with tracing.server_span("ModelInfer", [("traceparent", PARENT), ("x-request-id", "r")]):
        with tracing.span("inner", **{"ferry.model": "m"}):
            outgoing = dict(tracing.outgoing())
        start = time.time_ns()
        tracing.record("worker.queue", start, start + 1000, **{"ferry.batch.id": 7})
    by_name = {s.name: s for s in spans.get_finished_spans()}
    server, inner, queue = by_name["ModelInfer"], by_name["inner"], by_name["worker.queue"]
    assert format(server.context.trace_id, "032x") == PARENT.split("-")[1]
    assert format(server.parent.span_id, "016x") == PARENT.split("-")[2]
    assert inner.parent.span_id == server.context.span_id == queue.parent.span_id
    assert queue.end_time - queue.start_time == 1000 and queue.attributes["ferry.batch.id"] == 7
    assert outgoing["traceparent"].split("-")[1:3] == [
        PARENT.split("-")[1],
        format(inner.context.span_id, "016x"),
    ]


def test_a_batch_span_sits_under_its_first_request_and_links_the_others(spans: InMemorySpanExporter) -> None:
    contexts = []
    for _ in range(3):
        with tracing.server_span("ModelInfer", []):
            contexts.append(tracing.current())

    async def dispatch() -> list[tuple[str, str]]:  # another task, as the coalescer's is
        with tracing.batch_span("gateway.batch", contexts, 5):
            return tracing.outgoing()

    outgoing = asyncio.run(dispatch())
    finished = spans.get_finished_spans()
    requests = [s for s in finished if s.name == "ModelInfer"]
    batch = next(s for s in finished if s.name == "gateway.batch")
    assert batch.parent.span_id == requests[0].context.span_id
    assert batch.context.trace_id == requests[0].context.trace_id
    assert [link.context.span_id for link in batch.links] == [r.context.span_id for r in requests[1:]]
    assert batch.attributes["ferry.batch.size"] == 5 and batch.attributes["ferry.batch.requests"] == 3
    assert dict(outgoing)["traceparent"].split("-")[2] == format(batch.context.span_id, "016x")
