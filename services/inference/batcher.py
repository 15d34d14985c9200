"""Dynamic batching: concurrent requests for one model version become one ORT run.

The policy half is pure (``plan_batch``, ``queue_wait``) and unit-tested without
a server. The async half (``Batcher``) keeps a bounded queue per priority level
and dispatches as soon as a runner slot is free: while a batch runs, the next
one forms by itself, so at concurrency 1 nothing waits on a timer, and under load
batches grow up to ``max_batch_size`` rows. ``max_queue_delay_us`` (default 0)
optionally holds a small batch back to let it grow.

Only requests whose inputs and non-batch dimensions agree are concatenated (token ids
of a free sequence length run one batch per length unless ``sequence_buckets`` pad them;
raw texts, one per row, all merge and are tokenized as one batch by ``prepare``). If a merged run fails,
each request is run alone, so one bad request never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ferry.core.errors import (
    DeadlineExceeded,
    FerryError,
    Internal,
    InvalidArgument,
    ModelUnavailable,
    ResourceExhausted,
)
from ferry.core.forming import FormingBatch
from ferry.core.grpcserver import incident
from ferry.core.modelconfig import BatchingPolicy
from services.inference.stats import ModelStats

Outputs = dict[str, np.ndarray]
# A lone request whose model's recent runs average below this runs inline on the event loop
# (one runner slot only).
INLINE_BELOW_NS = 1_000_000
RunFn = Callable[[dict[str, np.ndarray]], Outputs]
# Turns a formed batch's inputs into the graph's feeds, with per-row side outputs to split and
# hand back with the graph's (a text model tokenizes here: ``services.inference.textfeeds``).
PrepareFn = Callable[[dict[str, np.ndarray]], tuple[dict[str, np.ndarray], Outputs]]


@dataclass(eq=False)
class Pending:
    """One queued request."""

    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple[tuple[str, tuple[int, ...]], ...]
    future: asyncio.Future[Any]
    enqueued_ns: int
    deadline: float | None = None  # time.monotonic() seconds
    timings: dict[str, int] = field(default_factory=dict)


def shape_key(inputs: dict[str, np.ndarray], batched: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Requests with equal keys can be concatenated along the first axis. Names count: a text
    model's version takes texts or token ids, and a batch holds one kind."""
    return tuple((name, a.shape[1:] if batched else a.shape) for name, a in inputs.items())


def plan_batch(items: Sequence[tuple[int, Any]], max_rows: int, preferred: Sequence[int] = ()) -> list[int]:
    """Pick which queued requests (``(rows, key)`` in arrival order) run together.

    The first request always runs; later ones join while their key matches and the
    row total stays within ``max_rows``. With preferred sizes, the batch is cut at
    the largest preferred size that a prefix of the picked requests hits exactly.
    """
    if not items:
        return []
    first_rows, first_key = items[0]
    picked, total = [0], first_rows
    if max_rows > 0:
        for i in range(1, len(items)):
            rows, key = items[i]
            if key != first_key:
                continue
            if total + rows > max_rows:
                break
            picked.append(i)
            total += rows
    if preferred and len(picked) > 1:
        sums, acc = {}, 0
        for n, i in enumerate(picked):
            acc += items[i][0]
            sums[acc] = n + 1
        hits = [p for p in preferred if p in sums]
        if hits:
            picked = picked[: sums[max(hits)]]
    return picked


def queue_wait(policy: BatchingPolicy, queued_rows: int, oldest_wait_us: float, max_rows: int) -> float:
    """Seconds to hold a batch back so it can grow; 0 means dispatch now."""
    if policy.max_queue_delay_us <= 0:
        return 0.0
    target = max(policy.preferred_batch_sizes, default=max_rows)
    if queued_rows >= target:
        return 0.0
    return max(0.0, (policy.max_queue_delay_us - oldest_wait_us) / 1e6)


