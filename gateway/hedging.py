"""Grey-failure decisions for the gateway->worker hop: per-try budgets, hedge delay, retry budget.

A worker that is frozen (SIGSTOP, a cut link) still holds its TCP connection, so a call to it
neither fails nor answers: only a clock notices. These are the pure parts of that clock, unit
tested without a server; ``gateway.upstream`` does the I/O.

- ``LatencyWindow``: the recent latencies of one model's upstream calls; its p99 x a factor
  (never under a floor) is how long an attempt may stay silent before another worker is tried.
- ``HedgePolicy``: the per-try budget (derived, or set) and the delay before a hedged attempt.
- ``RetryBudget``: retries and hedges spend tokens that successful first attempts earn
  (``ratio`` per request, like gRPC's retry throttling) plus a small steady allowance
  (``min_per_s``, like Envoy's min retry concurrency), so a fleet that is merely slow does not
  turn every request into two: the extra load stays a bounded share of the real load.
- ``is_sequence``: requests of a stateful sequence are never retried or hedged elsewhere.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SEQUENCE_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end"})


def is_sequence(parameters: Mapping[str, Any]) -> bool:
    """A request that is part of a sequence carries state on one worker: never run it elsewhere."""
    return any(name in parameters for name in SEQUENCE_PARAMETERS)


@dataclass
class LatencyWindow:
    """The last ``size`` latencies (seconds) of one model; quantiles recomputed lazily."""

    size: int = 512
    _values: deque[float] = field(default_factory=deque)
    _sorted: list[float] | None = None

    def add(self, seconds: float) -> None:
        if len(self._values) >= self.size:
            self._values.popleft()
        self._values.append(seconds)
        self._sorted = None

    def __len__(self) -> int:
        return len(self._values)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the window, None while it is empty."""
        if not self._values:
            return None
        if self._sorted is None:
            self._sorted = sorted(self._values)
        index = min(len(self._sorted) - 1, max(0, int(q * len(self._sorted))))
        return self._sorted[index]


@dataclass(frozen=True)
class HedgePolicy:
    """How long an attempt may stay silent, and when a hedge goes out (seconds; None = never)."""

    try_timeout_s: float = 0.0  # 0: derived from the model's latency window
    floor_s: float = 0.25
    p99_factor: float = 4.0
    min_samples: int = 20
    hedge_delay_s: float = 0.0  # 0: no hedging

    def try_budget(self, window: LatencyWindow | None) -> float | None:
        """The per-try budget: set, or p99 x factor with a floor; None until the window knows
        the model well enough (then only the caller's deadline bounds the attempt)."""
        if self.try_timeout_s > 0:
            return self.try_timeout_s
        if window is None or len(window) < self.min_samples:
            return None
        p99 = window.quantile(0.99)
        assert p99 is not None
        return max(self.floor_s, p99 * self.p99_factor)

    def hedge_delay(self) -> float | None:
        return self.hedge_delay_s if self.hedge_delay_s > 0 else None


@dataclass
class RetryBudget:
    """Token accounting for retries and hedges; the clock is injectable for tests.

    Each first attempt earns ``ratio`` tokens; time earns ``min_per_s`` tokens a second; the
    bucket holds at most ``capacity`` (at least one second of the steady allowance, and 10),
    so an idle spell does not bank a storm. A retry or hedge spends one token, or is refused.
    """

    ratio: float = 0.2
    min_per_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    tokens: float = -1.0  # -1: start full
    _last: float | None = None

    @property
    def capacity(self) -> float:
        return max(10.0, self.min_per_s)

    def _refill(self) -> None:
        now = self.clock()
        if self.tokens < 0:
            self.tokens = self.capacity
        elif self._last is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.min_per_s)
        self._last = now

    def request(self) -> None:
        """A first attempt went out: it earns its share of a retry."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        """May one more retry or hedge go out now? Spends a token when it may."""
        self._refill()
        if self.tokens >= 1.0 - 1e-9:  # ten requests at ratio 0.1 earn a whole token
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False
