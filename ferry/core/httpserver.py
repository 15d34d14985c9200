"""The HTTP front door's plumbing, shared by every service that answers REST: aiohttp on the
service's own event loop, beside its gRPC server.

A service lists its ``Endpoint``s: a method and path, the gRPC method whose auth rule
applies (so a key has the same rights over both transports), and a handler that turns the
request into a data-plane call. Everything around the handler happens here, once: the API
key checked and the rate-limit token taken by the service's ``Guard``, an audit line for
calls that change state, the request id (``x-request-id``, echoed back), the body size
limit (413), a deadline for a client to finish sending its request headers (a slowloris
client is cut off and the others are served meanwhile), and errors: a Ferry error becomes
``{"error": message}`` with the HTTP twin of its gRPC status (``ferry.core.errors.http_status``);
anything else a generic 500 with an incident id, the details in the log only.

aiohttp was chosen over Starlette on uvicorn by measuring both side by side on this handler
shape (``python -m benchmarks.http_servers``, docs/http.md): it answered faster, and it runs
on an existing event loop with no server of its own to manage.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ferry.core import tracing
from ferry.core.auth import RULES
from ferry.core.errors import FerryError, InvalidArgument, ResourceExhausted, http_status
from ferry.core.grpcserver import _abort_code as error_status
from ferry.core.guard import Guard, _outcome, request_id_of
from ferry.core.rest import dumps

log = logging.getLogger("ferry.http")

JSON = "application/json"


@dataclass
class Reply:
    """What a handler answers: a body (JSON unless said otherwise), a status, extra headers."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON


@dataclass
class HttpCall:
    """One request as a handler sees it."""

    request: web.Request
    body: bytes
    params: dict[str, str]
    request_id: str

    @property
    def headers(self) -> Any:
        return self.request.headers


Handler = Callable[[HttpCall], Awaitable[Reply]]


@dataclass(frozen=True)
class Endpoint:
    """``rpc`` is the gRPC method whose rule (``ferry.core.auth.RULES``) this endpoint obeys;
    ``target`` reads the model the call acts on, for keys limited to some models."""

    method: str
    path: str
    rpc: str
    handler: Handler
    target: Callable[[HttpCall], str] | None = None


def json_reply(doc: Any, status: int = 200) -> Reply:
    return Reply(dumps(doc), status)


def error_reply(status: int, message: str) -> Reply:
    return Reply(dumps({"error": message}), status)


@dataclass
class HttpLimits:
    max_body_bytes: int = 64 << 20
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 30.0


def _respond(reply: Reply, request_id: str) -> web.Response:
    headers = {"x-request-id": request_id, **reply.headers}
    return web.Response(
        body=reply.body, status=reply.status, headers=headers, content_type=reply.content_type
    )


class PayloadTooLarge(ResourceExhausted):
    """A body over the limit: RESOURCE_EXHAUSTED over gRPC, and 413 over HTTP."""


def build_app(
    endpoints: Sequence[Endpoint], guard: Guard, limits: HttpLimits, started: set[Any] | None = None
) -> web.Application:
    """The aiohttp app; ``started`` collects the transports whose first request head arrived."""
    seen: set[Any] = started if started is not None else set()

    @web.middleware
    async def mark_started(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        seen.add(request.transport)
        return await handler(request)

    app = web.Application(
        client_max_size=limits.max_body_bytes, middlewares=[mark_started, _errors_middleware()]
    )
    for endpoint in endpoints:
        app.router.add_route(endpoint.method, endpoint.path, _handler(endpoint, guard, limits))
    return app


def _handler(
    endpoint: Endpoint, guard: Guard, limits: HttpLimits
) -> Callable[[web.Request], Awaitable[web.Response]]:
    rule = RULES.get(endpoint.rpc)
    audited = rule is not None and rule.audit
    span_name = endpoint.rpc.rsplit("/", 1)[-1]

    async def handle(request: web.Request) -> web.Response:
        request_id = request_id_of([("x-request-id", request.headers.get("x-request-id", ""))])
        key = guard.identify([("authorization", request.headers.get("Authorization", ""))])
        target = ""
        err: BaseException | None = None
        try:
            with tracing.server_span(span_name, request.headers):
                body = await _read(request, limits)
                call = HttpCall(request, body, dict(request.match_info), request_id)
                target = endpoint.target(call) if endpoint.target else ""
                await guard.admit(key, endpoint.rpc, target)
                return _respond(await endpoint.handler(call), request_id)
        except BaseException as caught:
            err = caught
            raise
        finally:
            if audited:
                guard.audit(key, endpoint.rpc, target, _outcome(err), request_id)

    return handle


async def _read(request: web.Request, limits: HttpLimits) -> bytes:
    if not request.can_read_body:
        return b""
    over = f"the request body is over the limit of {limits.max_body_bytes} bytes"
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise PayloadTooLarge(f"{over} ({request.content_length} bytes)")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(over) from None


def _errors_middleware() -> Any:
    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request_id = request.headers.get("x-request-id", "")[:128]
        try:
            return await handler(request)
        except PayloadTooLarge as err:
            return _respond(error_reply(413, err.message), request_id)
        except FerryError as err:
            return _respond(error_reply(http_status(err.code), err.message), request_id)
        except web.HTTPMethodNotAllowed as err:
            allowed = ", ".join(sorted(err.allowed_methods))
            message = f"method {request.method} is not allowed on {request.path}; use {allowed}"
            reply = error_reply(405, message)
            reply.headers["Allow"] = allowed
            return _respond(reply, request_id)
        except web.HTTPNotFound:
            return _respond(error_reply(404, f"no endpoint {request.method} {request.path}"), request_id)
        except web.HTTPException as err:
            return _respond(error_reply(err.status, err.reason), request_id)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            _, message = error_status(err)
            return _respond(error_reply(500, message), request_id)

    return errors


class _HeaderDeadline(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection: a client that has not sent a whole request
    head within ``seconds`` of connecting is disconnected. aiohttp has no such timer, and an
    idle connection's keep-alive timer only starts after a first request."""

    def __init__(self, inner: Any, seconds: float, started: set[Any]) -> None:
        self._inner = inner
        self._seconds = seconds
        self._started = started
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._timer = asyncio.get_running_loop().call_later(self._seconds, self._expire)
        self._inner.connection_made(transport)

    def _expire(self) -> None:
        if self._transport is not None and self._transport not in self._started:
            log.info("closing a connection that sent no complete request head in %ss", self._seconds)
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._started.discard(self._transport)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


@dataclass
class HttpServer:
    runner: web.AppRunner
    server: asyncio.AbstractServer
    port: int

    async def stop(self, grace_s: float = 5.0) -> None:
        self.server.close()
        await self.runner.shutdown()
        await asyncio.wait_for(self.runner.cleanup(), grace_s + 5)


async def start_http(
    host: str,
    port: int,
    endpoints: Sequence[Endpoint],
    guard: Guard,
    *,
    limits: HttpLimits | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpServer:
    """Serve ``endpoints`` on ``host:port`` (0 = any free port) on the running loop."""
    limits = limits or HttpLimits()
    started: set[Any] = set()
    app = build_app(endpoints, guard, limits, started)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, keepalive_timeout=limits.keepalive_timeout_s
    )
    await runner.setup()
    factory = runner.server
    if factory is None:
        raise InvalidArgument("the HTTP app did not set up")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _HeaderDeadline(factory(), limits.header_timeout_s, started),
        host,
        port,
        ssl=ssl_context,
        reuse_address=True,
    )
    bound = int(server.sockets[0].getsockname()[1])
    return HttpServer(runner, server, bound)
