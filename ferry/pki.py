"""The local CA, service certificates and API keys behind ``ferry up --secure``.

``ferry up --secure`` runs every service with TLS (mTLS between the gateway and the workers)
and the gateway with API keys, all on one machine, without asking the operator for a PKI.
So everything is generated here, locally, once: a private CA, one certificate per service
for the hosts the services listen on, and an admin and an inference key. Later runs reuse
the same folder, so clients that trust ``ca.crt`` and hold a key keep working across
restarts; a set that is incomplete, inconsistent, too loosely readable, about to expire or
no longer covering the hosts is regenerated as a whole, never patched piecemeal, so a
folder never mixes two generations.

The folder is ``0700`` and every file in it ``0600``, created with that mode (never
widened then narrowed), because it holds private keys and the plain API keys. ``keys.yaml``,
which the gateway's auth layer reads, holds only the keys' sha256 digests; the plain keys
are in ``admin.key.txt`` and ``infer.key.txt`` for the CLI.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry.core.store import atomic_write_bytes

DEFAULT_SERVICES = ("gateway", "worker", "trainer", "exporter")
DEFAULT_HOSTS = ("127.0.0.1", "localhost")

# Module-level so a test can shorten them and watch the reuse check react.
CA_VALIDITY = datetime.timedelta(days=365)
CERT_VALIDITY = datetime.timedelta(days=90)
# Certificates start in the past so a client whose clock runs a little behind accepts them.
BACKDATE = datetime.timedelta(minutes=5)
# A set that expires sooner than this is regenerated rather than handed to a stack that may run for days.
RENEW_WITHIN = datetime.timedelta(days=7)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
ADMIN_KEY_FILE, INFER_KEY_FILE, KEYS_FILE = "admin.key.txt", "infer.key.txt", "keys.yaml"
LOCK_FILE = ".lock"
KEY_PREFIX = "ferry_"
# Service names become file names next to ca.crt and the key files, so they are kept plain.
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_RESERVED = frozenset({"ca"})


@dataclass(frozen=True)
class Secrets:
    """Where one generated set lives, and its two API keys.

    The keys are left out of ``repr`` so that logging or printing a ``Secrets`` cannot leak them.
    """

    folder: Path
    services: tuple[str, ...]
    admin_key: str = field(repr=False)
    infer_key: str = field(repr=False)
    created: bool

    @property
    def ca(self) -> Path:
        """The CA certificate every client and service trusts."""
        return self.folder / CA_CERT

    @property
    def keys_file(self) -> Path:
        """The digest-only key file for the gateway's ``--api-keys-file``."""
        return self.folder / KEYS_FILE

    def cert(self, service: str) -> Path:
        """``service``'s certificate (server and client auth: the gateway presents it to workers too)."""
        return self.folder / f"{self._known(service)}.crt"

    def key(self, service: str) -> Path:
        """``service``'s private key."""
        return self.folder / f"{self._known(service)}.key"

    def _known(self, service: str) -> str:
        # a typo would otherwise yield a path that does not exist and fail later, far from here
        if service not in self.services:
            raise KeyError(f"no certificate for service {service!r}; this set has {list(self.services)}")
        return service


def make_secrets(
    folder: str | Path,
    services: Sequence[str] = DEFAULT_SERVICES,
    hosts: Sequence[str] = DEFAULT_HOSTS,
) -> Secrets:
    """Reuse the set in ``folder`` if it is complete and sound for ``services`` and ``hosts``, else make one.

    ``created`` on the result says which happened. Concurrent callers (two ``ferry up`` at once)
    are serialised on a lock file in the folder, so they agree on one set.
    """
    services = _check_services(services)
    hosts = _check_hosts(hosts)
    root = Path(folder)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is cut by the umask and ignored for an existing folder: set it outright
    root.chmod(0o700)
    with _locked(root):
        keys = _reusable(root, services, hosts)
        if keys is not None:
            return Secrets(root, services, keys[0], keys[1], created=False)
        admin, infer = _generate(root, services, hosts)
        return Secrets(root, services, admin, infer, created=True)


