"""ferry.pki: the set ``ferry up --secure`` generates once and reuses.

The certificates are checked as a TLS stack would check them: signatures against the CA's key,
the SANs and key usages, and real TLS handshakes (OpenSSL through ``ssl``, over memory buffers,
so no socket is opened) with hostname checking, client certificates and strict X.509 rules.
The keys are checked for what must never be on disk in plain outside the two ``*.key.txt`` files.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ipaddress
import os
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from ferry import pki
from ferry.pki import Secrets, make_secrets

SERVICES = ("gateway", "worker", "trainer", "exporter")
NOW_SLACK = datetime.timedelta(minutes=1)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def spki(public_key: object) -> bytes:
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(autouse=True)
def _no_stray_files(tmp_path: Path) -> Iterator[None]:
    """Whatever a test did, no half-written temporary file is left in a secrets folder."""
    yield
    strays = [p for p in tmp_path.rglob(".*") if p.name != ".lock"]
    assert strays == []


@pytest.fixture
def made(tmp_path: Path) -> Secrets:
    return make_secrets(tmp_path / "secrets")


# -- files and permissions ------------------------------------------------------------------------
# umask 0: a plain open() would leave the files world-readable; 0o277: os.open's mode alone gives 0400
@pytest.mark.parametrize("umask", [0, 0o277], ids=oct)
def test_the_files_are_there_and_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)  # an existing, too open folder is tightened
    old = os.umask(umask)
    try:
        s = make_secrets(folder)
    finally:
        os.umask(old)
    assert s.created and s.folder == folder and s.services == SERVICES
    expected = {"ca.crt", "ca.key", "admin.key.txt", "infer.key.txt", "keys.yaml", ".lock"}
    expected |= {f"{svc}.{ext}" for svc in SERVICES for ext in ("crt", "key")}
    assert {p.name for p in folder.iterdir()} == expected  # no temporary file left behind
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert s.ca == folder / "ca.crt" and s.keys_file == folder / "keys.yaml"
    assert all(
        s.cert(svc) == folder / f"{svc}.crt" and s.key(svc) == folder / f"{svc}.key" for svc in SERVICES
    )


def test_a_missing_folder_is_created_with_its_parents(tmp_path: Path) -> None:
    s = make_secrets(str(tmp_path / "a" / "b"), services=["worker"])
    assert s.folder == tmp_path / "a" / "b" and s.created
    assert stat.S_IMODE(s.folder.stat().st_mode) == 0o700


# -- the certificates -----------------------------------------------------------------------------
def test_the_ca_is_a_self_signed_p256_ca_for_a_year(made: Secrets) -> None:
    ca = load_cert(made.ca)
    key = load_key(made.folder / "ca.key")
    assert isinstance(key.curve, ec.SECP256R1) and spki(ca.public_key()) == spki(key.public_key())
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    now = datetime.datetime.now(datetime.UTC)
    start, end = ca.not_valid_before_utc, ca.not_valid_after_utc
    assert abs(now - datetime.timedelta(minutes=5) - start) < NOW_SLACK
    assert end - start == datetime.timedelta(days=365, minutes=5)


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_certificate_is_signed_by_the_ca_for_both_ends_of_tls(
    made: Secrets, service: str
) -> None:
    ca, cert = load_cert(made.ca), load_cert(made.cert(service))
    hash_algorithm = cert.signature_hash_algorithm
    assert hash_algorithm is not None
    ca_public = ca.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    ca_public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_algorithm))  # raises if not
    assert cert.issuer == ca.subject
    assert spki(cert.public_key()) == spki(load_key(made.key(service)).public_key())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert end - start == datetime.timedelta(days=90, minutes=5)
    assert end <= ca.not_valid_after_utc


def test_certificates_differ_per_service(made: Secrets) -> None:
    keys = {spki(load_cert(made.cert(svc)).public_key()) for svc in SERVICES}
    serials = {load_cert(made.cert(svc)).serial_number for svc in SERVICES}
    assert len(keys) == len(serials) == len(SERVICES)


# -- real TLS handshakes (memory BIOs: no socket) -------------------------------------------------
def server_context(s: Secrets, service: str, client_ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(s.cert(service), s.key(service))
    if client_ca is not None:  # mTLS, as the worker runs it: the client must present a certificate
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def client_context(ca: Path, s: Secrets | None = None, service: str = "") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))  # verifies the chain and the hostname
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # as Python 3.13's default context does
    if s is not None:
        ctx.load_cert_chain(s.cert(service), s.key(service))
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> None:
    """Complete a TLS handshake between the two contexts, or raise the ssl error either side hit."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_out, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(to_server, server_out, server_side=True)
    client = client_ctx.wrap_bio(to_client, client_out, server_hostname=hostname)
    pending = [client, server]
    for _ in range(10):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass
        to_server.write(client_out.read())
        to_client.write(server_out.read())
        if not pending:
            client.write(b"ping")  # and data flows: the server reads what the client sent
            to_server.write(client_out.read())
            assert server.read() == b"ping"
            return
    raise AssertionError("the handshake did not finish")


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_mtls_from_the_gateway_to_a_worker_handshakes(made: Secrets, hostname: str) -> None:
    handshake(server_context(made, "worker", made.ca), client_context(made.ca, made, "gateway"), hostname)


