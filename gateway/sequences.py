"""Sticky routing for sequences: every request of one sequence reaches the worker that holds its state.

A request belongs to a sequence when its request parameters carry ``sequence_id`` (an int64 or
uint64 above 0, or a non-empty string), with ``sequence_start`` / ``sequence_end`` (bool) marking
its first and last request; Triton's clients set them with ``infer(..., sequence_id=7,
sequence_start=True)``. The worker keeps a live sequence's state in its own memory, so:

- ``rendezvous`` / ``ranked``: highest-random-weight hashing of the sequence's key over worker
  addresses. Stable across processes (a keyed hash, not Python's ``hash``), so every gateway
  replica picks the same worker for a sequence while the worker set is the same, and adding or
  removing one worker only moves the sequences that hashed to it.
- ``StickyMap``: which worker (and version) each live sequence went to, bounded (least recently
  used first out) and forgetting sequences idle for ``idle_s``; the clock is injectable.
- ``SequenceOrder``: the requests of one sequence go upstream one at a time, in the order they
  reached the gateway (the requests of a ModelStreamInfer stream otherwise run concurrently).

Pure logic, unit-tested without a server; ``gateway.dataplane`` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ferry.core.sequencing import sequence_control, shown_id

# A sequence's identity: (model, "int" | "str", id). An int64 7 and a uint64 7 are one sequence;
# the string "7" is another.
SequenceKey = tuple[str, str, int | str]


class WaitedTooLong(TimeoutError):
    """A request's turn did not come before its timeout (``SequenceOrder.turn``)."""


@dataclass(frozen=True)
class SequenceRef:
    """One request's place in its sequence."""

    key: SequenceKey
    start: bool
    end: bool

    @property
    def model(self) -> str:
        return self.key[0]

    def describe(self) -> str:
        """``sequence 7 of model 'm'`` (a string id is quoted: ``sequence '7' of model 'm'``)."""
        _, kind, ident = self.key
        return f"sequence {shown_id((kind, ident))} of model {self.model!r}"

    def lost(self, address: str) -> str:
        """Why a request of this sequence cannot run: the worker that held its state is gone."""
        return (
            f"{self.describe()} lived on worker {address}, which is gone; its state is lost; "
            "start the sequence again with sequence_start"
        )


def sequence_of(model: str, parameters: Mapping[str, Any]) -> SequenceRef | None:
    """The sequence a request belongs to, or None when it names none; controls the worker would
    refuse (a negative or non-integer id, a flag that is not a bool) are refused here the same way,
    by the one reader in ``ferry.core.sequencing``."""
    control = sequence_control(parameters)
    if control is None:
        return None
    kind, ident = control.key
    return SequenceRef((model, kind, ident), control.start, control.end)


def _weight(key: SequenceKey, address: str) -> int:
    model, kind, ident = key
    data = "\x1f".join((model, kind, str(ident), address)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"ferry-seq").digest(), "big")


def ranked(key: SequenceKey, addresses: Iterable[str]) -> list[str]:
    """``addresses`` from the sequence's first choice to its last (rendezvous hashing)."""
    return sorted(dict.fromkeys(addresses), key=lambda a: (_weight(key, a), a), reverse=True)


def rendezvous(key: SequenceKey, addresses: Iterable[str]) -> str | None:
    """The worker a sequence goes to among ``addresses``; None when there is none."""
    best = ranked(key, addresses)
    return best[0] if best else None


@dataclass
class Pin:
    """Where a live sequence runs: its worker and the model version it started on."""

    address: str
    version: str
    used: float


class StickyMap:
    """Sequence -> worker, for at most ``max_entries`` sequences, each forgotten after ``idle_s``
    without a request. The least recently used sequence leaves first when the map is full."""

    def __init__(
        self, max_entries: int = 65536, idle_s: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max(1, max_entries)
        self.idle_s = idle_s
        self.clock = clock
        self._pins: OrderedDict[SequenceKey, Pin] = OrderedDict()
        self.evicted = 0  # pushed out by the cap while still live
        self.expired = 0  # forgotten after idle_s

    def get(self, key: SequenceKey) -> Pin | None:
        """The sequence's pin, if it is live (a lookup does not count as use)."""
        pin = self._pins.get(key)
        if pin is None:
            return None
        if self.clock() - pin.used >= self.idle_s:
            del self._pins[key]
            self.expired += 1
            return None
        return pin

    def put(self, key: SequenceKey, address: str, version: str) -> Pin:
        """Pin (or re-pin) a sequence after a request of it ran; it counts as used now."""
        now = self.clock()
        pin = self._pins[key] = Pin(address, version, now)
        self._pins.move_to_end(key)
        self._expire(now)
        while len(self._pins) > self.max_entries:
            self._pins.popitem(last=False)
            self.evicted += 1
        return pin

    def drop(self, key: SequenceKey) -> None:
        self._pins.pop(key, None)

    def _expire(self, now: float) -> None:
        # entries are in order of last use: the idle ones are at the front
        while self._pins:
            key, pin = next(iter(self._pins.items()))
            if now - pin.used < self.idle_s:
                return
            del self._pins[key]
            self.expired += 1

    def __len__(self) -> int:
        self._expire(self.clock())
        return len(self._pins)


class SequenceOrder:
    """One request of a sequence upstream at a time, in arrival order.

    ``turn`` takes its place in the sequence's queue before it first waits, so requests that
    reach the gateway in some order (the tasks of one stream) run in that order.
    """

    def __init__(self) -> None:
        self._tails: dict[SequenceKey, asyncio.Future[None]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, key: SequenceKey, timeout: float | None = None) -> AsyncIterator[None]:
        """Wait until every earlier request of ``key`` is done (``WaitedTooLong`` after ``timeout``)."""
        before = self._tails.get(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[key] = mine
        try:
            if before is not None and not before.done():
                try:
                    await asyncio.wait_for(asyncio.shield(before), timeout)
                except TimeoutError:
                    raise WaitedTooLong(f"still waiting after {timeout} s") from None
            yield
        finally:
            if before is None or before.done():
                self._release(key, mine)
            else:  # left before its turn (deadline, cancelled): the next still waits for ``before``
                before.add_done_callback(lambda _f: self._release(key, mine))

    def _release(self, key: SequenceKey, mine: asyncio.Future[None]) -> None:
        if not mine.done():
            mine.set_result(None)
        if self._tails.get(key) is mine:
            del self._tails[key]

    def __len__(self) -> int:
        return len(self._tails)
