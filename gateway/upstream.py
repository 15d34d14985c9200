"""One upstream call, routed and retried: the gateway->worker hop.

Picks a worker with ``Router`` among those ``Discovery`` says have the version
ready, forwards the caller's remaining deadline and request id, and retries on
another worker when the call failed at the transport (UNAVAILABLE, a broken
connection) while attempts and the deadline allow. When the gateway chose the
version (the caller named none) and the worker says that version is gone, the
version is re-resolved and the call retried: a rollout must not fail requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.client._channel import translate
from ferry.core.errors import DeadlineExceeded, FerryError, Unavailable
from gateway import metrics
from gateway.discovery import Discovery
from gateway.router import VERSION_GONE, RetryPolicy, Router

log = logging.getLogger("ferry.gateway.upstream")

_BROKEN = ("socket closed", "connection reset", "broken pipe", "rst_stream", "connection refused", "eof")


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


class Upstream:
    """Routed, retried calls to workers."""

    def __init__(self, discovery: Discovery, router: Router, policy: RetryPolicy) -> None:
        self.discovery = discovery
        self.router = router
        self.policy = policy

    async def infer(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        request_id: str,
        pinned: bool,
    ) -> pb.ModelInferResponse:
        """Run ``request`` (its ``model_version`` already resolved) on some worker."""
        return await self.call(
            request.model_name,
            request.model_version,
            request,
            deadline,
            request_id,
            lambda w, req, timeout, md: w.stub.ModelInfer(req, timeout=timeout, metadata=md),
            pinned=pinned,
        )

    async def call(
        self,
        model: str,
        version: str,
        request: Any,
        deadline: float | None,
        request_id: str,
        invoke: Callable[[Any, Any, float | None, tuple[tuple[str, str], ...]], Awaitable[Any]],
        *,
        pinned: bool = True,
    ) -> Any:
        tried: list[str] = []
        last: FerryError | None = None
        metadata = (("x-request-id", request_id),)
        for attempt in range(1, self.policy.attempts + 1):
            address = self.router.pick(self.discovery.candidates(model, version), exclude=tried)
            if address is None:
                if last is not None:
                    raise last
                if self.discovery.healthy():
                    raise Unavailable(f"no healthy worker has model {model!r} version {version} ready")
                raise Unavailable(self.discovery.no_worker_message())
            worker = self.discovery.workers.get(address)
            if worker is None:
                tried.append(address)
                continue
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise DeadlineExceeded("deadline exceeded before the request reached a worker")
            self.router.started(address)
            metrics.worker_in_flight(address).inc()
            started = time.perf_counter()
            try:
                result = await invoke(worker, request, timeout, metadata)
            except grpc.aio.AioRpcError as err:
                transport = broken_connection(err) and not (err.details() or "").startswith("model ")
                self.router.finished(address, ok=not transport)
                tried.append(address)
                last = translate(err)
                time_left = None if deadline is None else deadline - time.monotonic()
                if transport:
                    self.discovery.suspect(address)
                    if self.policy.should_retry(attempt, grpc.StatusCode.UNAVAILABLE, time_left):
                        metrics.RETRIES.labels("unavailable").inc()
                        log.info("retrying on another worker", extra={"worker": address, "rid": request_id})
                        continue
                    raise last from err
                gone = err.code() == grpc.StatusCode.UNAVAILABLE or (
                    not pinned and err.code() in VERSION_GONE
                )
                if gone and self.policy.should_retry(attempt, grpc.StatusCode.UNAVAILABLE, time_left):
                    # the version went away on that worker (a rollout unloaded it, or it is still
                    # loading): look again, and when the gateway chose the version, choose again
                    await self.discovery.refresh(worker)
                    if not pinned:
                        try:
                            fresh = self.discovery.resolve(model)
                        except FerryError:
                            raise last from err
                        if fresh != version:
                            version = fresh
                            tried.clear()
                        if hasattr(request, "model_version"):
                            request.model_version = version
                    metrics.RETRIES.labels("version_gone").inc()
                    continue
                raise last from err
            else:
                self.router.finished(address, ok=True)
                return result
            finally:
                metrics.worker_in_flight(address).dec()
                metrics.upstream_seconds(address).observe(time.perf_counter() - started)
        assert last is not None
        raise last
