"""The health probe baked into the images, and the images' entrypoints, against real servers.

The offline checks of deploy/ are in tests/unit/test_deploy_*.py; these open loopback
connections, so they live with the integration tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.unit.deploy_support import DOCKER, HEALTHCHECK_SCRIPT, SERVICES
from tests.unit.deploy_support import dockerfile_env as _env_of
from tests.unit.deploy_support import target_chain as _chain

# --------------------------------------------------------------------------- the health probe


def _load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("ferry_healthcheck", DOCKER / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _health_server(credentials: grpc.ServerCredentials | None = None) -> Iterator[tuple[int, Any]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = "127.0.0.1:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(0)


def test_healthcheck_follows_the_serving_status(capsys: pytest.CaptureFixture[str]) -> None:
    probe = _load_healthcheck()
    with _health_server() as (port, servicer):
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe.main(["--port", str(port)]) == 0
        assert capsys.readouterr().out.strip() == f"127.0.0.1:{port}: SERVING"
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe.main(["--port", str(port)]) == 1
        assert capsys.readouterr().out.strip() == f"127.0.0.1:{port}: NOT_SERVING"
        assert probe.main(["--port", str(port), "--service", "inference.GRPCInferenceService"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().out
    # Nobody listens any more: unreachable, not healthy.
    assert probe.main(["--port", str(port), "--timeout", "1"]) == 1
    assert re.search(r": (UNAVAILABLE|DEADLINE_EXCEEDED): ", capsys.readouterr().out)


def test_healthcheck_reads_its_port_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    probe = _load_healthcheck()
    assert probe.main([]) == 1
    assert "no port" in capsys.readouterr().out
    with _health_server() as (port, servicer):
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        monkeypatch.setenv("FERRY_HEALTHCHECK_PORT", str(port))
        assert probe.main([]) == 0


def _pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for ferry-worker-headless..., and a client certificate."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(
        name: str, key: Any, issuer: x509.Name, signer: Any, *, ca: bool, eku: list[Any]
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def write(name: str, key: Any, certificate: x509.Certificate) -> None:
        (tmp_path / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (tmp_path / f"{name}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferry test ca")])
    write("ca", ca_key, cert("ferry test ca", ca_key, ca_name, ca_key, ca=True, eku=[]))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_name = "ferry-worker-headless.ferry.svc.cluster.local"
    write("server", server_key, cert(server_name, server_key, ca_name, ca_key, ca=False, eku=usages))
    return {p.stem + p.suffix: p for p in tmp_path.iterdir()}


def test_healthcheck_speaks_mutual_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As in the TLS overlays: the worker demands a client certificate from the worker CA, and the
    probe presents the worker's own certificate (server + client auth) over 127.0.0.1."""
    probe = _load_healthcheck()
    pki = _pki(tmp_path)
    credentials = grpc.ssl_server_credentials(
        [(pki["server.key"].read_bytes(), pki["server.crt"].read_bytes())],
        root_certificates=pki["ca.crt"].read_bytes(),
        require_client_auth=True,
    )
    name = "ferry-worker-headless.ferry.svc.cluster.local"
    with _health_server(credentials) as (port, servicer):
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        base = ["--port", str(port), "--timeout", "2", "--tls-ca", str(pki["ca.crt"])]
        mtls = [*base, "--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"])]
        assert probe.main([*mtls, "--tls-server-name", name]) == 0
        assert capsys.readouterr().out.strip().endswith("SERVING")
        # No client certificate: the handshake fails and the probe says so.
        assert probe.main([*base, "--tls-server-name", name]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().out
        # 127.0.0.1 is not the name on the certificate: without the override, verification fails.
        assert probe.main(mtls) == 1
        assert "UNAVAILABLE" in capsys.readouterr().out
        # Plaintext against a TLS port fails too (which is why TLS pods cannot use kubelet grpc probes).
        assert probe.main(["--port", str(port), "--timeout", "2"]) == 1


def _image_process(service: str, store: Path, workers: str = "") -> tuple[Any, list[str]]:
    """The CPU image of ``service`` as a local process: its ENTRYPOINT and ENV, bound to loopback on
    free ports with a temp store; returns it (not started) and its HEALTHCHECK argv."""
    from tests.support.procs import ServiceProcess, free_port

    chain = _chain(DOCKER / "Dockerfile", service)
    entry = json.loads(next(v for k, v in chain if k == "ENTRYPOINT"))
    assert entry[0] == "ferry"
    env = {k: v for k, v in _env_of(chain).items() if k.startswith("FERRY_")}
    prefix = SERVICES[service][1]
    env |= {f"{prefix}HOST": "127.0.0.1", f"{prefix}PORT": "0", f"{prefix}METRICS_PORT": "0"}
    if f"{prefix}HTTP_PORT" in env:  # the gateway's REST port (0 is off, not a free one)
        env[f"{prefix}HTTP_PORT"] = str(free_port())
    if f"{prefix}STORE" in env:
        env[f"{prefix}STORE"] = str(store)
    if service == "gateway":
        env |= {"FERRY_GATEWAY_METRICS_HOST": "127.0.0.1", "FERRY_GATEWAY_WORKERS": workers}
    check = next(v for k, v in chain if k == "HEALTHCHECK")
    argv = json.loads(check[check.index("[") :])
    assert argv[:2] == ["python", HEALTHCHECK_SCRIPT]
    return ServiceProcess([sys.executable, "-m", "ferry.cli.main", *entry[1:]], env=env), argv[2:]


def test_image_entrypoints_start_from_their_environment_and_pass_the_healthcheck(tmp_path: Path) -> None:
    """What `docker run` does, minus the container: each CPU target's ENTRYPOINT (`ferry serve X`,
    no flags) with the target's ENV, then its HEALTHCHECK command. Only the bind address, ports and
    store change (loopback, free ports, a temp folder) so tests can run side by side. SIGTERM, what
    `docker stop` sends, ends each one cleanly."""
    store = tmp_path / "store"
    backends = {s: _image_process(s, store) for s in ("worker", "trainer", "exporter")}
    gateway: tuple[Any, list[str]] | None = None

    def healthcheck(item: tuple[str, tuple[Any, list[str]]]) -> tuple[str, int, str, int]:
        service, (proc, check) = item
        result = subprocess.run(
            [sys.executable, str(DOCKER / "healthcheck.py"), *check],
            env={**os.environ, "FERRY_HEALTHCHECK_PORT": str(proc.port)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        return service, result.returncode, (result.stdout + result.stderr).strip(), proc.port

    # Start, check and stop side by side: the torch imports and the drains overlap.
    with futures.ThreadPoolExecutor(len(backends) + 1) as pool:
        try:
            list(pool.map(lambda p: p.start(timeout=120), [p for p, _ in backends.values()]))
            gateway = _image_process("gateway", store, workers=backends["worker"][0].address)
            gateway[0].start(timeout=60)
            results = list(pool.map(healthcheck, {**backends, "gateway": gateway}.items()))
            for service, code, out, port in results:
                assert code == 0, f"{service}: {out}"
                assert out == f"127.0.0.1:{port}: SERVING", service
        finally:
            codes = {"gateway": gateway[0].stop() if gateway else None}
            stopped = pool.map(lambda p: p.stop(), [p for p, _ in backends.values()])
            codes |= dict(zip(backends, stopped, strict=True))
    assert codes == {"gateway": 0, "worker": 0, "trainer": 0, "exporter": 0}, codes
