"""What every client-streamed upload shares: how an oversized one is turned away.

A server that ends a call while its client is still writing leaves the client's gRPC
core a failed send: the client then sees "Internal error from Core", not the
RESOURCE_EXHAUSTED it was sent. So an upload past its limit is read on (and
dropped) up to a bound before the refusal; an ordinary oversized file gets its real
answer, and a client that streams for ever is cut off at the bound anyway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

DRAIN_CAP_BYTES = 64 * 1024 * 1024


def drain_budget(max_bytes: int) -> int:
    """How many bytes past the limit are read and dropped before the call ends."""
    return min(4 * max_bytes, DRAIN_CAP_BYTES)


async def drain(chunks: AsyncIterator[Any], size: int, max_bytes: int) -> int:
    """Read and drop the rest of an oversized upload (messages with a ``data`` field), up to
    ``drain_budget`` bytes more; returns the bytes seen in all."""
    budget = size + drain_budget(max_bytes)
    async for chunk in chunks:
        size += len(chunk.data)
        if size > budget:
            break
    return size
