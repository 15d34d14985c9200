"""The worker's Prometheus metrics: requests by model and status, their latency, and the load
gauges an autoscaler reads (queue depth, requests in flight, queue time).

The gauges cost the request path nothing: the batchers keep plain int counters, and
``LoadGauges`` reads them when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from ferry.core.telemetry import RequestMetrics

REQUESTS = RequestMetrics(
    "ferry_worker",
    "inside the worker",
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class WorkerMetrics:
    def observe(self, model: str, status: str, ns: int) -> None:
        REQUESTS.observe(model, status, ns / 1e9)


class LoadGauges:
    """``ferry_worker_queue_depth{model}``, ``ferry_worker_in_flight``,
    ``ferry_worker_queue_time_seconds{model}`` and ``ferry_worker_live_sequences{model}`` (a sequence
    model's held states), computed at scrape time from the serving versions.

    Queue time is a gauge of how long the oldest waiting request of a model has waited (0 when
    its queue is empty): unlike a histogram it answers "is it backing up now", which is what a
    scaler needs; the per-request queue times are in ModelStatistics.
    """

    def __init__(self, versions: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self._versions = versions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "ferry_worker_queue_depth", "Requests waiting for a run, per model", labels=["model"]
        )
        wait = GaugeMetricFamily(
            "ferry_worker_queue_time_seconds",
            "How long the oldest waiting request of a model has waited (0: none waits)",
            labels=["model"],
        )
        in_flight = GaugeMetricFamily("ferry_worker_in_flight", "Requests in the worker's queues or running")
        live = GaugeMetricFamily(
            "ferry_worker_live_sequences", "Sequences whose state a sequence model holds", labels=["model"]
        )
        depths: dict[str, int] = {}
        waits: dict[str, float] = {}
        sequences: dict[str, int] = {}
        total = 0
        for model, version in list(self._versions()):
            batcher = version.batcher
            if version.sequences is not None:
                sequences[model] = sequences.get(model, 0) + len(version.sequences)
            queued = batcher.depth
            depths[model] = depths.get(model, 0) + queued
            waits[model] = max(waits.get(model, 0.0), batcher.oldest_wait_s())
            total += queued + batcher.running
        for model in sorted(depths):
            depth.add_metric([model], depths[model])
            wait.add_metric([model], waits[model])
        in_flight.add_metric([], total)
        for model in sorted(sequences):
            live.add_metric([model], sequences[model])
        yield live
        yield depth
        yield wait
        yield in_flight
