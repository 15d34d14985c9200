"""The auth layer on the wire: every call's key checked, every state change written to the audit log.

``GuardInterceptor`` sits inside ``ErrorInterceptor`` (``build_server`` orders
them), so a refusal is a ``FerryError`` like any other and reaches the caller
through the one error path. It reads the key from the call's metadata, asks
``ferry.core.auth.decide``, takes a rate-limit token, and for the calls the
rule table marks ``audit`` writes one line to the ``ferry.audit`` logger once
the call has ended: key name, method, target, outcome, request id. The key
itself is never logged; neither is the request.

With no key ring (auth off), calls are not checked but are still audited, as
``key=-``, so a loopback-only stack has the same trail.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from ferry.core import tracing
from ferry.core.auth import RULES, ApiKey, Buckets, KeyRing, bearer, decide, is_open, target_of
from ferry.core.errors import FerryError, ResourceExhausted
from ferry.core.interceptors import WrappingInterceptor

if TYPE_CHECKING:
    from ferry.core.interceptors import Context, Handler

audit_log = logging.getLogger("ferry.audit")
# Audit lines are not chatter: they are written at INFO whatever level the service logs at.
audit_log.setLevel(logging.INFO)

Limiter = Callable[[ApiKey], Awaitable[bool]]
ANONYMOUS = "-"

_caller: contextvars.ContextVar[str] = contextvars.ContextVar("ferry_caller", default=ANONYMOUS)


def caller_name() -> str:
    """The name of the key the current call came with ("-" with auth off): what a servicer may
    count per caller (queued jobs) without seeing the key."""
    return _caller.get()


class LocalLimiter:
    """One token bucket per key in this process: the limiter when nothing shares the count."""

    def __init__(self) -> None:
        self._buckets = Buckets()

    async def __call__(self, key: ApiKey) -> bool:
        return self._buckets.take(key.digest, key.rate_per_s, key.burst)


# Ids for calls that bring none: this process's random prefix and a counter. Unique across
# replicas and restarts like a uuid4, at a fraction of its cost on every call.
_ID_PREFIX = uuid.uuid4().hex[:16]
_ids = itertools.count(1)
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("ferry_request_id", default="")


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):x}"


def request_id_of(metadata: Any) -> str:
    """The caller's ``x-request-id`` (at most 128 characters), or a new one."""
    for k, v in metadata or ():
        if k == "x-request-id" and v:
            return str(v)[:128]
    return new_request_id()


def current_request_id(metadata: Any) -> str:
    """The id the guard gave the current call (the one its audit line carries), so a handler
    logs and forwards the same one; outside a guarded call, the caller's or a new one."""
    return _request_id.get() or request_id_of(metadata)


class Guard:
    """The decision for one service: its key ring (None = auth off), rate limits, deny counter."""

    def __init__(
        self,
        ring: KeyRing | None,
        service: str,
        *,
        limiter: Limiter | None = None,
        on_deny: Callable[[str], None] | None = None,
    ) -> None:
        self.ring = ring
        self.service = service
        self.limiter = limiter or LocalLimiter()
        self.on_deny = on_deny

    @property
    def enabled(self) -> bool:
        return self.ring is not None

    def identify(self, metadata: Any) -> ApiKey | None:
        token = bearer(metadata)
        return self.ring.lookup(token) if token and self.ring is not None else None

    async def admit(self, key: ApiKey | None, method: str, target: str, *, take: bool = True) -> None:
        """Raise the refusal for this call, if any; take a rate-limit token (once per call)."""
        if self.ring is None:
            return
        try:
            decide(key, method, target)
            if take and key is not None and key.rate_per_s > 0 and not await self.limiter(key):
                raise ResourceExhausted(
                    f"API key {key.name!r} is over its rate limit of {key.rate_per_s:g} calls/s"
                )
        except FerryError as err:
            if self.on_deny is not None:
                self.on_deny(err.code.name)
            raise

    def audit(self, key: ApiKey | None, method: str, target: str, outcome: str, request_id: str) -> None:
        audit_log.info(
            "audit",
            extra={
                "audit": True,
                "service": self.service,
                "key": key.name if key is not None else ANONYMOUS,
                "method": method.rsplit("/", 1)[-1],
                "target": target,
                "outcome": outcome,
                "request_id": request_id,
            },
        )


