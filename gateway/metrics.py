"""The gateway's Prometheus metrics (served at /metrics by ``start_metrics_server``).

All series carry a ``ferry_gateway_`` prefix. Labels stay low-cardinality:
model names and worker addresses, never request ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ferry.core.telemetry import Labelled, RequestMetrics

REQUESTS = RequestMetrics(
    "ferry_gateway",
    "at the gateway, end to end",
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CACHE = Counter("ferry_gateway_cache_total", "Result cache lookups by outcome", ["model", "outcome"])
CACHE_LEVEL_HITS = Counter(
    "ferry_gateway_cache_level_hits_total", "Result cache hits by the level that answered", ["level"]
)
CACHE_ERRORS = Counter("ferry_gateway_cache_errors_total", "Cache backend errors and timeouts", ["op"])
BREAKER = Gauge("ferry_gateway_cache_breaker_state", "Cache circuit breaker: 0 closed, 1 half-open, 2 open")
BREAKER_CHANGES = Counter(
    "ferry_gateway_cache_breaker_transitions_total", "Cache breaker state changes, by new state", ["state"]
)
SINGLE_FLIGHT = Counter(
    "ferry_gateway_single_flight_shared_total", "Requests that joined an identical in-flight request"
)
RETRIES = Counter("ferry_gateway_retries_total", "Upstream calls retried on another worker", ["reason"])
TRIES = Counter(
    "ferry_gateway_upstream_tries_total", "Upstream attempts by kind: first, retry, hedge", ["kind"]
)
WINS = Counter("ferry_gateway_upstream_wins_total", "Answers by the kind of attempt that gave them", ["kind"])
TRY_TIMEOUTS = Counter(
    "ferry_gateway_try_timeouts_total", "Upstream attempts silent past their per-try budget"
)
BUDGET_REFUSED = Counter(
    "ferry_gateway_retry_budget_exhausted_total", "Retries and hedges refused by the retry budget", ["kind"]
)
EJECTIONS = Counter("ferry_gateway_ejections_total", "Workers ejected after consecutive failures", ["worker"])
UPSTREAM_BATCH = Histogram(
    "ferry_gateway_upstream_batch_requests",
    "Client requests merged into one upstream ModelInfer",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
UPSTREAM_SECONDS = Histogram(
    "ferry_gateway_upstream_seconds", "Latency of upstream ModelInfer calls", ["worker"]
)
IN_FLIGHT = Gauge("ferry_gateway_in_flight", "Requests inside the gateway")
WORKER_IN_FLIGHT = Gauge("ferry_gateway_worker_in_flight", "Upstream calls in flight per worker", ["worker"])
WORKERS = Gauge("ferry_gateway_workers", "Known workers by health", ["state"])
AUTH_DENIED = Counter("ferry_gateway_auth_denied_total", "Calls refused by API-key auth", ["code"])
RATE_LIMIT_LOCAL = Gauge(
    "ferry_gateway_rate_limit_local",
    "1 while Redis is unreachable and this replica counts API-key rate limits on its own",
)
SEQUENCES = Gauge("ferry_gateway_sequences", "Live sequences this gateway has pinned to a worker")
SEQUENCES_LOST = Counter(
    "ferry_gateway_sequences_lost_total",
    "Requests of a sequence refused because the worker holding its state is gone",
    ["model"],
)
REJECTED = Counter("ferry_gateway_overload_rejections_total", "Requests refused because the gateway was full")

# The children the request path touches on every call, kept (see ``Labelled``).
cache = Labelled(CACHE)
upstream_batch = Labelled(UPSTREAM_BATCH)
upstream_seconds = Labelled(UPSTREAM_SECONDS)
worker_in_flight = Labelled(WORKER_IN_FLIGHT)