def test_tls_to_the_gateway_without_a_client_certificate_handshakes(made: Secrets) -> None:
    handshake(server_context(made, "gateway", None), client_context(made.ca), "localhost")


def test_a_host_outside_the_sans_is_refused(made: Secrets) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(server_context(made, "worker", None), client_context(made.ca), "ferry.example.com")


def test_another_sets_ca_is_not_trusted(made: Secrets, tmp_path: Path) -> None:
    other = make_secrets(tmp_path / "other")
    # a client trusting another CA refuses the server ...
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(made, "worker", None), client_context(other.ca), "localhost")
    # ... and a worker refuses a client certificate from another CA
    with pytest.raises(ssl.SSLError):
        handshake(
            server_context(made, "worker", made.ca), client_context(made.ca, other, "gateway"), "localhost"
        )


# -- the API keys ---------------------------------------------------------------------------------
def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_keys_yaml_holds_only_digests_in_the_auth_layers_format(made: Secrets) -> None:
    text = made.keys_file.read_text()
    assert text == (
        "keys:\n"
        "  - name: admin\n"
        f"    sha256: {sha256(made.admin_key)}\n"
        "    roles: [admin]\n"
        "  - name: infer\n"
        f"    sha256: {sha256(made.infer_key)}\n"
        "    roles: [infer, read]\n"
        '    models: ["*"]\n'
    )
    assert yaml.safe_load(text) == {
        "keys": [
            {"name": "admin", "sha256": sha256(made.admin_key), "roles": ["admin"]},
            {"name": "infer", "sha256": sha256(made.infer_key), "roles": ["infer", "read"], "models": ["*"]},
        ]
    }


def test_the_plain_keys_are_only_in_their_own_files(made: Secrets) -> None:
    admin, infer = made.admin_key, made.infer_key
    for key in (admin, infer):
        assert key.startswith("ferry_") and len(key) == len("ferry_") + 43  # token_urlsafe(32): 43 chars
    assert admin != infer
    assert (made.folder / "admin.key.txt").read_bytes() == admin.encode()  # no newline: read as is
    assert (made.folder / "infer.key.txt").read_bytes() == infer.encode()
    for path in made.folder.iterdir():
        if not path.name.endswith(".key.txt"):
            data = path.read_bytes()
            assert admin.encode() not in data and infer.encode() not in data, path.name


def test_repr_and_str_show_no_key(made: Secrets) -> None:
    for text in (repr(made), str(made)):
        assert made.admin_key not in text and made.infer_key not in text
        assert str(made.folder) in text


def test_secrets_is_frozen(made: Secrets) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.admin_key = "x"  # type: ignore[misc]


def test_keys_are_random_per_set(tmp_path: Path) -> None:
    a, b = make_secrets(tmp_path / "a"), make_secrets(tmp_path / "b")
    assert {a.admin_key, a.infer_key}.isdisjoint({b.admin_key, b.infer_key})