class Batcher:
    """The queue and dispatcher of one model version."""

    def __init__(
        self,
        label: str,
        run: RunFn,
        *,
        max_batch_size: int,
        policy: BatchingPolicy | None,
        slots: int,
        stats: ModelStats,
        prepare: PrepareFn | None = None,
    ) -> None:
        self.label = label
        self._run = run
        self._prepare = prepare
        self._batched = max_batch_size > 0
        self._max_rows = max_batch_size if (policy is not None and self._batched) else 0
        self._policy = policy or BatchingPolicy()
        self._stats = stats
        self._queues: list[deque[Pending]] = [deque() for _ in range(self._policy.priority_levels)]
        self._count = 0
        self._inflight = 0
        self._running_requests = 0
        self._closed = False
        self._flushing = False
        self._slots = slots
        self._free = slots
        # At light load (a batch of one) a short run goes inline on the event loop: the thread
        # hand-off (executor submit, wake-up, call_soon_threadsafe) costs more than a small
        # model's whole run. A batch of several means load: it runs in the executor, so the loop
        # keeps reading calls meanwhile and the next batch is formed when this one finishes.
        self._inline_below_ns = INLINE_BELOW_NS if slots == 1 else 0
        self._run_ns_avg: float | None = None
        self._runs = 0
        self._forming = FormingBatch(asyncio.get_running_loop())
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix=f"ort-{label}")
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._dispatch(), name=f"batcher-{label}")

    # --- submitting ---------------------------------------------------------------------------

    def submit(
        self, inputs: dict[str, np.ndarray], rows: int, priority: int = 0, timeout_s: float | None = None
    ) -> asyncio.Future[Any]:
        """Queue a request; the future resolves to ``(outputs, timings)``. Synchronous on purpose:
        a caller that resolved this version enqueues before any switch can close it."""
        if self._closed:
            raise ModelUnavailable(f"model {self.label} is unloading; retry to reach the current version")
        if self._count >= self._policy.max_queue_size:
            raise ResourceExhausted(
                f"queue of model {self.label} is full ({self._policy.max_queue_size} requests)"
            )
        level = min(max(priority or self._policy.default_priority_level, 1), len(self._queues)) - 1
        default_s = self._policy.default_timeout_us / 1e6 if self._policy.default_timeout_us else None
        limits = [t for t in (timeout_s, default_s) if t is not None]
        deadline = time.monotonic() + min(limits) if limits else None
        future: asyncio.Future[Any] = self._loop.create_future()
        pending = Pending(
            inputs, rows, shape_key(inputs, self._batched), future, time.perf_counter_ns(), deadline
        )
        queue = self._queues[level]
        queue.append(pending)
        future.add_done_callback(lambda f: self._left(queue, pending))
        self._count += 1
        self._wakeup.set()
        return future

    def _left(self, queue: deque[Pending], pending: Pending) -> None:
        """A caller that gave up (cancelled, or its deadline passed at the transport) leaves the
        queue at once: its place counts toward ``max_queue_size`` and the depth gauge no longer."""
        if pending.future.cancelled() and pending in queue:
            queue.remove(pending)
            self._count -= 1
            self._wakeup.set()

    # --- dispatching --------------------------------------------------------------------------

    def _queued(self) -> deque[Pending] | None:
        for q in self._queues:  # a plain loop: this runs on every event-loop pass of a forming batch
            if q:
                return q
        return None

    def _gone(self, p: Pending, now: float) -> bool:
        """True when ``p`` leaves the queue unrun: its caller went away, or its deadline passed
        (its caller then gets DEADLINE_EXCEEDED)."""
        if p.future.done():
            return True
        if p.deadline is not None and now >= p.deadline:
            p.future.set_exception(
                DeadlineExceeded(f"request to model {self.label} expired in the queue before it ran")
            )
            return True
        return False

    def _drop_dead(self, queue: deque[Pending]) -> None:
        """Drop the dead requests at the head of ``queue`` (every dispatcher pass: cheap)."""
        now = time.monotonic()
        while queue and self._gone(queue[0], now):
            queue.popleft()
            self._count -= 1

    def _expire(self, queue: deque[Pending]) -> None:
        """Drop dead requests wherever they wait in the queue (when a deadline falls due)."""
        now = time.monotonic()
        keep = [p for p in queue if not self._gone(p, now)]
        self._count -= len(queue) - len(keep)
        queue.clear()
        queue.extend(keep)

    async def _dispatch(self) -> None:
        while True:
            queue = self._queued()
            if queue is not None:
                self._drop_dead(queue)
                queue = self._queued()
            if queue is None or self._free == 0:
                if self._closed and self._count == 0 and self._inflight == 0:
                    self._drained.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._max_rows > 0 and self._count < self._max_rows and self._forming.wait(self._count):
                await asyncio.sleep(0)  # one more loop pass: the calls it decodes may join
                continue
            self._forming.reset()
            wait = queue_wait(
                self._policy,
                sum(p.rows for p in queue),
                (time.perf_counter_ns() - queue[0].enqueued_ns) / 1e3,
                self._max_rows,
            )
            if wait > 0 and not (self._closed or self._flushing):
                soonest = _soonest_deadline(queue)
                expires = soonest is not None and soonest - time.monotonic() < wait
                if expires:  # a queued request's deadline comes first: wake for it, not later
                    wait = max(0.0, soonest - time.monotonic())  # type: ignore[operator]
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except TimeoutError:
                    pass
                else:
                    continue
                if expires:
                    self._expire(queue)
                    continue
                queue = self._queued()
                if queue is None:
                    continue
            self._launch(queue)

    def _launch(self, queue: deque[Pending]) -> None:
        items = list(queue)
        picked = plan_batch(
            [(p.rows, p.key) for p in items], self._max_rows, self._policy.preferred_batch_sizes
        )
        chosen = [items[i] for i in picked]
        keep = set(picked)
        queue.clear()
        queue.extend(p for i, p in enumerate(items) if i not in keep)
        self._count -= len(picked)
        now = time.monotonic()
        for p in chosen:
            if not p.future.done() and p.deadline is not None and now >= p.deadline:
                p.future.set_exception(
                    DeadlineExceeded(f"request to model {self.label} expired in the queue")
                )
        chosen = [p for p in chosen if not p.future.done()]
        if not chosen:
            return
        self._free -= 1
        self._inflight += 1
        self._running_requests += len(chosen)
        start = time.perf_counter_ns()
        inputs, rows = [p.inputs for p in chosen], [p.rows for p in chosen]
        avg = self._run_ns_avg
        if len(chosen) == 1 and avg is not None and avg < self._inline_below_ns:
            try:
                outcome: Any = self._execute(inputs, rows)
            except Exception as err:
                outcome = err
            self._complete(chosen, outcome, start)
            return
        cf = self._loop.run_in_executor(self._executor, self._execute, inputs, rows)
        cf.add_done_callback(lambda f: self._finish(chosen, f, start))

    def _execute(
        self, inputs: list[dict[str, np.ndarray]], rows: list[int]
    ) -> tuple[list[Any], int, int, int, int]:
        """Runs in an executor thread: concatenate, prepare, run, split. Returns per-request
        results; preparing (a text batch's tokenizing) counts as the batch's input time."""
        t0 = time.perf_counter_ns()
        total = sum(rows)
        if len(inputs) == 1:
            feeds = inputs[0]
        else:
            feeds = {name: np.concatenate([r[name] for r in inputs], axis=0) for name in inputs[0]}
        t1 = time.perf_counter_ns()
        try:
            feeds, side = self._prepared(feeds)
            t1 = time.perf_counter_ns()
            outputs = {**self._run(feeds), **side}
        except Exception as err:
            if len(inputs) == 1:
                return [_as_ferry_error(err, self.label)], total, t1 - t0, 0, 0
            return [self._run_alone(r) for r in inputs], total, t1 - t0, 0, 0
        t2 = time.perf_counter_ns()
        if len(inputs) == 1:
            results: list[Any] = [outputs]
        else:
            results, offset = [], 0
            for n in rows:
                results.append(
                    {
                        k: (v[offset : offset + n] if v.ndim and v.shape[0] == total else v)
                        for k, v in outputs.items()
                    }
                )
                offset += n
        t3 = time.perf_counter_ns()
        return results, total, t1 - t0, t2 - t1, t3 - t2

    def _prepared(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Outputs]:
        """The graph's feeds and the per-row side outputs of a batch, or of one request alone."""
        return self._prepare(feeds) if self._prepare is not None else (feeds, {})

    def _run_alone(self, feeds: dict[str, np.ndarray]) -> Any:
        try:
            feeds, side = self._prepared(feeds)
            return {**self._run(feeds), **side}
        except Exception as err:
            return _as_ferry_error(err, self.label)

    def _finish(self, chosen: list[Pending], done: asyncio.Future[Any], start_ns: int) -> None:
        try:
            outcome: Any = done.result()
        except Exception as err:
            outcome = err
        self._complete(chosen, outcome, start_ns)

    def _complete(self, chosen: list[Pending], outcome: Any, start_ns: int) -> None:
        """Resolve the futures of one run; ``outcome`` is ``_execute``'s result or its exception."""
        self._free += 1
        self._inflight -= 1
        self._running_requests -= len(chosen)
        self._wakeup.set()
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            results, total, input_ns, infer_ns, output_ns = outcome
            if infer_ns:
                run_ns = input_ns + infer_ns + output_ns
                avg = self._run_ns_avg
                self._run_ns_avg = run_ns if avg is None else 0.8 * avg + 0.2 * run_ns
        except Exception as err:
            results, total, input_ns, infer_ns, output_ns = (
                [_as_ferry_error(err, self.label)] * len(chosen),
                0,
                0,
                0,
                0,
            )
        if infer_ns:
            self._stats.record_execution(total, input_ns, infer_ns, output_ns)
        self._runs += 1
        timings = {
            "queue_start": start_ns,
            "input": input_ns,
            "infer": infer_ns,
            "output": output_ns,
            "batch": self._runs,  # which run it was, and its rows: what a trace says it joined
            "rows": total,
        }
        for pending, result in zip(chosen, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.timings = timings
                pending.future.set_result((result, start_ns - pending.enqueued_ns, timings))

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests waiting for a run (read by the metrics scrape, from another thread)."""
        return self._count

    @property
    def running(self) -> int:
        """Requests whose run is in progress now."""
        return self._running_requests

    def oldest_wait_s(self) -> float:
        """How long the oldest waiting request has waited; 0 when none waits. Safe off the loop:
        a queue emptied meanwhile reads as no wait."""
        oldest = 0
        for q in self._queues:
            try:
                head = q[0].enqueued_ns
            except IndexError:
                continue
            oldest = head if not oldest else min(oldest, head)
        return max(0.0, (time.perf_counter_ns() - oldest) / 1e9) if oldest else 0.0

    @property
    def idle(self) -> bool:
        return self._count == 0 and self._inflight == 0

    def flush(self) -> None:
        """Send queued requests on without waiting out ``max_queue_delay_us``: the worker is
        draining, and a batch held back to grow would only spend the drain's grace."""
        self._flushing = True
        self._wakeup.set()

    async def close(self) -> None:
        """Stop taking requests, finish every queued and running one, then release threads."""
        self._closed = True
        self._wakeup.set()
        if not self.idle:
            await self._drained.wait()
        self._task.cancel()
        self._executor.shutdown(wait=False)


def _soonest_deadline(queue: deque[Pending]) -> float | None:
    return min((p.deadline for p in queue if p.deadline is not None), default=None)


def _as_ferry_error(err: BaseException, label: str) -> FerryError:
    if isinstance(err, FerryError):
        return err
    kind = type(err).__name__
    if kind == "InvalidArgument" and "onnxruntime" in type(err).__module__:
        # the caller's own input was refused: ONNX Runtime's first line says which and why
        first = (str(err).strip().splitlines() or [kind])[0][:300]
        return InvalidArgument(f"model {label} rejected the input: {first}")
    return Internal(incident(err, f"model {label} failed to run"))
