"""The near cache: an in-process LRU bounded in bytes, the first level in front of Redis.

A hit in Redis still costs a network round trip and a share of the event loop for the
client's parsing, which is what kept a Redis-configured gateway slower than one with only
the in-process LRU. The near cache answers repeated requests from memory, so a hit there
makes no Redis call at all.

It is bounded in bytes rather than entries because answers vary from a few bytes to the
cache's value cap: a count bound would let a handful of large answers take gigabytes.
Each entry carries its own expiry, which the caller sets no later than the entry's Redis
TTL, so the near cache never serves what Redis would already have forgotten. Entries are
keyed by model and *resolved* version like Redis keys, so a version roll-out cannot
serve an old answer here either. Pure and clocked by an injectable function, so it is
unit-tested without sleeping.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

# What one entry costs beyond its key and value bytes: the OrderedDict node, the tuple and
# two object headers, roughly. Counting it keeps many tiny entries from overshooting the bound.
ENTRY_OVERHEAD_BYTES = 160


class NearCache:
    """Least recently used entries go first once the byte total passes ``max_bytes``."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 1:
            raise ValueError(f"near cache size must be positive, got {max_bytes} bytes")
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self.evictions = 0
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    @staticmethod
    def cost(key: str, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD_BYTES

    def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return entry[1]

    def put(self, key: str, value: bytes, ttl_s: float) -> bool:
        """Store ``value`` for ``ttl_s`` seconds; False when it cannot be kept at all."""
        cost = self.cost(key, value)
        if ttl_s <= 0 or cost > self.max_bytes:
            self.discard(key)  # an older answer under this key must not outlive the new one
            return False
        self.discard(key)
        self._data[key] = (self.clock() + ttl_s, value)
        self.bytes += cost
        while self.bytes > self.max_bytes:
            old, _ = next(iter(self._data.items()))
            self._drop(old)
            self.evictions += 1
        return True

    def discard(self, key: str) -> None:
        if key in self._data:
            self._drop(key)

    def _drop(self, key: str) -> None:
        _, value = self._data.pop(key)
        self.bytes -= self.cost(key, value)

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)
