"""Router: power of two choices, outlier ejection with backoff, the retry policy; breaker states."""

from __future__ import annotations

import random

import grpc
import pytest

from gateway.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from gateway.router import RetryPolicy, Router
from gateway.upstream import broken_connection


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_two_choices_prefers_the_less_loaded_worker() -> None:
    router = Router(rng=random.Random(0))
    router.endpoint("a").in_flight = 10
    router.endpoint("b").in_flight = 0
    assert {router.pick(["a", "b"]) for _ in range(20)} == {"b"}


def test_two_choices_spreads_load_evenly() -> None:
    router = Router(rng=random.Random(1))
    for _ in range(300):
        router.started(router.pick(["a", "b", "c"]) or "")
    loads = [router.endpoint(a).in_flight for a in "abc"]
    assert max(loads) - min(loads) <= 1


def test_pick_excludes_tried_and_handles_empty() -> None:
    router = Router()
    assert router.pick(["a", "b"], exclude=["a"]) == "b"
    assert router.pick(["a"], exclude=["a"]) is None
    assert router.pick([]) is None


def test_consecutive_failures_eject_with_doubling_backoff() -> None:
    clock = Clock()
    ejected: list[tuple[str, float]] = []
    router = Router(
        eject_failures=2,
        eject_base_s=1.0,
        eject_max_s=3.0,
        clock=clock,
        on_eject=lambda a, p: ejected.append((a, p)),
    )
    for _ in range(2):
        router.started("a")
        router.finished("a", ok=False)
    assert ejected == [("a", 1.0)]
    assert router.ejected() == ["a"]
    assert router.pick(["a", "b"]) == "b"
    clock.now += 1.01
    assert router.ejected() == []
    for _ in range(2):
        router.finished("a", ok=False)
    for _ in range(2):
        router.finished("a", ok=False)
    assert [p for _, p in ejected] == [1.0, 2.0, 3.0]  # doubles, then capped


def test_success_resets_failures() -> None:
    router = Router(eject_failures=2)
    router.finished("a", ok=False)
    router.finished("a", ok=True)
    router.finished("a", ok=False)
    assert router.ejected() == []


def test_all_ejected_still_answers_with_the_one_back_soonest() -> None:
    clock = Clock()
    router = Router(clock=clock, eject_base_s=5.0)
    router.eject("a")
    clock.now += 1
    router.eject("b")
    assert router.pick(["a", "b"]) == "a"


def test_retry_policy_bounds_attempts_codes_and_deadline() -> None:
    policy = RetryPolicy(attempts=3)
    assert policy.should_retry(1, grpc.StatusCode.UNAVAILABLE, None)
    assert policy.should_retry(2, grpc.StatusCode.UNAVAILABLE, 1.0)
    assert not policy.should_retry(3, grpc.StatusCode.UNAVAILABLE, 1.0)
    assert not policy.should_retry(1, grpc.StatusCode.INVALID_ARGUMENT, 1.0)
    assert not policy.should_retry(1, grpc.StatusCode.UNAVAILABLE, 0.001)


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = Clock()
    states: list[str] = []
    b = CircuitBreaker(failures=2, reset_s=1.0, clock=clock, on_change=states.append)
    assert b.allow()
    b.failure()
    assert b.state == CLOSED
    b.failure()
    assert b.state == OPEN and not b.allow()
    clock.now += 1.0
    assert b.state == HALF_OPEN
    assert b.allow() and not b.allow()  # one trial at a time
    b.failure()
    assert b.state == OPEN
    clock.now += 1.0
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow()
    assert states == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_a_lost_half_open_trial_gives_way_after_another_reset_period() -> None:
    """A trial that never reports back (success, failure or abandon) must not keep every later
    call out: after another reset_s the next call is the trial."""
    clock = Clock()
    b = CircuitBreaker(failures=1, reset_s=1.0, clock=clock)
    b.failure()
    clock.now += 1.0
    assert b.allow()  # the trial goes, and is never heard of again
    clock.now += 0.5
    assert not b.allow()
    clock.now += 0.5
    assert b.allow() and not b.allow()  # one new trial, still one at a time
    b.success()
    assert b.state == CLOSED


@pytest.mark.parametrize(
    ("code", "details", "broken"),
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", True),
        (grpc.StatusCode.CANCELLED, "CANCELLED", True),  # the worker cancelled it while stopping
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", True),
        (grpc.StatusCode.INTERNAL, "internal error (incident 1)", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad shape", False),
    ],
)
def test_broken_connection_classification(code: grpc.StatusCode, details: str, broken: bool) -> None:
    err = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
    assert broken_connection(err) is broken