# -- generation -----------------------------------------------------------------------------------
def _generate(root: Path, services: tuple[str, ...], hosts: tuple[str, ...]) -> tuple[str, str]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Ferry local CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(root / CA_KEY, _private_pem(ca_key))
    _write(root / CA_CERT, ca.public_bytes(serialization.Encoding.PEM))
    san = x509.SubjectAlternativeName([_general_name(h) for h in hosts])
    for service in services:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            _builder(_name(f"ferry {service}"), ca_name, key.public_key(), now, CERT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(digital_signature=True),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(san, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            # strict verifiers (OpenSSL's X509_STRICT, Python 3.13's default context) demand it
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(root / f"{service}.key", _private_pem(key))
        _write(root / f"{service}.crt", cert.public_bytes(serialization.Encoding.PEM))
    admin = KEY_PREFIX + secrets.token_urlsafe(32)
    infer = KEY_PREFIX + secrets.token_urlsafe(32)
    _write(root / ADMIN_KEY_FILE, admin.encode())
    _write(root / INFER_KEY_FILE, infer.encode())
    _write(root / KEYS_FILE, _keys_yaml(admin, infer).encode())
    return admin, infer


def _keys_yaml(admin: str, infer: str) -> str:
    # written by hand, not yaml.dump, so the file reads exactly as the auth layer documents it
    return (
        "keys:\n"
        "  - name: admin\n"
        f"    sha256: {_sha256(admin)}\n"
        "    roles: [admin]\n"
        "  - name: infer\n"
        f"    sha256: {_sha256(infer)}\n"
        "    roles: [infer, read]\n"
        '    models: ["*"]\n'
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    validity: datetime.timedelta,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
    )


def _write(path: Path, data: bytes) -> None:
    """A new 0600 file, atomically: opening an existing one would keep its old mode, and the
    rename means a crash leaves either the old file or the new one, never half of one."""
    atomic_write_bytes(path, data, mode=0o600)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# -- the reuse check ------------------------------------------------------------------------------
def _reusable(root: Path, services: tuple[str, ...], hosts: tuple[str, ...]) -> tuple[str, str] | None:
    """The set's (admin, infer) keys when every file is there, private and sound, else None."""
    names = [CA_CERT, CA_KEY, ADMIN_KEY_FILE, INFER_KEY_FILE, KEYS_FILE]
    names += [f"{s}.{ext}" for s in services for ext in ("crt", "key")]
    for name in names:
        try:
            st = (root / name).lstat()
        except FileNotFoundError:
            return None
        # a key another user could have read is treated as leaked: start over
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            return None
    try:
        now = datetime.datetime.now(datetime.UTC)
        ca = x509.load_pem_x509_certificate((root / CA_CERT).read_bytes())
        ca_public = ca.public_key()
        if not isinstance(ca_public, ec.EllipticCurvePublicKey) or not _fresh(ca, now):
            return None
        if not _pair(root / CA_KEY, ca):
            return None
        wanted = {_general_name(h) for h in hosts}
        for service in services:
            cert = x509.load_pem_x509_certificate((root / f"{service}.crt").read_bytes())
            if cert.issuer != ca.subject or not _fresh(cert, now) or not _pair(root / f"{service}.key", cert):
                return None
            hash_algorithm = cert.signature_hash_algorithm
            if hash_algorithm is None:
                return None
            ca_public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_algorithm))
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if not wanted <= set(san):
                return None
        admin = (root / ADMIN_KEY_FILE).read_text()
        infer = (root / INFER_KEY_FILE).read_text()
        if not (admin.startswith(KEY_PREFIX) and infer.startswith(KEY_PREFIX)):
            return None
        if _digests(yaml.safe_load((root / KEYS_FILE).read_text())) != {
            "admin": _sha256(admin),
            "infer": _sha256(infer),
        }:
            return None
    except (
        ValueError,
        TypeError,
        KeyError,
        InvalidSignature,
        UnsupportedAlgorithm,
        x509.ExtensionNotFound,
        yaml.YAMLError,
    ):
        # unparsable PEM or YAML, a foreign key type, a bad signature: not a set this module made
        return None
    return admin, infer


def _fresh(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > RENEW_WITHIN


def _pair(key_path: Path, cert: x509.Certificate) -> bool:
    """Whether the private key in ``key_path`` belongs to ``cert``: TLS would fail on a mismatch."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return False
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def _digests(document: Any) -> dict[str, Any]:
    return {entry["name"]: entry["sha256"] for entry in document["keys"]}


# -- small helpers --------------------------------------------------------------------------------
def _check_services(services: Sequence[str]) -> tuple[str, ...]:
    if isinstance(services, str):  # a lone name would otherwise be split into letters
        raise TypeError("services must be a sequence of names, not a string")
    result = tuple(services)
    if not result:
        raise ValueError("make_secrets needs at least one service")
    for service in result:
        if not _SERVICE_NAME.fullmatch(service) or service in _RESERVED:
            raise ValueError(f"service name {service!r} must match {_SERVICE_NAME.pattern} and not be 'ca'")
    if len(set(result)) != len(result):
        raise ValueError(f"duplicate service names in {list(result)}")
    return result


def _check_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    if isinstance(hosts, str):
        raise TypeError("hosts must be a sequence of names or addresses, not a string")
    result = tuple(hosts)
    if not result or not all(result):
        raise ValueError("make_secrets needs at least one host, and no empty one")
    return result


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host.lower())


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage with only the named uses on."""
    uses = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment")
    uses += ("key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{use: allowed.get(use, False) for use in uses})


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ferry.pki FOLDER [HOST...]``: the same set for a deployment (compose, a cluster),
    with the hosts the services are reached by in every certificate."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ferry.pki", description=main.__doc__)
    parser.add_argument("folder", help="where the CA, certificates and keys go (made 0700)")
    parser.add_argument("hosts", nargs="*", help="names and IPs the services are reached by")
    args = parser.parse_args(argv)
    made = make_secrets(args.folder, hosts=(*DEFAULT_HOSTS, *args.hosts))
    print(f"{'made' if made.created else 'kept'} {made.folder}: ca.crt, <service>.crt/.key, {KEYS_FILE}")
    if made.created:
        print(
            f"admin key     {made.admin_key}\ninference key {made.infer_key}\n(shown once; also in *.key.txt)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
