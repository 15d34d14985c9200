"""What every service's port needs before it opens: keys, TLS, and protected mode.

Each service's settings inherit ``SecuritySettings``, so the four services take
the same ``--api-keys-file``, ``--tls-*`` and ``--insecure`` flags (and
``FERRY_<SERVICE>_*`` variables). ``secure_port`` turns them into a ``Guard`` and
server credentials, or refuses to start.

Protected mode, after Redis's: a service bound to a loopback address starts with
no configuration, as before; one bound to any other address must have API keys
or mTLS (client certificates required), or be told ``--insecure``, which it then
says in its log. A refusal exits with status 2 and says why.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import grpc
from pydantic import Field

from ferry.core.auth import KeyRing
from ferry.core.errors import FerryError
from ferry.core.grpcserver import server_credentials
from ferry.core.guard import Guard, Limiter
from ferry.core.settings import ServiceSettings

log = logging.getLogger("ferry.security")

EXIT_REFUSED = 2


class SecuritySettings(ServiceSettings):
    """The settings every service's port shares; subclasses set the env prefix."""

    api_keys_file: str | None = Field(
        None, description="YAML/JSON file of hashed API keys with roles; set = auth on (docs/security.md)"
    )
    api_keys: str | None = Field(None, description="the same document inline (JSON), e.g. from a Secret")
    tls_cert: str | None = Field(None, description="PEM certificate for this service's port (TLS)")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: str | None = Field(
        None, description="require client certificates signed by this CA (mTLS)"
    )
    insecure: bool = Field(
        False, description="allow a non-loopback bind with neither API keys nor mTLS (protected mode off)"
    )


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach; "" and 0.0.0.0 mean every interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, auth: bool, mtls: bool, insecure: bool) -> str | None:
    """Why this bind may not start, or None. Pure, so the rule is tested without a server."""
    if is_loopback(host) or auth or mtls or insecure:
        return None
    return (
        f"refusing to listen on {host or 'every interface'} with no API keys and no client "
        "certificates: anyone who reaches the port could call it. Set --api-keys-file (or "
        "--api-keys), or --tls-client-ca for mTLS, or bind 127.0.0.1; --insecure starts anyway"
    )


def refuse_to_start(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_REFUSED)


@dataclass
class SecurePort:
    """What ``build_server`` needs to open a port as the settings say."""

    guard: Guard
    credentials: grpc.ServerCredentials | None

    @property
    def auth(self) -> str:
        return "on" if self.guard.enabled else "off"


def secure_port(
    settings: SecuritySettings,
    host: str,
    service: str,
    *,
    limiter: Limiter | None = None,
    on_deny: Callable[[str], None] | None = None,
) -> SecurePort:
    """The guard and credentials for ``host``, or exit 2 (protected mode, unreadable keys)."""
    try:
        ring = KeyRing.load(settings.api_keys_file, settings.api_keys, f"FERRY_{service.upper()}_API_KEYS")
        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except FerryError as err:
        refuse_to_start(err.message)
    except OSError as err:
        refuse_to_start(f"cannot read a TLS file: {err}")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        refuse_to_start("tls_cert and tls_key go together: give both or neither")
    if settings.tls_client_ca and credentials is None:
        refuse_to_start("tls_client_ca (mTLS) needs tls_cert and tls_key for the port itself")
    mtls = credentials is not None and bool(settings.tls_client_ca)
    problem = exposure_problem(host, ring is not None, mtls, settings.insecure)
    if problem:
        refuse_to_start(problem)
    if settings.insecure and not is_loopback(host) and ring is None and not mtls:
        log.warning("protected mode off (--insecure): %s:%s accepts calls from anyone", host, service)
    return SecurePort(Guard(ring, service, limiter=limiter, on_deny=on_deny), credentials)
