from __future__ import annotations

from ferry.core.modelconfig import BatchingPolicy
from services.inference.batcher import plan_batch, queue_wait

A, B = ("a",), ("b",)


def test_first_request_always_runs() -> None:
    assert plan_batch([(5, A)], max_rows=0) == [0]
    assert plan_batch([(5, A), (1, A)], max_rows=0) == [0]


def test_rows_not_requests_bound_the_batch() -> None:
    items = [(3, A), (3, A), (3, A)]
    assert plan_batch(items, max_rows=7) == [0, 1]
    assert plan_batch(items, max_rows=9) == [0, 1, 2]


def test_only_matching_shapes_join() -> None:
    assert plan_batch([(1, A), (1, B), (1, A)], max_rows=8) == [0, 2]


def test_preferred_sizes_cut_the_batch() -> None:
    items = [(1, A)] * 7
    assert plan_batch(items, max_rows=8, preferred=(2, 4)) == [0, 1, 2, 3]
    assert plan_batch(items[:3], max_rows=8, preferred=(4,)) == [0, 1, 2]


def test_empty_queue() -> None:
    assert plan_batch([], max_rows=8) == []


def test_no_delay_means_dispatch_now() -> None:
    assert queue_wait(BatchingPolicy(), queued_rows=1, oldest_wait_us=0, max_rows=8) == 0


def test_delay_holds_small_batches_until_it_expires() -> None:
    policy = BatchingPolicy(max_queue_delay_us=1000)
    assert queue_wait(policy, 1, oldest_wait_us=200, max_rows=8) == 0.0008
    assert queue_wait(policy, 1, oldest_wait_us=5000, max_rows=8) == 0
    assert queue_wait(policy, 8, oldest_wait_us=0, max_rows=8) == 0
    assert queue_wait(BatchingPolicy(max_queue_delay_us=1000, preferred_batch_sizes=(4,)), 4, 0, 8) == 0
