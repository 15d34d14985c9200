"""What every Ferry server does the same way at start, so each ``server.py`` keeps only its own parts.

``run`` turns flags into settings (flags > ``FERRY_*`` environment > YAML > defaults), sets up
logging and runs the service's ``serve`` coroutine; ``open_server`` opens the service's gRPC port
as its settings say: protected mode, API keys and TLS (``secure_port``), message limits,
SO_REUSEPORT and connection ageing (``build_server``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import grpc

from ferry.core import tracing
from ferry.core.errors import FerryError
from ferry.core.grpcserver import ServerHandle, build_server
from ferry.core.guard import Limiter
from ferry.core.security import SecurePort, SecuritySettings, refuse_to_start, secure_port
from ferry.core.settings import settings_from_argv
from ferry.core.telemetry import setup_logging

S = TypeVar("S", bound=SecuritySettings)
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def run(
    settings_cls: type[S],
    argv: Sequence[str] | None,
    service: str,
    serve: Callable[[S], Coroutine[Any, Any, None]],
    check: Callable[[S], None] | None = None,
) -> int:
    """``ferry serve <service>``: settings, then ``check`` (a refusal before anything starts),
    logging, and the service until it is signalled to stop."""
    settings = settings_from_argv(settings_cls, argv, f"ferry serve {service}")
    if check is not None:
        check(settings)
    setup_logging(settings.log_level, service)
    try:
        tracing.configure(service)
    except FerryError as err:
        refuse_to_start(err.message)
    try:
        asyncio.run(serve(settings))
    finally:
        tracing.shutdown()
    return 0


def open_server(
    settings: SecuritySettings,
    service: str,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    *,
    limiter: Limiter | None = None,
    on_deny: Callable[[str], None] | None = None,
) -> tuple[ServerHandle, SecurePort]:
    """The service's gRPC server, built and bound but not started, and its port's security."""
    port = secure_port(settings, settings.host, service, limiter=limiter, on_deny=on_deny)
    extra: Any = settings
    handle = build_server(
        settings.host,
        settings.port,
        register,
        max_message_bytes=getattr(extra, "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
        reuse_port=getattr(extra, "reuse_port", False),
        guard=port.guard,
        credentials=port.credentials,
        max_connection_age_s=settings.max_connection_age_s,
        max_connection_age_grace_s=settings.grace_s,
    )
    return handle, port