# -- reuse and regeneration -----------------------------------------------------------------------
def test_a_second_call_reuses_the_set_unchanged(made: Secrets) -> None:
    before = snapshot(made.folder)
    again = make_secrets(made.folder)
    assert not again.created
    assert snapshot(made.folder) == before
    assert (again.admin_key, again.infer_key) == (made.admin_key, made.infer_key)
    assert again == dataclasses.replace(made, created=False)


def test_fewer_services_or_hosts_reuse_the_set(made: Secrets) -> None:
    before = snapshot(made.folder)
    assert not make_secrets(made.folder, services=["worker"], hosts=["LOCALHOST"]).created
    assert snapshot(made.folder) == before


def assert_regenerated(old: Secrets, old_files: dict[str, bytes], new: Secrets) -> None:
    assert new.created
    assert new.ca.read_bytes() != old_files["ca.crt"]
    assert new.folder.joinpath("ca.key").read_bytes() != old_files["ca.key"]
    assert new.admin_key != old.admin_key and new.infer_key != old.infer_key
    for svc in new.services:  # all new: every certificate chains to the new CA
        load_cert(new.cert(svc)).verify_directly_issued_by(load_cert(new.ca))
    assert not make_secrets(new.folder, new.services).created  # and the new set is itself reusable


@pytest.mark.parametrize(
    "name", ["ca.crt", "ca.key", "worker.crt", "exporter.key", "infer.key.txt", "keys.yaml"]
)
def test_a_missing_file_regenerates_everything(made: Secrets, name: str) -> None:
    before = snapshot(made.folder)
    (made.folder / name).unlink()
    assert_regenerated(made, before, make_secrets(made.folder))


def test_a_certificate_expiring_within_a_week_regenerates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(pki, "CERT_VALIDITY", datetime.timedelta(days=6))
        short = make_secrets(tmp_path / "s")
    assert short.created
    end = load_cert(short.cert("worker")).not_valid_after_utc
    assert end - datetime.datetime.now(datetime.UTC) < datetime.timedelta(days=6)
    assert_regenerated(short, snapshot(short.folder), make_secrets(short.folder))


def test_a_ca_expiring_within_a_week_regenerates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(pki, "CA_VALIDITY", datetime.timedelta(days=6))  # the certificates keep their 90 days
        short = make_secrets(tmp_path / "s")
    assert load_cert(short.cert("worker")).not_valid_after_utc > load_cert(short.ca).not_valid_after_utc
    assert_regenerated(short, snapshot(short.folder), make_secrets(short.folder))


def write_private(path: Path, data: bytes) -> None:
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def resign(s: Secrets, service: str, *, not_after: datetime.datetime, hosts: list[x509.GeneralName]) -> None:
    """Replace ``service``'s certificate by one from the same CA and for the same key, differing as asked."""
    ca, old = load_cert(s.ca), load_cert(s.cert(service))
    cert = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca.subject)
        .public_key(load_key(s.key(service)).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - datetime.timedelta(days=90))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(hosts), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(load_key(s.folder / "ca.key"), hashes.SHA256())
    )
    write_private(s.cert(service), cert.public_bytes(serialization.Encoding.PEM))


LOCAL = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]


def test_the_resigned_control_certificate_is_reused(made: Secrets) -> None:
    """The control for the two tests below: a re-signed certificate that is sound is accepted."""
    resign(
        made,
        "worker",
        not_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30),
        hosts=LOCAL,
    )
    again = make_secrets(made.folder)
    assert not again.created and again.admin_key == made.admin_key


def test_an_expired_certificate_regenerates(made: Secrets) -> None:
    before = snapshot(made.folder)
    resign(
        made,
        "worker",
        not_after=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1),
        hosts=LOCAL,
    )
    assert load_cert(made.cert("worker")).not_valid_after_utc < datetime.datetime.now(datetime.UTC)
    assert_regenerated(made, before, make_secrets(made.folder))


def test_a_certificate_missing_a_host_regenerates(made: Secrets) -> None:
    before = snapshot(made.folder)
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    resign(made, "trainer", not_after=future, hosts=LOCAL[:1])
    assert_regenerated(made, before, make_secrets(made.folder))


