"""Grey-failure decisions: per-try budget from a latency window, hedge delay, retry budget tokens,
sequences never retried, and a silent attempt counting towards ejection."""

from __future__ import annotations

import pytest

from gateway.hedging import HedgePolicy, LatencyWindow, RetryBudget, is_sequence
from gateway.router import Router


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def window_of(values: list[float], size: int = 512) -> LatencyWindow:
    w = LatencyWindow(size=size)
    for v in values:
        w.add(v)
    return w


def test_window_quantiles_follow_the_recent_values() -> None:
    w = window_of([0.01] * 99 + [0.5])
    assert w.quantile(0.5) == 0.01
    assert w.quantile(0.99) == 0.5
    assert LatencyWindow().quantile(0.99) is None


def test_window_forgets_the_oldest_values() -> None:
    w = window_of([1.0] * 10 + [0.002] * 10, size=10)
    assert len(w) == 10
    assert w.quantile(0.99) == 0.002


def test_budget_is_p99_times_the_factor() -> None:
    policy = HedgePolicy(floor_s=0.05, p99_factor=4.0, min_samples=20)
    assert policy.try_budget(window_of([0.1] * 100)) == pytest.approx(0.4)


def test_budget_never_goes_under_the_floor() -> None:
    policy = HedgePolicy(floor_s=0.25, p99_factor=4.0, min_samples=20)
    assert policy.try_budget(window_of([0.001] * 100)) == 0.25


def test_budget_waits_for_enough_samples() -> None:
    policy = HedgePolicy(floor_s=0.25, min_samples=20)
    assert policy.try_budget(window_of([0.1] * 19)) is None
    assert policy.try_budget(None) is None
    assert policy.try_budget(window_of([0.1] * 20)) == pytest.approx(0.4)


def test_a_set_budget_wins_over_the_window() -> None:
    policy = HedgePolicy(try_timeout_s=0.3, floor_s=0.05)
    assert policy.try_budget(None) == 0.3
    assert policy.try_budget(window_of([2.0] * 100)) == 0.3


def test_hedge_delay_zero_is_off() -> None:
    assert HedgePolicy().hedge_delay() is None
    assert HedgePolicy(hedge_delay_s=0.02).hedge_delay() == 0.02


def test_budget_starts_full_and_runs_dry() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_per_s=0.0, clock=clock)
    assert [budget.try_spend() for _ in range(11)] == [True] * 10 + [False]


def test_requests_earn_their_ratio_of_a_retry() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, clock=clock)
    while budget.try_spend():
        pass
    for _ in range(4):
        budget.request()
    assert not budget.try_spend()  # 0.8 tokens
    budget.request()
    assert budget.try_spend()  # 1.0
    assert not budget.try_spend()


def test_retries_stay_a_bounded_share_of_the_load() -> None:
    """Every request wanting a retry (an overloaded fleet) gets at most ratio x requests of them."""
    clock = Clock()
    budget = RetryBudget(ratio=0.1, min_per_s=0.0, clock=clock)
    while budget.try_spend():
        pass
    granted = 0
    for _ in range(1000):
        budget.request()
        granted += budget.try_spend()
    assert granted == 100


def test_time_refills_the_budget_up_to_its_capacity() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_per_s=5.0, clock=clock)
    while budget.try_spend():
        pass
    clock.now += 0.5
    assert budget.try_spend() and budget.try_spend()
    assert not budget.try_spend()  # 2.5 tokens came, 2 spent
    clock.now += 3600  # a long idle spell banks no more than the capacity
    assert sum(budget.try_spend() for _ in range(50)) == 10


def test_sequence_requests_are_recognised() -> None:
    assert is_sequence({"sequence_id": 7})
    assert is_sequence({"sequence_start": True})
    assert not is_sequence({"ferry_cache": False})
    assert not is_sequence({})


def test_silent_attempts_eject_a_worker_like_failures() -> None:
    clock = Clock()
    router = Router(eject_failures=3, eject_base_s=1.0, clock=clock)
    router.started("a")
    router.timed_out("a")
    router.timed_out("a")
    assert router.ejected() == []
    router.timed_out("a")
    assert router.ejected() == ["a"]
    assert router.endpoint("a").in_flight == 1  # the silent call itself is still open
    router.finished("a", ok=None)  # cancelled once another worker answered: no verdict
    assert router.endpoint("a").in_flight == 0 and router.ejected() == ["a"]
    clock.now += 1.0
    assert router.ejected() == []


def test_a_cancelled_call_neither_fails_nor_heals_a_worker() -> None:
    router = Router(eject_failures=2)
    router.started("a")
    router.finished("a", ok=False)
    router.started("a")
    router.finished("a", ok=None)
    assert router.endpoint("a").consecutive_failures == 1


def test_a_worker_saying_a_model_cannot_serve_is_not_a_worker_failure() -> None:
    """The decision rides on the reason in the trailing metadata, not on the message's wording."""
    import grpc

    from ferry.core.errors import REASON_KEY, ModelUnavailable
    from gateway.upstream import worker_failed

    def status(reason: str, details: str) -> grpc.aio.AioRpcError:
        trailing = grpc.aio.Metadata(*(((REASON_KEY, reason),) if reason else ()))
        return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), trailing, details)

    assert not worker_failed(status(ModelUnavailable.reason, "model 'm' version 2 is LOADING"))
    assert not worker_failed(status(ModelUnavailable.reason, "anything at all"))
    assert worker_failed(status("", "model 'm' is not the point: the connection dropped"))
    assert worker_failed(status("", "Connection reset by peer"))
