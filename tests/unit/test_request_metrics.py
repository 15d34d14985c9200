"""RequestMetrics: plain counters on the request path, Prometheus exposition at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from ferry.core.telemetry import RequestMetrics


def test_counts_and_latency_buckets_reach_the_exposition() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics("t", "in a test", (0.001, 0.01), registry=registry)
    for seconds in (0.0005, 0.001, 0.005, 2.0):  # 0.001 is "le 0.001": the first bucket
        metrics.observe("m", "OK", seconds)
    metrics.observe("m", "INVALID_ARGUMENT", 0.02)
    body = generate_latest(registry).decode()
    assert 't_requests_total{model="m",status="OK"} 4.0' in body
    assert 't_requests_total{model="m",status="INVALID_ARGUMENT"} 1.0' in body
    assert 't_request_seconds_bucket{le="0.001",model="m"} 2.0' in body
    assert 't_request_seconds_bucket{le="0.01",model="m"} 3.0' in body
    assert 't_request_seconds_bucket{le="+Inf",model="m"} 5.0' in body
    assert 't_request_seconds_count{model="m"} 5.0' in body
    assert 't_request_seconds_sum{model="m"} 2.0265' in body
