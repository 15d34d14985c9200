"""The async batcher with a plain numpy function as its model: merging, splitting, isolation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ferry.core.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from ferry.core.modelconfig import BatchingPolicy
from services.inference.batcher import Batcher
from services.inference.stats import ModelStats


def double(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = feeds["x"]
    if (x < 0).any():
        raise InvalidArgument("negative input")
    return {"y": x * 2}


def make(policy: BatchingPolicy | None = None, run=double, max_batch: int = 8) -> tuple[Batcher, ModelStats]:
    stats = ModelStats()
    return Batcher(
        "m:1", run, max_batch_size=max_batch, policy=policy or BatchingPolicy(), slots=1, stats=stats
    ), stats


def test_concurrent_requests_share_runs_and_get_their_own_rows() -> None:
    async def run() -> tuple[list[object], ModelStats]:
        batcher, stats = make()
        futures = [batcher.submit({"x": np.full((1, 2), i, np.float32)}, 1) for i in range(6)]
        results = await asyncio.gather(*futures)
        await batcher.close()
        return results, stats

    results, stats = asyncio.run(run())
    for i, (outputs, _queue_ns, _timings) in enumerate(results):
        assert outputs["y"].tolist() == [[2 * i, 2 * i]]
    assert stats.execution_count < 6 and max(stats.batches) > 1


def test_a_bad_request_fails_alone() -> None:
    async def run() -> list[object]:
        batcher, _ = make()
        futures = [batcher.submit({"x": np.full((1, 1), v, np.float32)}, 1) for v in (1, -1, 3)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.close()
        return results

    good1, bad, good2 = asyncio.run(run())
    assert isinstance(bad, InvalidArgument) and bad.message == "negative input"
    assert good1[0]["y"].tolist() == [[2]] and good2[0]["y"].tolist() == [[6]]


def test_rows_beyond_max_batch_run_separately() -> None:
    async def run() -> ModelStats:
        batcher, stats = make(max_batch=4)
        await asyncio.gather(*(batcher.submit({"x": np.ones((3, 1), np.float32)}, 3) for _ in range(4)))
        await batcher.close()
        return stats

    stats = asyncio.run(run())
    assert max(stats.batches) <= 4 and stats.execution_count >= 3


def test_full_queue_and_closed_batcher() -> None:
    async def run() -> None:
        batcher, _ = make(BatchingPolicy(max_queue_size=1))
        first = batcher.submit({"x": np.ones((1, 1), np.float32)}, 1)
        with pytest.raises(ResourceExhausted, match=r"queue of model m:1 is full \(1 requests\)"):
            batcher.submit({"x": np.ones((1, 1), np.float32)}, 1)
        await first
        await batcher.close()
        with pytest.raises(Unavailable, match="unloading"):
            batcher.submit({"x": np.ones((1, 1), np.float32)}, 1)

    asyncio.run(run())


def test_priority_level_one_runs_first() -> None:
    order: list[float] = []

    def record(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        order.extend(feeds["x"].ravel().tolist())
        return {"y": feeds["x"]}

    async def run() -> None:
        batcher, _ = make(
            BatchingPolicy(priority_levels=2, default_priority_level=2), run=record, max_batch=0
        )
        futures = [
            batcher.submit({"x": np.full((1, 1), v, np.float32)}, 1, priority=p)
            for v, p in ((1, 2), (2, 2), (3, 1))
        ]
        await asyncio.gather(*futures)
        await batcher.close()

    asyncio.run(run())
    assert order.index(3) < order.index(2)


HELD = BatchingPolicy(preferred_batch_sizes=(4,), max_queue_delay_us=60_000_000)


def test_a_cancelled_request_leaves_the_queue_at_once() -> None:
    async def run() -> None:
        batcher, stats = make(HELD, max_batch=4)
        gone = batcher.submit({"x": np.ones((1, 1), np.float32)}, 1)
        kept = batcher.submit({"x": np.full((1, 1), 2, np.float32)}, 1)
        assert batcher.depth == 2
        gone.cancel()
        await asyncio.sleep(0)  # the done callback runs on the next loop pass
        assert batcher.depth == 1
        rest = [batcher.submit({"x": np.full((1, 1), 3, np.float32)}, 1) for _ in range(3)]
        outputs, _q, _t = await kept
        assert outputs["y"].tolist() == [[4]]
        await asyncio.gather(*rest)
        assert stats.execution_count == 1 and list(stats.batches) == [4]
        await batcher.close()

    asyncio.run(run())


def test_flush_sends_a_held_batch_without_its_delay() -> None:
    async def run() -> None:
        batcher, stats = make(HELD, max_batch=4)
        waiting = batcher.submit({"x": np.ones((1, 1), np.float32)}, 1)
        await asyncio.sleep(0.05)
        assert not waiting.done() and batcher.depth == 1
        batcher.flush()
        outputs, _q, _t = await asyncio.wait_for(waiting, 30)
        assert outputs["y"].tolist() == [[2]] and stats.execution_count == 1
        await batcher.close()

    asyncio.run(run())


def test_a_request_timeout_holds_while_a_batch_is_held_back() -> None:
    """The v2 ``timeout`` parameter is kept even when the queue delay would wait far longer."""

    async def run() -> None:
        batcher, stats = make(HELD, max_batch=4)
        kept = batcher.submit({"x": np.ones((1, 1), np.float32)}, 1)
        late = batcher.submit({"x": np.ones((1, 1), np.float32)}, 1, timeout_s=0.05)
        with pytest.raises(DeadlineExceeded, match="expired in the queue"):
            await asyncio.wait_for(late, 30)
        assert batcher.depth == 1 and not kept.done() and stats.execution_count == 0
        rest = [batcher.submit({"x": np.ones((1, 1), np.float32)}, 1) for _ in range(3)]
        await asyncio.gather(kept, *rest)
        assert stats.execution_count == 1
        await batcher.close()

    asyncio.run(run())


def test_prepare_sees_the_formed_batch_and_its_side_outputs_are_split_by_rows() -> None:
    """The batch is prepared once, whole, and a per-row side output returns to each member;
    a batch that fails to prepare falls back to each request alone, so one bad row fails alone."""
    prepared: list[int] = []

    def prepare(feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        x = feeds["x"]
        if (x > 100).any():
            raise InvalidArgument("too large to prepare")
        prepared.append(len(x))
        return {"x": x + 1}, {"seen": x[:, 0] * 10}

    async def run() -> list[object]:
        batcher = Batcher(
            "m:1",
            double,
            max_batch_size=8,
            policy=BatchingPolicy(),
            slots=1,
            stats=ModelStats(),
            prepare=prepare,
        )
        results = []
        for values in ((1, 2, 3, 4), (5, 300, 7, 8)):
            futures = [batcher.submit({"x": np.full((1, 1), v, np.float32)}, 1) for v in values]
            results += await asyncio.gather(*futures, return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(run())
    bad = results.pop(5)
    assert isinstance(bad, InvalidArgument) and bad.message == "too large to prepare"
    for (outputs, _q, _t), v in zip(results, (1, 2, 3, 4, 5, 7, 8), strict=True):  # type: ignore[misc]
        assert (outputs["y"].tolist(), outputs["seen"].tolist()) == ([[2 * (v + 1)]], [10 * v])
    assert max(prepared) > 1  # a merged batch was prepared whole


def test_inputs_of_other_names_never_share_a_batch() -> None:
    """A text version takes texts or token ids: two requests of the same shape but other input
    names must not be concatenated."""

    def either(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (name,) = feeds
        return {"y": feeds[name] * (2 if name == "a" else 3)}

    async def run() -> tuple[list[object], ModelStats]:
        batcher, stats = make(run=either)
        futures = [
            batcher.submit({"a" if i % 2 else "b": np.full((1, 1), i, np.float32)}, 1) for i in range(6)
        ]
        results = await asyncio.gather(*futures)
        await batcher.close()
        return results, stats

    results, _ = asyncio.run(run())
    assert [r[0]["y"].tolist() for r in results] == [[[i * (2 if i % 2 else 3)]] for i in range(6)]
