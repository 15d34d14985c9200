"""The near cache: bounded in bytes, least recently used out first, per-entry expiry."""

from __future__ import annotations

import pytest

from gateway.near_cache import NearCache


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bound_is_in_bytes_and_the_least_recently_used_goes_first() -> None:
    one = NearCache.cost("a", b"x" * 100)
    near = NearCache(max_bytes=2 * one)
    assert near.put("a", b"x" * 100, 10) and near.put("b", b"y" * 100, 10)
    assert near.get("a") == b"x" * 100  # a is now the most recent
    near.put("c", b"z" * 100, 10)
    assert (near.get("a"), near.get("b"), near.get("c")) == (b"x" * 100, None, b"z" * 100)
    assert near.bytes == 2 * one and near.evictions == 1 and len(near) == 2


def test_one_large_value_evicts_many_small_ones() -> None:
    near = NearCache(max_bytes=NearCache.cost("big", b"x" * 1000))
    for n in range(5):
        near.put(f"s{n}", b"1", 10)
    near.put("big", b"x" * 1000, 10)
    assert len(near) == 1 and near.get("big") is not None and near.bytes <= near.max_bytes


def test_entries_expire_at_their_own_time() -> None:
    clock = Clock()
    near = NearCache(max_bytes=10_000, clock=clock)
    near.put("short", b"1", 1)
    near.put("long", b"2", 5)
    clock.now = 1.0
    assert near.get("short") is None and near.get("long") == b"2"
    clock.now = 5.0
    assert near.get("long") is None
    assert len(near) == 0 and near.bytes == 0


def test_a_value_that_cannot_be_kept_drops_the_older_one_under_its_key() -> None:
    near = NearCache(max_bytes=NearCache.cost("k", b"old"))
    near.put("k", b"old", 10)
    assert near.put("k", b"far too large", 10) is False
    assert near.get("k") is None and near.bytes == 0
    near.put("k", b"old", 10)
    assert near.put("k", b"old", 0) is False and near.get("k") is None


def test_replacing_a_key_keeps_the_byte_count_exact() -> None:
    near = NearCache(max_bytes=10_000)
    near.put("k", b"1", 10)
    near.put("k", b"123", 10)
    assert near.bytes == NearCache.cost("k", b"123") and near.get("k") == b"123"
    near.clear()
    assert near.bytes == 0 and len(near) == 0


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="near cache size must be positive, got 0 bytes"):
        NearCache(0)
