"""One upstream call, routed, raced and retried: the gateway->worker hop.

Picks a worker with ``Router`` among those ``Discovery`` says have the version
ready and forwards the caller's remaining deadline and request id. Three things
start another attempt on another worker while attempts, the caller's deadline
and the retry budget allow:

- the call failed at the transport (UNAVAILABLE, a broken connection);
- the attempt stayed silent past its per-try budget (a frozen or cut-off worker
  keeps its connection, so only a clock notices): the silent attempt keeps
  running, the first answer wins, and the silence counts towards ejection;
- the hedge delay passed with no answer (hedging, off by default).

Losers are cancelled. Inference is idempotent, so a batch may run twice; requests
of a sequence (``sequence_id``) never run anywhere but where they were sent: the
data plane names their worker (``infer_on``), and a failure of that worker is
``WorkerLost``, never a retry elsewhere.
When the gateway chose the version (the caller named none) and the worker says
that version is gone, the version is re-resolved and the call retried: a rollout
must not fail requests. The decisions themselves live in ``gateway.hedging``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.client._channel import error_reason, translate
from ferry.core import tracing
from ferry.core.errors import DeadlineExceeded, FerryError, ModelUnavailable, Unavailable
from gateway import metrics
from gateway.discovery import Discovery
from gateway.hedging import HedgePolicy, LatencyWindow, RetryBudget, is_sequence
from gateway.router import VERSION_GONE, RetryPolicy, Router

log = logging.getLogger("ferry.gateway.upstream")

_BROKEN = ("socket closed", "connection reset", "broken pipe", "rst_stream", "connection refused", "eof")

Invoke = Callable[[Any, Any, float | None, tuple[tuple[str, str], ...]], Awaitable[Any]]


def broken_connection(err: grpc.aio.AioRpcError) -> bool:
    """The call died with the connection or the worker, not because of the request.

    CANCELLED counts: the gateway's own cancellations surface as ``CancelledError``,
    never as a status, so a CANCELLED status means the worker cancelled the call
    (it was shutting down).
    """
    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return True
    details = (err.details() or "").lower()
    return err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(
        b in details for b in _BROKEN
    )


def worker_failed(err: grpc.aio.AioRpcError) -> bool:
    """The worker or its connection failed, not the request: a broken connection that is not the
    worker's own answer that a model cannot serve there (``ModelUnavailable``, told by its reason
    in the trailing metadata, not by its wording)."""
    return broken_connection(err) and error_reason(err) != ModelUnavailable.reason


class WorkerLost(Unavailable):
    """The one worker a call had to run on failed, or its connection did (``infer_on``)."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(message)
        self.address = address


def call_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    """What every call to a worker carries: the request id, and the current span when tracing."""
    return (("x-request-id", request_id), *tracing.outgoing())


def _model_infer(worker: Any, request: Any, timeout: float | None, metadata: Any) -> Awaitable[Any]:
    return worker.stub.ModelInfer(request, timeout=timeout, metadata=metadata)


@dataclass
class _Attempt:
    address: str
    kind: str  # first, retry, hedge
    started: float
    due: float | None  # when its per-try budget runs out; None: no budget, or already spent


