"""A circuit breaker for the result cache: stop asking a sick Redis for a while.

closed -> (``failures`` errors in a row) -> open -> (after ``reset_s``) -> half-open:
one trial call goes through; success closes, failure opens again. A trial that has not
reported back within another ``reset_s`` is taken as lost, and the next call is the trial:
no single call, however it ends, can keep the breaker half-open for good. The clock is
injectable so the state machine is unit-tested without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


@dataclass
class CircuitBreaker:
    failures: int = 3
    reset_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    on_change: Callable[[str], None] | None = None
    _state: str = CLOSED
    _count: int = 0
    _opened_at: float = 0.0
    _trial_out: bool = field(default=False)
    _trial_at: float = 0.0

    @property
    def state(self) -> str:
        if self._state == OPEN and self.clock() - self._opened_at >= self.reset_s:
            self._set(HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """May a call go to the backend now? In half-open, only one trial at a time."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and (not self._trial_out or self.clock() - self._trial_at >= self.reset_s):
            self._trial_out = True
            self._trial_at = self.clock()
            return True
        return False

    def success(self) -> None:
        self._count = 0
        self._trial_out = False
        if self._state != CLOSED:
            self._set(CLOSED)

    def abandon(self) -> None:
        """A call that was let through ended without an answer (its caller was cancelled).

        It says nothing about the backend, so the state stays; but a half-open trial that never
        reports back would keep every later call out for good, so the next one may try.
        """
        self._trial_out = False

    def failure(self) -> None:
        self._trial_out = False
        if self._state == HALF_OPEN:
            self._open()
            return
        self._count += 1
        if self._count >= self.failures:
            self._open()

    def _open(self) -> None:
        self._count = 0
        self._opened_at = self.clock()
        self._set(OPEN)

    def _set(self, state: str) -> None:
        if state != self._state:
            self._state = state
            if self.on_change is not None:
                self.on_change(state)