def test_new_hosts_regenerate_with_every_host_in_the_sans(made: Secrets) -> None:
    before = snapshot(made.folder)
    hosts = ("127.0.0.1", "localhost", "::1", "ferry.local")
    new = make_secrets(made.folder, hosts=hosts)
    assert_regenerated(made, before, new)
    san = load_cert(new.cert("gateway")).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(h) for h in ("127.0.0.1", "::1")
    }
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "ferry.local"}
    assert not make_secrets(made.folder, hosts=hosts).created


def test_a_new_service_regenerates(made: Secrets) -> None:
    before = snapshot(made.folder)
    new = make_secrets(made.folder, services=[*SERVICES, "worker-2"])
    assert_regenerated(made, before, new)
    assert new.cert("worker-2").is_file()


def test_a_loosened_file_is_treated_as_leaked(made: Secrets) -> None:
    before = snapshot(made.folder)
    made.key("worker").chmod(0o644)
    new = make_secrets(made.folder)
    assert_regenerated(made, before, new)
    assert stat.S_IMODE(new.key("worker").stat().st_mode) == 0o600  # a new file, not the loose one reused


def from_another_set(s: Secrets, service: str) -> None:
    """A certificate and its key from another set: same CA name, but another CA signed it."""
    other = make_secrets(s.folder.parent / "other", services=[service])
    assert load_cert(other.cert(service)).issuer == load_cert(s.cert(service)).issuer
    write_private(s.cert(service), other.cert(service).read_bytes())
    write_private(s.key(service), other.key(service).read_bytes())


def rehash(s: Secrets, key: str, instead: str) -> bytes:
    text = s.keys_file.read_text()
    assert sha256(key) in text
    return text.replace(sha256(key), sha256(instead)).encode()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda s: write_private(s.ca, b"not a certificate"), id="garbage-ca"),
        pytest.param(
            lambda s: write_private(s.key("gateway"), s.key("worker").read_bytes()), id="key-mismatch"
        ),
        pytest.param(
            lambda s: write_private(s.cert("gateway"), s.ca.read_bytes()), id="ca-as-a-service-cert"
        ),
        pytest.param(lambda s: from_another_set(s, "gateway"), id="same-names-another-ca"),
        pytest.param(
            lambda s: write_private(s.keys_file, rehash(s, s.admin_key, "ferry_other")), id="wrong-digest"
        ),
        pytest.param(lambda s: write_private(s.keys_file, b"keys: [oops"), id="bad-yaml"),
        pytest.param(
            lambda s: write_private(s.folder / "admin.key.txt", b"something else"), id="foreign-key"
        ),
    ],
)
def test_an_inconsistent_set_regenerates(made: Secrets, damage: Callable[[Secrets], None]) -> None:
    before = snapshot(made.folder)
    damage(made)
    assert_regenerated(made, before, make_secrets(made.folder))


def test_concurrent_callers_agree_on_one_set(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    start = threading.Barrier(4)
    results: list[Secrets] = []

    def call() -> None:
        start.wait()
        results.append(make_secrets(folder))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.created for r in results) == [False, False, False, True]
    assert len({(r.admin_key, r.infer_key) for r in results}) == 1


# -- refusals -------------------------------------------------------------------------------------
def test_an_unknown_service_has_no_paths(made: Secrets) -> None:
    with pytest.raises(KeyError, match="no certificate for service 'workr'"):
        made.cert("workr")
    with pytest.raises(KeyError):
        made.key("ca")


@pytest.mark.parametrize(
    ("services", "hosts", "error"),
    [
        (["ca"], ["localhost"], ValueError),
        (["../escape"], ["localhost"], ValueError),
        (["Worker"], ["localhost"], ValueError),
        (["worker", "worker"], ["localhost"], ValueError),
        ([], ["localhost"], ValueError),
        ("worker", ["localhost"], TypeError),
        (["worker"], [], ValueError),
        (["worker"], [""], ValueError),
        (["worker"], "localhost", TypeError),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, services: list[str], hosts: list[str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        make_secrets(tmp_path / "secrets", services=services, hosts=hosts)
    assert not (tmp_path / "secrets").exists()
