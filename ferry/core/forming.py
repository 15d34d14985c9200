"""When a batch that is not full should leave: the policy the worker's and the gateway's batchers share.

A request reaches a batcher only after the event loop has read and decoded its
call, one callback among many. Sending a batch the moment a slot frees makes
batches of whatever happened to be decoded by then, often one or two requests,
while a dozen more calls sit in the loop's queue. So a forming batch waits, one
loop pass at a time, while the loop has other callbacks ready, and leaves when
the loop has nothing else to do (at light load: at once), when it is full, or
after ``max_passes`` passes.
"""

from __future__ import annotations

import asyncio

MAX_PASSES = 64


class FormingBatch:
    """Pass-by-pass verdicts for one queue: ``wait(size)`` is True while the batch should grow."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_passes: int = MAX_PASSES) -> None:
        self._loop = loop
        self._max_passes = max_passes
        self.passes = 0
        self._seen = -1

    def _busy(self, size: int) -> bool:
        # asyncio's loop keeps its ready callbacks in ``_ready``; a loop without it (uvloop) is
        # judged by whether the last pass brought the batch anything
        ready = getattr(self._loop, "_ready", None)
        return len(ready) > 0 if ready is not None else size != self._seen

    def wait(self, size: int) -> bool:
        """Called when a slot is free and ``size`` requests are queued; False: send them now."""
        if self.passes < self._max_passes and (self.passes == 0 or self._busy(size)):
            self.passes += 1
            self._seen = size
            return True
        self.reset()
        return False

    def reset(self) -> None:
        self.passes = 0
        self._seen = -1