def _outcome(err: BaseException | None) -> str:
    if err is None:
        return "OK"
    if isinstance(err, FerryError):
        return err.code.name
    if isinstance(err, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


class GuardInterceptor(WrappingInterceptor):
    """Wraps each method's handler once; the key is read per call from the call's own metadata."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.guard = guard

    def wrap(self, handler: Handler, method: str) -> Handler:
        return handler if is_open(method) else _wrap(handler, method, self.guard)


def _wrap(handler: Handler, method: str, guard: Guard) -> Handler:
    rule = RULES.get(method)
    path = rule.target if rule else None
    span_name = method.rsplit("/", 1)[-1]
    audited = bool(rule and rule.audit)

    class Call:
        """One call's identity: who, on what, under which request id."""

        def __init__(self, context: Context) -> None:
            metadata = context.invocation_metadata()
            self.key = guard.identify(metadata)
            self.request_id = request_id_of(metadata)
            self.target = ""

        def enter(self) -> None:
            _caller.set(self.key.name if self.key is not None else ANONYMOUS)
            _request_id.set(self.request_id)

        def finish(self, err: BaseException | None) -> None:
            if audited:
                guard.audit(self.key, method, self.target, _outcome(err), self.request_id)

    def checked(call: Call, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A request stream whose every message is admitted before the handler sees it."""

        async def gen() -> AsyncIterator[Any]:
            async for request in requests:
                target = target_of(request, path)
                if target:
                    call.target = call.target or target
                    await guard.admit(call.key, method, target, take=False)
                yield request

        return gen()

    async def admitted(call: Call, request: Any, streaming_in: bool) -> Any:
        """The request the handler gets, once the call is admitted: a request stream is checked
        message by message as the handler reads it."""
        if streaming_in:
            await guard.admit(call.key, method, "")
            request = checked(call, request)
        else:
            call.target = target_of(request, path)
            await guard.admit(call.key, method, call.target)
        call.enter()
        return request

    def unary_in(fn: Callable[..., Awaitable[Any]], streaming_in: bool) -> Callable[..., Awaitable[Any]]:
        async def run(request: Any, context: Context) -> Any:
            call = Call(context)
            err: BaseException | None = None
            try:
                with tracing.server_span(span_name, context.invocation_metadata()):
                    return await fn(await admitted(call, request, streaming_in), context)
            except BaseException as exc:
                err = exc
                raise
            finally:
                call.finish(err)

        return run

    def stream_out(fn: Callable[..., AsyncIterator[Any]], streaming_in: bool) -> Callable[..., Any]:
        async def run(request: Any, context: Context) -> AsyncIterator[Any]:
            call = Call(context)
            err: BaseException | None = None
            try:
                with tracing.server_span(span_name, context.invocation_metadata()):
                    async for item in fn(await admitted(call, request, streaming_in), context):
                        yield item
            except BaseException as exc:
                err = exc
                raise
            finally:
                call.finish(err)

        return run

    kinds = {
        "unary_unary": (grpc.unary_unary_rpc_method_handler, False),
        "stream_unary": (grpc.stream_unary_rpc_method_handler, True),
        "unary_stream": (grpc.unary_stream_rpc_method_handler, False),
        "stream_stream": (grpc.stream_stream_rpc_method_handler, True),
    }
    for attr, (factory, streaming_in) in kinds.items():
        fn = getattr(handler, attr)
        if fn is None:
            continue
        if attr.endswith("_stream") and inspect.isasyncgenfunction(fn):
            wrapped = stream_out(fn, streaming_in)
        else:
            wrapped = unary_in(fn, streaming_in)
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler
