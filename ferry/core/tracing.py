"""Tracing with OpenTelemetry: where a request's time went, across gateway, cache, batch and run.

Off by default, and then nearly free: every helper here returns at once (a shared no-op context
manager, no OpenTelemetry import). It is turned on by the standard variable
``OTEL_TRACES_EXPORTER``: ``otlp`` sends spans over OTLP/gRPC, configured by the SDK's own
``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers, certificates); ``console`` writes each span
as one JSON line on stderr, for a look without a collector (and for the tests). ``OTEL_SERVICE_NAME``
names the service (default ``ferry-<service>``); ``OTEL_SDK_DISABLED=true`` wins over the rest.

A call's W3C ``traceparent`` (gRPC metadata, or the HTTP header) parents the server's span, and
the gateway passes its own span on to the worker the same way, so one trace runs from the client
through the gateway to the worker's queue and batch. Spans a batch shares carry ``ferry.batch.id``
and ``ferry.batch.size``, which tell which requests ran together.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ferry.core.errors import InvalidArgument

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
EXPORTERS = ("none", "otlp", "console")
_NOOP = contextlib.nullcontext()
_batches = itertools.count(1)


class _State:
    tracer: Any = None
    provider: Any = None


def enabled() -> bool:
    return _State.tracer is not None


def chosen_exporter(env: Mapping[str, str]) -> str:
    """Which exporter the standard variables ask for ("none" unless one is named)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    name = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
    if name not in EXPORTERS:
        known = ", ".join(EXPORTERS)
        raise InvalidArgument(f"OTEL_TRACES_EXPORTER={name!r}: Ferry exports traces by {known}")
    return name


def _one_line(span: Any) -> str:
    """A finished span as one JSON line (the console exporter's own form is indented over many)."""
    return json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n"


def configure(service: str, env: Mapping[str, str] | None = None, processor: Any = None) -> bool:
    """Set tracing up for this process as the OTEL_* variables say; True when it is on. A
    ``processor`` (an SDK span processor) replaces the exporter the variables name."""
    env = os.environ if env is None else env
    exporter = chosen_exporter(env)
    if exporter == "none" and processor is None:
        return False
    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        raise InvalidArgument(
            f"OTEL_TRACES_EXPORTER={exporter} needs the opentelemetry-sdk package, which is not installed"
        ) from None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    name = env.get("OTEL_SERVICE_NAME") or f"ferry-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if processor is not None:
        provider.add_span_processor(processor)
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        console = ConsoleSpanExporter(out=sys.stderr, formatter=_one_line)
        provider.add_span_processor(SimpleSpanProcessor(console))
    _State.provider, _State.tracer = provider, provider.get_tracer("ferry")
    return True


def shutdown() -> None:
    """Send what is buffered; called once as the service stops."""
    if _State.provider is not None:
        _State.provider.shutdown()
    _State.provider = _State.tracer = None


def _carrier(metadata: Sequence[tuple[str, Any]] | Mapping[str, Any] | None) -> dict[str, str]:
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    return {str(k).lower(): str(v) for k, v in items if str(k).lower() in (TRACEPARENT, TRACESTATE)}


def server_span(name: str, metadata: Sequence[tuple[str, Any]] | Mapping[str, Any] | None) -> Any:
    """The span of one call this server answers, its parent from the caller's ``traceparent``."""
    if _State.tracer is None:
        return _NOOP
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    parent = extract(_carrier(metadata))
    return _State.tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER)


def span(name: str, **attributes: Any) -> Any:
    """A child of the current span, as a context manager."""
    if _State.tracer is None:
        return _NOOP
    return _State.tracer.start_as_current_span(name, attributes=attributes)


def current() -> Any:
    """The current context, to parent work another task does for this request (None when off)."""
    if _State.tracer is None:
        return None
    from opentelemetry import context

    return context.get_current()


def batch_span(name: str, parents: Sequence[Any], size: int) -> Any:
    """A span for work done once for several requests (an upstream batch), made current, under the
    first request's context and linked to the others'; calls made inside carry it to the next hop.
    It yields the batch's id (None when tracing is off)."""
    if _State.tracer is None:
        return _NOOP
    return _batch_span(name, parents, size)


@contextlib.contextmanager
def _batch_span(name: str, parents: Sequence[Any], size: int) -> Iterator[int]:
    from opentelemetry import trace

    batch = next(_batches)
    contexts = [p for p in parents if p is not None]
    links = [trace.Link(trace.get_current_span(c).get_span_context()) for c in contexts[1:]]
    with _State.tracer.start_as_current_span(
        name,
        context=contexts[0] if contexts else None,
        links=links,
        attributes={"ferry.batch.id": batch, "ferry.batch.size": size, "ferry.batch.requests": len(parents)},
    ):
        yield batch


def outgoing() -> list[tuple[str, str]]:
    """Metadata carrying the current span to the next hop (empty when off)."""
    if _State.tracer is None:
        return []
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return sorted(carrier.items())


def record(name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A finished child of the current span, from times measured elsewhere (a request's wait in
    the queue and its batch's run, which the batcher's own task timed). Times are time.time_ns()."""
    if _State.tracer is None:
        return
    s = _State.tracer.start_span(name, start_time=start_ns, attributes=attributes)
    s.end(end_time=end_ns)
