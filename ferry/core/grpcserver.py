"""gRPC server plumbing every Ferry service shares.

``build_server`` returns an asyncio server with the standard ``grpc.health.v1``
service, server reflection, message-size limits and ``ErrorInterceptor``, the
one place where exceptions become statuses. ``serve_until_signal`` runs it until
SIGTERM/SIGINT, then drains: health turns NOT_SERVING (so load balancers route
away), in-flight calls get ``grace`` seconds to finish, then the process exits.

Health means ready: from the moment the port is bound until the service's start-up
work is done (models loaded and warmed, the first worker seen), the overall ("")
and every per-service status say NOT_SERVING, so a readiness probe never sends
traffic to a process that would only answer UNAVAILABLE. With
``max_connection_age_s`` the server closes each client connection (GOAWAY) after
that age, so long-lived clients behind an L4 load balancer reconnect and spread
over new replicas; the calls still running on it get the age grace to finish.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ferry._proto._pool import POOL
from ferry.core.errors import REASON_KEY, FerryError
from ferry.core.guard import Guard, GuardInterceptor
from ferry.core.interceptors import ServerInterceptor, WrappingInterceptor

if TYPE_CHECKING:
    from ferry.core.interceptors import Context, Handler

log = logging.getLogger("ferry.grpc")


class AsyncHealth(Protocol):
    """What Ferry uses of ``grpc_health.v1.health.aio.HealthServicer`` (grpc-stubs has no ``aio``)."""

    async def set(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None: ...

    async def enter_graceful_shutdown(self) -> None: ...


def incident(err: BaseException, what: str = "internal error") -> str:
    """Log an unexpected exception with a new incident id and return what a caller may see: its
    kind and the id, never its text (library messages carry paths, addresses and internals)."""
    number = uuid.uuid4().hex[:12]
    log.error("%s, incident %s", what, number, exc_info=err, extra={"incident": number})
    kind = "" if what == "internal error" else f": {type(err).__name__}"
    return f"{what}{kind} (incident {number}; details in the server log)"


def _abort_code(err: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, FerryError):
        return err.code, err.message
    return grpc.StatusCode.INTERNAL, incident(err)


def _reason_metadata(err: BaseException) -> tuple[tuple[str, str], ...]:
    reason = getattr(err, "reason", "") if isinstance(err, FerryError) else ""
    return ((REASON_KEY, reason),) if reason else ()


class ErrorInterceptor(WrappingInterceptor):
    """Maps ``FerryError`` to its status and anything unexpected to a generic INTERNAL."""

    def wrap(self, handler: Handler, method: str) -> Handler:
        return _wrap_handler(handler)


def _wrap_handler(handler: Handler) -> Handler:
    def unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: Context) -> Any:
            try:
                return await fn(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as err:
                code, message = _abort_code(err)
                await context.abort(code, message, trailing_metadata=_reason_metadata(err))

        return call

    def streaming(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(fn):
            # A streaming handler may also be a coroutine that writes with context.write()
            # (grpc_health's Watch does); it is then wrapped like a unary one.
            return unary(fn)

        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for item in fn(request, context):
                    yield item
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as err:
                code, message = _abort_code(err)
                await context.abort(code, message, trailing_metadata=_reason_metadata(err))

        return call

    kinds = {
        "unary_unary": (grpc.unary_unary_rpc_method_handler, unary),
        "stream_unary": (grpc.stream_unary_rpc_method_handler, unary),
        "unary_stream": (grpc.unary_stream_rpc_method_handler, streaming),
        "stream_stream": (grpc.stream_stream_rpc_method_handler, streaming),
    }
    for attr, (factory, wrap) in kinds.items():
        fn = getattr(handler, attr)
        if fn is not None:
            return factory(
                wrap(fn),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _serialize(message: Any) -> bytes:
    # A handler may answer with bytes it serialized earlier (a cached answer, a precomputed one):
    # they go out as they are, so a hot answer is never parsed only to be serialized again.
    return message if type(message) is bytes else message.SerializeToString()


def add_servicer(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> str:
    """Register ``servicer``'s methods for ``service``; returns the service's full name.

    Does what the generated ``add_*Servicer_to_server`` does, from the descriptor, with one
    difference: every method may answer with a message or with that message's serialized bytes.
    """
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: factories[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=message_factory.GetMessageClass(method.input_type).FromString,
            response_serializer=_serialize,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    # Added in grpcio 1.63; grpc-stubs (1.53) does not know it yet.
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
    return service.full_name


@dataclass
class ServerHandle:
    """A built server, the port it bound, and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: AsyncHealth
    services: list[str] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    after_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.services]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Health first, then ``on_stop`` (still serving), then the server with its grace, and
        only then ``after_stop``: what in-flight calls use (upstream channels, a cache) closes last."""
        await self.set_serving(False)
        for hook in self.on_stop:
            await hook()
        await self.server.stop(grace)
        for hook in self.after_stop:
            await hook()


def connection_age_options(age_s: float, grace_s: float) -> list[tuple[str, int]]:
    """gRPC core options that close a connection after ``age_s`` (0 = never); its calls still
    running then get ``grace_s`` before they are cut."""
    if age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", max(1, int(age_s * 1000))),
        ("grpc.max_connection_age_grace_ms", max(0, int(grace_s * 1000))),
    ]


def build_server(
    host: str,
    port: int,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    *,
    max_message_bytes: int = 64 * 1024 * 1024,
    interceptors: Iterable[ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    reuse_port: bool = False,
    guard: Guard | None = None,
    max_connection_age_s: float = 0,
    max_connection_age_grace_s: float = 10.0,
) -> ServerHandle:
    """Create the server, register services via ``register`` (returns their full names), bind.

    The error interceptor comes first, outermost, so a refusal from the guard inside it and
    anything a servicer raises take the same path to a status.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # the gateway pings its workers every keepalive_time_ms (2 s by default) to find a frozen
        # one; a server that allowed fewer pings would answer them with GOAWAY too_many_pings
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        *connection_age_options(max_connection_age_s, max_connection_age_grace_s),
    ]
    chain: list[ServerInterceptor] = [ErrorInterceptor()]
    if guard is not None:
        chain.append(GuardInterceptor(guard))
    server = grpc.aio.server(interceptors=[*chain, *interceptors], options=options)
    services = list(register(server))
    # grpc-stubs' grpc_health has no ``aio`` submodule; AsyncHealth says what is used of it.
    health_servicer: AsyncHealth = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server, pool=POOL)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind {address}: the port is taken or the address is not local")
    return ServerHandle(server=server, port=bound, health=health_servicer, services=services)


