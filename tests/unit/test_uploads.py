"""The shared oversized-upload drain: reads on up to its bound, then stops, whatever the client sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ferry.core.uploads import DRAIN_CAP_BYTES, drain, drain_budget


@dataclass
class Chunk:
    data: bytes


async def chunks(count: int, size: int, seen: list[int]) -> AsyncIterator[Chunk]:
    for _ in range(count):
        seen[0] += 1
        yield Chunk(b"x" * size)


def test_a_short_rest_is_read_to_its_end() -> None:
    seen = [0]
    total = asyncio.run(drain(chunks(5, 100, seen), size=1_100, max_bytes=1_000))
    assert (seen[0], total) == (5, 1_600)


def test_an_endless_upload_is_cut_off_at_the_bound() -> None:
    seen = [0]
    total = asyncio.run(drain(chunks(10_000, 1_000, seen), size=1_001, max_bytes=1_000))
    # budget = 1_001 + 4 * 1_000: the fifth chunk crosses it, and nothing after it is read
    assert (seen[0], total) == (5, 6_001)


def test_the_bound_is_four_limits_capped() -> None:
    assert drain_budget(10) == 40
    assert drain_budget(1 << 30) == DRAIN_CAP_BYTES
