"""Which worker gets the next upstream call, and whether a failed call may be retried.

Pure logic with an injectable clock and random source, so it is unit-tested
without a network. Power of two choices: sample two candidates among the
workers that have the version ready and are not ejected, take the one with
fewer calls in flight; that keeps the load even without global coordination
between gateway replicas. A worker that fails ``eject_failures`` times in a row
is ejected for a backoff that doubles on each repeat (capped), then gets
traffic again; one success resets it. An attempt that stays silent past its
per-try budget (``timed_out``) counts as a failure: that is how a frozen worker fails.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc

# Statuses that mean "the request never ran (or ran nowhere useful) on that worker":
# inference is idempotent, so another worker may safely run it.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# Statuses a worker answers when the resolved version went away under us (a rollout
# unloaded it between our index poll and the call): retry after re-resolving.
VERSION_GONE = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE})


@dataclass
class Endpoint:
    """What the router knows about one worker: load and failure history."""

    address: str
    in_flight: int = 0
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0

    def available(self, now: float) -> bool:
        return now >= self.ejected_until


@dataclass
class RetryPolicy:
    """Bounded attempts, each only while the caller's deadline leaves time for it."""

    attempts: int = 3
    min_time_left_s: float = 0.005

    def should_retry(self, attempt: int, code: grpc.StatusCode, time_left: float | None) -> bool:
        if attempt >= self.attempts or code not in RETRYABLE:
            return False
        return time_left is None or time_left > self.min_time_left_s


@dataclass
class Router:
    """Picks workers and tracks their health from the outcomes of calls."""

    eject_failures: int = 3
    eject_base_s: float = 1.0
    eject_max_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    on_eject: Callable[[str, float], None] | None = None

    def endpoint(self, address: str) -> Endpoint:
        ep = self.endpoints.get(address)
        if ep is None:
            ep = self.endpoints[address] = Endpoint(address)
        return ep

    def forget(self, address: str) -> None:
        self.endpoints.pop(address, None)

    def pick(self, candidates: Iterable[str], exclude: Sequence[str] = ()) -> str | None:
        """Power of two choices among non-ejected candidates not in ``exclude``.

        When every candidate is ejected, the least recently ejected one still
        answers: an ejection is a hint, not a reason to fail a request that
        some worker could serve.
        """
        now = self.clock()
        pool = [a for a in dict.fromkeys(candidates) if a not in exclude]
        if not pool:
            return None
        healthy = [a for a in pool if self.endpoint(a).available(now)]
        if not healthy:
            return min(pool, key=lambda a: self.endpoint(a).ejected_until)
        if len(healthy) == 1:
            return healthy[0]
        a, b = self.rng.sample(healthy, 2)
        return a if self.endpoint(a).in_flight <= self.endpoint(b).in_flight else b

    def started(self, address: str) -> None:
        self.endpoint(address).in_flight += 1

    def finished(self, address: str, ok: bool | None) -> None:
        """Record an outcome; ``ok`` is False only for failures that are the worker's fault, None
        for a call that was cancelled (it lost a race with another attempt): no verdict."""
        ep = self.endpoint(address)
        ep.in_flight = max(0, ep.in_flight - 1)
        if ok is None:
            return
        if ok:
            ep.consecutive_failures = 0
            ep.ejections = 0 if ep.available(self.clock()) else ep.ejections
            return
        ep.consecutive_failures += 1
        if ep.consecutive_failures >= self.eject_failures:
            self.eject(address)

    def timed_out(self, address: str) -> None:
        """An attempt stayed silent past its per-try budget: a frozen worker fails this way, so
        it counts like a failure (the call itself may still be running)."""
        ep = self.endpoint(address)
        ep.consecutive_failures += 1
        if ep.consecutive_failures >= self.eject_failures:
            self.eject(address)

    def eject(self, address: str) -> float:
        """Take a worker out for a backoff period; returns the period."""
        ep = self.endpoint(address)
        period = min(self.eject_max_s, self.eject_base_s * (2**ep.ejections))
        ep.ejections += 1
        ep.consecutive_failures = 0
        ep.ejected_until = self.clock() + period
        if self.on_eject is not None:
            self.on_eject(address, period)
        return period

    def ejected(self) -> list[str]:
        now = self.clock()
        return [a for a, ep in self.endpoints.items() if not ep.available(now)]