async def serve_until_signal(
    handle: ServerHandle,
    grace: float = 10.0,
    on_start: Callable[[], Awaitable[None]] | None = None,
    ready_message: str | None = None,
) -> None:
    """Start, run ``on_start`` (e.g. load models), mark SERVING, print ``ready_message``,
    wait for SIGTERM/SIGINT, then drain and stop. The signal handlers go in first, so a
    SIGTERM that arrives right after the ready line still drains instead of killing."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # grpc_health starts the overall status at SERVING; nothing is ready before on_start is done.
    await handle.set_serving(False)
    await handle.server.start()
    if on_start is not None:
        await on_start()
    await handle.set_serving(True)
    if ready_message:
        print(ready_message, flush=True)
    waiter = asyncio.create_task(handle.server.wait_for_termination())
    signalled = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.warning("stopping: draining in-flight calls", extra={"grace_s": grace})
        await handle.stop(grace)
    waiter.cancel()
    signalled.cancel()


def ready_line(service: str, port: int, **extra: Any) -> str:
    """The one line a service prints on stdout once it serves; tools and tests wait for it."""
    fields = " ".join(f"{k}={v}" for k, v in extra.items())
    return f"FERRY_READY service={service} port={port} {fields}".rstrip()


READY_RE = re.compile(r"FERRY_READY service=(\S+) port=(\d+)")


def parse_ready_line(line: str) -> tuple[str, int] | None:
    """``(service, port)`` from a line of a service's output that holds its ``ready_line``, else None.

    ``ferry up``, the benchmarks and the tests start services with ``--port 0`` and wait for
    this line to learn the port the service really bound: the one parser of ``ready_line``.
    """
    m = READY_RE.search(line)
    return (m.group(1), int(m.group(2))) if m else None
