"""The worker's Prometheus metrics: requests by model and status, and their latency."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_REQUESTS = Counter("ferry_worker_requests_total", "Inference requests answered", ["model", "status"])
_LATENCY = Histogram(
    "ferry_worker_request_seconds",
    "Inference request latency inside the worker",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class WorkerMetrics:
    """Caches labelled children so the hot path pays one dict lookup, not a label resolution."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def observe(self, model: str, status: str, ns: int) -> None:
        key = (model, status)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (_REQUESTS.labels(model, status), _LATENCY.labels(model))
        pair[0].inc()
        pair[1].observe(ns / 1e9)
