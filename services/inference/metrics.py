"""The worker's Prometheus metrics: requests by model and status, and their latency."""

from __future__ import annotations

from ferry.core.telemetry import RequestMetrics

REQUESTS = RequestMetrics(
    "ferry_worker",
    "inside the worker",
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class WorkerMetrics:
    def observe(self, model: str, status: str, ns: int) -> None:
        REQUESTS.observe(model, status, ns / 1e9)
