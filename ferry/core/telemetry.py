"""Structured logs and Prometheus metrics, configured once per process in ``main()``.

Logs are one JSON object per line, quiet (WARNING) by default; ``--log-level``
or ``FERRY_<SERVICE>_LOG_LEVEL`` raises it. Metrics are served over HTTP at
``/metrics`` on the port the service's settings name (0 = off).
"""

from __future__ import annotations

import bisect
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.metrics_core import Metric

# prometheus_client is imported where it is used; the annotations need it only for type checking.
M = TypeVar("M", bound="MetricWrapperBase")

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; extra fields given with ``extra=`` ride along."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "WARNING", service: str = "ferry") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("ferry").info("logging configured", extra={"service": service, "started": time.time()})


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve Prometheus metrics on ``host:port``; returns the bound port (0 means off)."""
    if port <= 0:
        return 0
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


class Labelled(Generic[M]):
    """A metric's labelled children, kept: ``labels()`` validates and locks on every call, and a
    request path that counts several series per call pays for it; this pays one dict lookup."""

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class RequestMetrics:
    """``<prefix>_requests_total{model,status}`` and ``<prefix>_request_seconds{model}``, counted in
    plain Python and handed to Prometheus when it scrapes.

    prometheus_client takes a lock on every ``inc`` and ``observe``. The request path of a
    worker or gateway runs thousands of times a second on one event-loop thread, where those
    locks were a measurable share of a request's CPU; here a request costs two dict updates.
    Reading from the scrape thread is safe: ``list()`` of a dict or list is one step under the GIL.
    """

    def __init__(self, prefix: str, what: str, buckets: Sequence[float], registry: Any = None) -> None:
        from prometheus_client import REGISTRY

        self._prefix = prefix
        self._what = what
        self._bounds = sorted(buckets)
        self._counts: dict[tuple[str, str], int] = {}
        self._latency: dict[str, list[float]] = {}  # model -> one count per bucket, +Inf, then the sum
        (registry or REGISTRY).register(self)

    def observe(self, model: str, status: str, seconds: float) -> None:
        key = (model, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        cells = self._latency.get(model)
        if cells is None:
            cells = self._latency[model] = [0.0] * (len(self._bounds) + 2)
        cells[bisect.bisect_left(self._bounds, seconds)] += 1
        cells[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        requests = CounterMetricFamily(
            f"{self._prefix}_requests",
            f"Inference requests answered {self._what}",
            labels=["model", "status"],
        )
        for (model, status), n in list(self._counts.items()):
            requests.add_metric([model, status], n)
        yield requests
        latency = HistogramMetricFamily(
            f"{self._prefix}_request_seconds", f"Inference request latency {self._what}", labels=["model"]
        )
        for model, cells in list(self._latency.items()):
            cells = list(cells)
            buckets: list[tuple[str, float]] = []
            total = 0.0
            for bound, count in zip([*map(str, self._bounds), "+Inf"], cells[:-1], strict=True):
                total += count
                buckets.append((bound, total))
            latency.add_metric([model], buckets, cells[-1])
        yield latency
