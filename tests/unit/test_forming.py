"""The shared batch-forming policy: wait while the loop is busy, never forever."""

from __future__ import annotations

from typing import Any

from ferry.core.forming import FormingBatch


class Loop:
    """Just the part of an asyncio loop the policy reads."""

    def __init__(self) -> None:
        self._ready: list[Any] = []


def test_waits_one_pass_then_only_while_the_loop_has_work() -> None:
    loop = Loop()
    forming = FormingBatch(loop, max_passes=8)  # type: ignore[arg-type]
    assert forming.wait(1) is True  # always one pass: the calls decoded beside it may join
    assert forming.wait(1) is False  # loop idle: send
    assert forming.passes == 0
    loop._ready.append(object())
    assert [forming.wait(n) for n in range(1, 5)] == [True] * 4
    loop._ready.clear()
    assert forming.wait(5) is False


def test_gives_up_after_max_passes_even_when_busy() -> None:
    loop = Loop()
    loop._ready.append(object())
    forming = FormingBatch(loop, max_passes=3)  # type: ignore[arg-type]
    assert [forming.wait(1) for _ in range(4)] == [True, True, True, False]
    assert forming.wait(1) is True  # reset: the next batch starts over


def test_without_a_visible_queue_waits_while_the_batch_grows() -> None:
    forming = FormingBatch(object(), max_passes=10)  # type: ignore[arg-type]
    assert forming.wait(1) is True
    assert forming.wait(3) is True  # grew last pass
    assert forming.wait(3) is False  # did not: send