class Upstream:
    """Routed, raced, retried calls to workers."""

    def __init__(
        self,
        discovery: Discovery,
        router: Router,
        policy: RetryPolicy,
        hedging: HedgePolicy | None = None,
        budget: RetryBudget | None = None,
    ) -> None:
        self.discovery = discovery
        self.router = router
        self.policy = policy
        self.hedging = hedging or HedgePolicy()
        self.budget = budget or RetryBudget()
        self.windows: dict[str, LatencyWindow] = {}

    async def infer(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        request_id: str,
        pinned: bool,
    ) -> pb.ModelInferResponse:
        """Run ``request`` (its ``model_version`` already resolved) on some worker."""
        sequence = is_sequence(request.parameters)
        return await self.call(
            request.model_name,
            request.model_version,
            request,
            deadline,
            request_id,
            _model_infer,
            pinned=pinned,
            grey=not sequence,
            once=sequence,
        )

    async def infer_on(
        self, address: str, request: pb.ModelInferRequest, deadline: float | None, request_id: str
    ) -> pb.ModelInferResponse:
        """One attempt on the worker at ``address`` and on no other: no retry, no hedge, no per-try
        budget (a sequence's state lives there). ``WorkerLost`` when that worker or its connection
        fails (UNAVAILABLE, a broken connection); any other error is the worker's own answer."""
        worker = self.discovery.workers.get(address)
        if worker is None:
            raise WorkerLost(address, f"worker {address} is no longer known")
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the request reached a worker")
        self.budget.request()
        metrics.TRIES.labels("first").inc()
        try:
            answer: pb.ModelInferResponse = await self._attempt(
                worker, address, request, timeout, call_metadata(request_id), _model_infer
            )
        except grpc.aio.AioRpcError as err:
            if worker_failed(err):
                self.discovery.suspect(address)
                raise WorkerLost(address, translate(err).message) from err
            raise translate(err) from err
        metrics.WINS.labels("first").inc()
        return answer

    async def call(
        self,
        model: str,
        version: str,
        request: Any,
        deadline: float | None,
        request_id: str,
        invoke: Invoke,
        *,
        pinned: bool = True,
        grey: bool = False,
        once: bool = False,
    ) -> Any:
        """``grey``: per-try budgets and hedging apply (idempotent inference only); ``once``: one
        attempt, never another worker (a sequence keeps its state on the worker it went to)."""
        tried: list[str] = []
        last: FerryError | None = None
        metadata = call_metadata(request_id)
        window = self.windows.setdefault(model, LatencyWindow()) if grey else None
        budget_s = self.hedging.try_budget(window) if grey else None
        hedge_s = self.hedging.hedge_delay() if grey else None
        pending: dict[asyncio.Task[Any], _Attempt] = {}
        made = 0
        self.budget.request()

        def start(kind: str) -> bool:
            """One more attempt on a worker not tried yet; False when there is none."""
            nonlocal made
            address = self.router.pick(self.discovery.candidates(model, version), exclude=tried)
            if address is None:
                return False
            worker = self.discovery.workers.get(address)
            tried.append(address)
            if worker is None:
                return start(kind)
            now = time.monotonic()
            timeout = None if deadline is None else deadline - now
            if timeout is not None and timeout <= 0:
                raise DeadlineExceeded("deadline exceeded before the request reached a worker")
            made += 1
            metrics.TRIES.labels(kind).inc()
            task = asyncio.ensure_future(self._attempt(worker, address, request, timeout, metadata, invoke))
            pending[task] = _Attempt(address, kind, now, None if budget_s is None else now + budget_s)
            return True

        def extra(kind: str) -> None:
            """A timed-out attempt or a hedge: another worker, within attempts, deadline and budget."""
            time_left = None if deadline is None else deadline - time.monotonic()
            if made >= self.policy.attempts or not (
                time_left is None or time_left > self.policy.min_time_left_s
            ):
                return
            if not [a for a in self.discovery.candidates(model, version) if a not in tried]:
                return
            if not self.budget.try_spend():
                metrics.BUDGET_REFUSED.labels(kind).inc()
                return
            if start(kind) and kind == "retry":
                metrics.RETRIES.labels("timeout").inc()

        try:
            if not start("first"):
                if self.discovery.healthy():
                    raise Unavailable(f"no healthy worker has model {model!r} version {version} ready")
                raise Unavailable(self.discovery.no_worker_message())
            hedge_at = None if hedge_s is None else time.monotonic() + hedge_s
            while pending:
                triggers = [a.due for a in pending.values() if a.due is not None]
                if hedge_at is not None:
                    triggers.append(hedge_at)
                wait = None if not triggers else max(0.0, min(triggers) - time.monotonic())
                done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                # an answer that arrived with a failure wins over it
                for task in sorted(done, key=lambda t: t.exception() is not None):
                    attempt = pending.pop(task)
                    try:
                        result = task.result()
                    except grpc.aio.AioRpcError as err:
                        last = translate(err)
                        if once:
                            raise last from err
                        outcome = await self._failed(err, attempt, model, version, pinned, deadline, made)
                        if outcome is None:
                            if pending:  # another attempt is still running: it may yet answer
                                continue
                            raise last from err
                        if outcome != version:  # re-resolved: a new version, every worker again
                            version = outcome
                            tried.clear()
                            if hasattr(request, "model_version"):
                                request.model_version = version
                        if not pending and not self._retry(start, model, version, tried):
                            raise last from err
                        continue
                    if window is not None:
                        window.add(time.monotonic() - attempt.started)
                    metrics.WINS.labels(attempt.kind).inc()
                    return result
                now = time.monotonic()
                for attempt in list(pending.values()):
                    if attempt.due is not None and now >= attempt.due:
                        attempt.due = None
                        metrics.TRY_TIMEOUTS.inc()
                        self.router.timed_out(attempt.address)
                        log.info(
                            "attempt silent past its budget",
                            extra={"worker": attempt.address, "rid": request_id},
                        )
                        extra("retry")
                if hedge_at is not None and now >= hedge_at:
                    hedge_at = None
                    extra("hedge")
            if last is None:
                raise Unavailable(f"no healthy worker has model {model!r} version {version} ready")
            raise last
        finally:
            for task in pending:
                task.cancel()

    def _retry(self, start: Callable[[str], bool], model: str, version: str, tried: list[str]) -> bool:
        """After a failure with nothing else in flight: one more attempt, if the budget allows."""
        if not [a for a in self.discovery.candidates(model, version) if a not in tried]:
            return False
        if not self.budget.try_spend():
            metrics.BUDGET_REFUSED.labels("retry").inc()
            return False
        return start("retry")

    async def _failed(
        self,
        err: grpc.aio.AioRpcError,
        attempt: _Attempt,
        model: str,
        version: str,
        pinned: bool,
        deadline: float | None,
        made: int,
    ) -> str | None:
        """What a failed attempt means: None = give up with its error, else the version to retry
        on (the same one, or a re-resolved one)."""
        transport = worker_failed(err)
        time_left = None if deadline is None else deadline - time.monotonic()
        may_retry = self.policy.should_retry(made, grpc.StatusCode.UNAVAILABLE, time_left)
        if transport:
            self.discovery.suspect(attempt.address)
            if not may_retry:
                return None
            metrics.RETRIES.labels("unavailable").inc()
            log.info("retrying on another worker", extra={"worker": attempt.address})
            return version
        gone = err.code() == grpc.StatusCode.UNAVAILABLE or (not pinned and err.code() in VERSION_GONE)
        if not (gone and may_retry):
            return None
        # the version went away on that worker (a rollout unloaded it, or it is still loading):
        # look again, and when the gateway chose the version, choose again
        worker = self.discovery.workers.get(attempt.address)
        if worker is not None:
            await self.discovery.refresh(worker)
        metrics.RETRIES.labels("version_gone").inc()
        if not pinned:
            try:
                return self.discovery.resolve(model)
            except FerryError:
                return None
        return version

    async def _attempt(
        self,
        worker: Any,
        address: str,
        request: Any,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...],
        invoke: Invoke,
    ) -> Any:
        """One call to one worker, with the router's and the metrics' bookkeeping around it."""
        self.router.started(address)
        metrics.worker_in_flight(address).inc()
        started = time.perf_counter()
        ok: bool | None = None
        try:
            result = await invoke(worker, request, timeout, metadata)
            ok = True
            return result
        except grpc.aio.AioRpcError as err:
            ok = not worker_failed(err)
            raise
        finally:
            self.router.finished(address, ok=ok)  # None: cancelled, it lost a race; no verdict
            metrics.worker_in_flight(address).dec()
            with contextlib.suppress(Exception):
                metrics.upstream_seconds(address).observe(time.perf_counter() - started)
