"""The live sequences of one model version: each one's state between requests, their order, their
expiry (the policy is ``ferry.core.sequencing``).

A sequence's requests run one at a time, in the order they arrive (a lock per sequence), while
different sequences' requests go to the batcher together and share executions. A request is fed
the sequence's state (the initial state on ``sequence_start``, which also resets a live one) and
the state outputs it produces become the sequence's state; they are not sent to the client. A
step that fails leaves the state as it was. ``sequence_end`` frees the state after its request,
and a sequence left idle past ``max_sequence_idle_microseconds`` is freed by a timer, so memory
is bounded by ``max_candidate_sequences`` states whether clients end their sequences or not.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferry.core.codec import numpy_dtype
from ferry.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from ferry.core.sequencing import INITIAL_STATE_DIR, SequenceControl, SequencePolicy
from ferry.core.warmup import read_row

Arrays = dict[str, np.ndarray]
Answer = tuple[Arrays, int, dict[str, int]]  # the batcher's: outputs, queue ns, stage timings
Key = tuple[str, int | str]
REMEMBER_EXPIRED = 4096  # ids whose expiry a late request is told about


@dataclass(eq=False)
class Live:
    state: Arrays
    last: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    busy: int = 0  # requests entered and not yet left: such a sequence never expires
    ended: bool = False


def initial_states(policy: SequencePolicy, batched: bool, model_dir: Path, where: str) -> Arrays:
    """Each state's initial value as fed for one sequence (with its batch axis when the model batches)."""
    out: Arrays = {}
    for s in policy.states:
        if s.data_file:
            here = f"{where} initial state {s.input_name!r}"
            value = read_row(model_dir / INITIAL_STATE_DIR / s.data_file, s.datatype, s.dims, here)
        else:
            value = np.zeros(s.dims, dtype=numpy_dtype(s.datatype))
        value = value[None, ...] if batched else value
        value.setflags(write=False)  # shared by every sequence that starts from it
        out[s.input_name] = value
    return out


def check_graph(policy: SequencePolicy, graph_inputs: list[str], graph_outputs: list[str]) -> None:
    """Every state names a graph input and a graph output; else the model cannot be fed."""
    missing = [s.input_name for s in policy.states if s.input_name not in graph_inputs]
    missing += [s.output_name for s in policy.states if s.output_name not in graph_outputs]
    if missing:
        raise InvalidArgument(f"sequence_batching names state tensors the graph does not have: {missing}")


class Sequences:
    """The table of one model version's live sequences."""

    def __init__(
        self,
        model: str,
        policy: SequencePolicy,
        initial: Arrays,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.policy = policy
        self._initial = initial
        self._clock = clock
        self._idle_s = policy.idle_us / 1e6
        self._live: OrderedDict[Key, Live] = OrderedDict()  # least recently used first
        self._expired: OrderedDict[Key, None] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._live)

    async def run(self, control: SequenceControl, step: Callable[[Arrays], Awaitable[Answer]]) -> Answer:
        """Run one request of the sequence: ``step`` gets the state to feed and returns the batcher's
        answer; its state outputs are taken out and kept, the rest returned."""
        for _ in range(2):
            live = self._enter(control)
            try:
                async with live.lock:
                    if not live.ended:
                        return await self._step(control, live, step)
            finally:
                self._leave(live)
            if not control.start:  # the sequence ended while this request waited its turn
                break
        raise self._unknown(control)

    async def _step(
        self, control: SequenceControl, live: Live, step: Callable[[Arrays], Awaitable[Answer]]
    ) -> Answer:
        try:
            answer = await step(self._initial if control.start else live.state)
            outputs = answer[0]
            # copies: a view would keep the whole batch's output alive with each sequence
            live.state = {s.input_name: outputs.pop(s.output_name).copy() for s in self.policy.states}
            return answer
        finally:
            if control.end:
                live.ended = True
                if self._live.get(control.key) is live:
                    del self._live[control.key]

    def _enter(self, control: SequenceControl) -> Live:
        if self._closed:
            raise FailedPrecondition(f"model {self.model!r}: this version is unloading; its sequences end")
        now = self._clock()
        self.expire(now)
        live = self._live.get(control.key)
        if live is None:
            if not control.start:
                raise self._unknown(control)
            if len(self._live) >= self.policy.max_sequences:
                raise ResourceExhausted(
                    f"model {self.model!r} holds {len(self._live)} live sequences, its limit "
                    f"(max_candidate_sequences); end one with sequence_end, or wait for an idle one "
                    f"to expire ({self._idle_s:g} s)"
                )
            live = Live(self._initial, now)
            self._live[control.key] = live
            self._expired.pop(control.key, None)
        self._live.move_to_end(control.key)
        live.busy += 1
        live.last = now
        return live

    def _leave(self, live: Live) -> None:
        live.busy -= 1
        live.last = self._clock()
        self._arm()

    def _unknown(self, control: SequenceControl) -> InvalidArgument:
        if control.key in self._expired:
            return InvalidArgument(
                f"sequence {control.shown()} of model {self.model!r} expired after {self._idle_s:g} s idle "
                "(max_sequence_idle_microseconds) and its state is gone; start it again with sequence_start"
            )
        return InvalidArgument(
            f"sequence {control.shown()} of model {self.model!r} is not live: its first request must "
            "carry sequence_start"
        )

    def expire(self, now: float) -> int:
        """Free the sequences idle past the limit; returns how many."""
        gone = []
        for key, live in self._live.items():  # least recently entered first: stop at a fresh one
            if live.busy:
                continue
            if now - live.last <= self._idle_s:
                break
            gone.append(key)
        for key in gone:
            self._live.pop(key).ended = True
            self._expired[key] = None
            self._expired.move_to_end(key)
        while len(self._expired) > REMEMBER_EXPIRED:
            self._expired.popitem(last=False)
        return len(gone)

    def _arm(self) -> None:
        """A timer for the next expiry, so idle state is freed without traffic to trigger it."""
        if self._timer is not None or self._closed or not self._live:
            return
        oldest = next(iter(self._live.values())).last  # about the oldest; a timer early re-arms
        delay = max(0.0, oldest + self._idle_s - self._clock()) + 0.01
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.expire(self._clock())
        self._arm()

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for live in self._live.values():
            live.ended = True
        self._live.clear()
