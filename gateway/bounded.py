"""Wait for a backend call no longer than its timeout, even when the call is slow to stop.

``asyncio.wait_for`` cancels a late call and then waits for it to finish. A Redis client that
is cleaning up a dead connection (or retrying inside its own code) can take far longer than the
timeout to honour that cancel, and the caller waits all that time: a request, or a breaker's
half-open trial that then never reports. Here the caller gets ``TimeoutError`` at the timeout;
the late call is cancelled and left to end in the background, its outcome consumed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


def _consume(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


async def bounded(call: Awaitable[T], timeout_s: float) -> T:
    """``call``'s result, or ``TimeoutError`` after ``timeout_s`` without waiting for it to stop."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_consume)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_consume)
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    return task.result()
