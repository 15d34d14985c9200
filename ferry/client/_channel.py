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
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import grpc

from ferry.core.errors import FerryError, error_for_status

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


def open_channel(
    address: str,
    *,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    tls: bool = False,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to ``address``; TLS when ``tls`` or any certificate is given."""
    opts = [*DEFAULT_OPTIONS, *(options or [])]
    if tls or root_certificates or certificate_chain:
        creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        return grpc.aio.secure_channel(address, creds, options=opts)
    return grpc.aio.insecure_channel(address, options=opts)


def translate(err: grpc.aio.AioRpcError) -> FerryError:
    return error_for_status(err.code(), err.details() or err.code().name)


def translated(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorate an async client method so gRPC errors surface as Ferry errors."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except grpc.aio.AioRpcError as err:
            raise translate(err) from err

    return call


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


class SyncWrapper:
    """Expose every public coroutine method of an async client as a blocking method.

    ``make(loop_thread)`` must build the async client inside the loop (channels
    bind to the loop that creates them).
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self._loop = LoopThread()

        async def build() -> Any:
            return make()

        self._client = self._loop.run(build())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._loop.run(attr(*args, **kwargs))

        return call

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self._client.close())
        self._loop.close()

    def __enter__(self) -> SyncWrapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
