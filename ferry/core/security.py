"""What every service's port needs before it opens: keys, TLS, and protected mode.

Each service's settings inherit ``SecuritySettings`` (itself a
``ferry.core.settings.ServerSettings``: host, port, grace_s...), so the four
services take the same ``--api-keys-file``, ``--tls-*`` and ``--insecure`` flags
(and ``FERRY_<SERVICE>_*`` variables). ``secure_port`` turns them into a ``Guard`` and
server credentials, or refuses to start.

Protected mode, after Redis's: a service bound to a loopback address starts with
no configuration, as before; one bound to any other address must have API keys
or mTLS (client certificates required), or be told ``--insecure``, which it then
says in its log. A refusal exits with status 2 and says why.

Certificates rotate without a restart: the port's TLS credentials are dynamic, and
``CertificateReloader`` hands gRPC a new certificate configuration on the first
handshake after the files change (a cert-manager renewal, a Secret update). A pair
that does not match yet (the certificate written, its key not) is not taken; the
old one keeps serving until both files agree. Open connections keep the
certificate they were made with.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import grpc
from pydantic import Field

from ferry.core.auth import KeyRing
from ferry.core.errors import FerryError
from ferry.core.guard import Guard, Limiter
from ferry.core.settings import ServerSettings

log = logging.getLogger("ferry.security")

EXIT_REFUSED = 2


class SecuritySettings(ServerSettings):
    """What every server's port shares: ``ServerSettings`` plus keys and TLS; subclasses set the
    env prefix."""

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
    max_connection_age_s: float = Field(
        0,
        ge=0,
        description="close each client connection after this age (GOAWAY) so clients rebalance "
        "over replicas; calls running then get grace_s; 0 = never",
    )


Stamp = tuple[tuple[int, int, int], ...]


def _stamp(paths: list[str]) -> Stamp:
    """What changes when a file is replaced or rewritten (a Secret volume swaps a symlink)."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def pair_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """True when ``key_pem`` is the private key of the first certificate in ``cert_pem``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki))


class CertificateReloader:
    """TLS credentials whose certificate, key and client CA are re-read when their files change.

    gRPC calls ``fetch`` before each new handshake; it costs one ``stat`` per file while nothing
    changed, so files are read only after a rotation.
    """

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None = None) -> None:
        self._paths = [p for p in (cert_file, key_file, client_ca_file) if p]
        self._cert_file, self._key_file, self._ca_file = cert_file, key_file, client_ca_file
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self._initial = self._configuration()
        if self._initial is None:
            raise OSError(f"the TLS key {key_file} does not belong to the certificate {cert_file}")
        self.rotations = 0

    def _configuration(self) -> grpc.ServerCertificateConfiguration | None:
        with open(self._cert_file, "rb") as c, open(self._key_file, "rb") as k:
            cert, key = c.read(), k.read()
        root = None
        if self._ca_file:
            with open(self._ca_file, "rb") as f:
                root = f.read()
        if not pair_matches(cert, key):
            return None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=root)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration once the files changed and agree; None keeps the current one."""
        with self._lock:
            try:
                stamp = _stamp(self._paths)
                if stamp == self._stamp:
                    return None
                config = self._configuration()
            except OSError as err:
                log.warning("TLS files unreadable, keeping the current certificate: %s", err)
                return None
            if config is None:
                return None  # mid-rotation: wait until the key matches the certificate
            self._stamp = stamp
            self.rotations += 1
            log.warning("TLS certificate reloaded from %s", self._cert_file)
            return config

    def credentials(self) -> grpc.ServerCredentials:
        assert self._initial is not None
        # gRPC reads None from the fetcher as "no change"; grpc-stubs does not allow it.
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self._ca_file is not None,
        )


def server_credentials(
    cert_file: str | None, key_file: str | None, client_ca_file: str | None = None
) -> grpc.ServerCredentials | None:
    """Reloading TLS credentials from PEM files; with ``client_ca_file``, clients must present a
    certificate signed by it (mTLS)."""
    if not cert_file or not key_file:
        return None
    return CertificateReloader(cert_file, key_file, client_ca_file).credentials()


def http_ssl_context(settings: SecuritySettings) -> ssl.SSLContext | None:
    """The REST port's TLS, from the same files as the gRPC port's (mTLS with tls_client_ca)."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.load_verify_locations(settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


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
