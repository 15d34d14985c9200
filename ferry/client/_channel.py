"""Channels and error translation shared by every Ferry client.

A client call that fails raises the ``ferry.core.errors`` class of its status
(``NotFound``, ``InvalidArgument``...), with the server's message, chained from
the gRPC error. One async implementation per client; the sync clients run it
on a private event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from ferry.core.errors import REASON_KEY, FerryError, error_for_status

P = ParamSpec("P")
T = TypeVar("T")
M = TypeVar("M")

DEFAULT_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


class _BearerKey:
    """Adds ``authorization: Bearer <key>`` to a call's metadata.

    An interceptor rather than call credentials: gRPC sends call credentials over TLS only,
    and a key must also reach a loopback service that runs without TLS. grpc.aio files each
    interceptor under one call kind only, so ``bearer_interceptors`` makes one per kind.
    """

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<hidden>)"

    def _details(self, details: Any) -> Any:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        return details._replace(metadata=(*metadata, self._header))


class _UnaryUnaryKey(_BearerKey, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamKey(_BearerKey, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnaryKey(_BearerKey, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStreamKey(_BearerKey, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def bearer_interceptors(key: str) -> list[Any]:
    return [kind(key) for kind in (_UnaryUnaryKey, _UnaryStreamKey, _StreamUnaryKey, _StreamStreamKey)]


def open_channel(
    address: str,
    *,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    tls: bool = False,
    options: list[tuple[str, Any]] | None = None,
    api_key: str | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to ``address``; TLS when ``tls`` or any certificate is given; every
    call carries ``api_key`` as a bearer token when one is given."""
    opts = [*DEFAULT_OPTIONS, *(options or [])]
    interceptors = bearer_interceptors(api_key) if api_key else None
    if tls or root_certificates or certificate_chain:
        creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        return grpc.aio.secure_channel(address, creds, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)


def error_reason(err: grpc.aio.AioRpcError) -> str:
    """The server's machine-readable refinement of the status (``ferry.core.errors.REASON_KEY``)."""
    for key, value in err.trailing_metadata() or ():
        if key == REASON_KEY:
            return str(value)
    return ""


def translate(err: grpc.aio.AioRpcError) -> FerryError:
    return error_for_status(err.code(), err.details() or err.code().name, error_reason(err))


def translated(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorate an async client method so gRPC errors surface as Ferry errors."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except grpc.aio.AioRpcError as err:
            raise translate(err) from err

    return call


def chunked(head: M, make: Callable[[bytes], M], data: bytes, chunk_bytes: int) -> Iterator[M]:
    """The upload protocol both upload RPCs share: a header message, then the bytes in chunks."""
    yield head
    for i in range(0, len(data), chunk_bytes):
        yield make(data[i : i + chunk_bytes])


async def upload(method: Any, messages: Iterator[Any], timeout: float | None) -> Any:
    """Send a client stream and return the server's answer, even when it answers early.

    A server that refuses an upload (too large, bad checksum) ends the call while the
    client is still writing. Writing message by message and then awaiting the call gives
    the caller that refusal; feeding grpc.aio an iterator can surface the failed write
    instead ("Internal error from Core"), depending on who is faster.
    """
    call = method(timeout=timeout)
    try:
        for message in messages:
            await call.write(message)
        await call.done_writing()
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
        pass  # the call has ended: its status, awaited below, is the answer
    return await call


class LoopThread:
    """A private event loop on a daemon thread: how the sync clients run the async ones."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="ferry-client")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def blocking(fn: Callable[Concatenate[Any, P], Coroutine[Any, Any, T]]) -> Callable[Concatenate[Any, P], T]:
    """The blocking twin of an async client method, with its signature (``inspect.signature``
    and type checkers see the same parameters) and docstring."""

    @functools.wraps(fn)
    def call(self: SyncWrapper, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._loop.run(fn(self._client, *args, **kwargs))

    return call


class SyncWrapper:
    """The loop thread and the async client behind a blocking client.

    ``make()`` builds the async client inside the loop (channels bind to the loop that creates
    them). Each blocking method is declared on the subclass with ``blocking(AsyncClient.method)``,
    so it has the async method's real signature and docstring; a coroutine method left out is an
    AttributeError that says so, not a silent proxy.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self._loop = LoopThread()

        async def build() -> Any:
            return make()

        self._client = self._loop.run(build())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if asyncio.iscoroutinefunction(attr):
            raise AttributeError(
                f"{type(self).__name__} has no blocking {name}(); declare it with blocking()"
            )
        return attr

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self._client.close())
        self._loop.close()

    def __enter__(self) -> SyncWrapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
