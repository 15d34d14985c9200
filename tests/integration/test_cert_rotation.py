"""A worker whose certificate is renewed on disk serves the new one without a restart.

The test makes a CA and a worker certificate with ``ferry.pki.make_secrets``, starts a real
worker with TLS on them, then renews the pair in place (signed by the same CA, a new serial
and name), the way cert-manager or a Secret update does: the certificate first, then its key.
Between the two writes the files do not match, and new handshakes still get the old pair;
once both are written, a new connection sees the new certificate, while a connection made
before the rotation keeps working.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import time
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.pki import make_secrets
from tests.support.procs import ServiceProcess


def peer_certificate(port: int, ca: Path) -> dict[str, object]:
    """The certificate a new TLS handshake with 127.0.0.1:port presents, verified against ``ca``."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        cert = tls.getpeercert()
    assert cert
    return dict(cert)


def common_name(cert: dict[str, object]) -> str:
    subject = cert["subject"]
    assert isinstance(subject, tuple)
    return next(value for rdn in subject for key, value in rdn if key == "commonName")


def renew(folder: Path, cn: str) -> tuple[bytes, bytes, int]:
    """A new key and certificate for 127.0.0.1 from the set's own CA: (cert PEM, key PEM, serial)."""
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, serial


def replace(path: Path, data: bytes) -> None:
    """Write beside, then rename: a new inode, as a Secret volume's symlink swap gives."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def live(channel: grpc.Channel) -> bool:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    return bool(stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live)


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(tmp_path: Path) -> None:
    secrets = make_secrets(tmp_path / "pki", services=("worker",))
    store = tmp_path / "store"
    worker = ServiceProcess.serve(
        "worker",
        "--store",
        str(store),
        "--port",
        "0",
        "--tls-cert",
        str(secrets.cert("worker")),
        "--tls-key",
        str(secrets.key("worker")),
    ).start(timeout=60)
    credentials = grpc.ssl_channel_credentials(root_certificates=secrets.ca.read_bytes())
    try:
        before = peer_certificate(worker.port, secrets.ca)
        assert common_name(before) == "ferry worker"
        old = grpc.secure_channel(worker.address, credentials)
        assert live(old)

        cert_pem, key_pem, serial = renew(secrets.folder, "ferry worker renewed")
        # Half way: the new certificate with the old key does not match, so it is not taken.
        replace(secrets.cert("worker"), cert_pem)
        assert peer_certificate(worker.port, secrets.ca)["serialNumber"] == before["serialNumber"]
        replace(secrets.key("worker"), key_pem)

        deadline = time.monotonic() + 10
        after = peer_certificate(worker.port, secrets.ca)
        while common_name(after) != "ferry worker renewed" and time.monotonic() < deadline:
            time.sleep(0.05)
            after = peer_certificate(worker.port, secrets.ca)
        assert common_name(after) == "ferry worker renewed"
        assert int(str(after["serialNumber"]), 16) == serial
        with grpc.secure_channel(worker.address, credentials) as fresh:
            assert live(fresh)
        assert live(old)  # the connection made before the rotation keeps working
        old.close()
        assert worker.proc is not None and worker.proc.poll() is None  # never restarted
    finally:
        assert worker.stop() == 0


def test_the_reloader_takes_a_pair_only_once_both_files_changed_and_match(tmp_path: Path) -> None:
    """The rule without a server: no change, no new configuration; a certificate whose key is
    not there yet, none; the matching pair, one, once."""
    from ferry.core.security import CertificateReloader, pair_matches

    secrets = make_secrets(tmp_path / "pki", services=("worker",))
    reloader = CertificateReloader(str(secrets.cert("worker")), str(secrets.key("worker")))
    assert reloader.fetch() is None
    cert_pem, key_pem, _ = renew(secrets.folder, "renewed")
    assert not pair_matches(cert_pem, secrets.key("worker").read_bytes())
    replace(secrets.cert("worker"), cert_pem)
    assert reloader.fetch() is None
    replace(secrets.key("worker"), key_pem)
    assert reloader.fetch() is not None
    assert reloader.fetch() is None
    assert reloader.rotations == 1
    assert not pair_matches(b"not a certificate", key_pem)
