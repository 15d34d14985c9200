"""The server interceptor shape both of Ferry's use: wrap a method's handler once, keep it.

A wrapper reads everything about a call (metadata, deadline) from the call's own context, so
one wrapped handler per method serves every call, and the interceptor costs a dict lookup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    # grpc-stubs makes these generic; the runtime classes are not subscriptable. The servers
    # carry messages of many types (and raw bytes), so handlers are typed per call, not here.
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    ServerInterceptor = grpc.aio.ServerInterceptor


class WrappingInterceptor(ServerInterceptor):
    """Subclasses say how to wrap one method's handler; this keeps the wrapped one per method."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Handler] = {}

    def wrap(self, handler: Handler, method: str) -> Handler:
        raise NotImplementedError

    # grpc answers None for a method no service registered; grpc-stubs says it never does.
    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return handler
        wrapped = self.wrap(handler, method)
        self._wrapped[method] = wrapped
        return wrapped
