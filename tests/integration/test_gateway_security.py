"""TLS on the gateway's port, mTLS to a worker that demands client certificates, API keys.

The certificates are the ones ``ferry up --secure`` uses, from ``ferry.pki.make_secrets``
with its default services and hosts, so these tests prove that set works with gRPC, the
Triton client and Redis: the worker serves its own certificate and demands one from the CA,
and the gateway presents its certificate to the worker as the client side of mTLS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.core.auth import hash_key
from ferry.pki import make_secrets
from tests.integration.test_gateway import mlp_request, start_gateway, start_workers, wait_until
from tests.support.deps import require_binary, require_module
from tests.support.models import export_mlp, publish
from tests.support.procs import RedisServer, ServiceProcess, free_port

tc = require_module("tritonclient.grpc")


def make_pki(folder: Path) -> dict[str, Path]:
    """The CA and two certificates by role: "server" is the worker's (the gateways serve it too),
    "client" the gateway's (its mTLS hop to the worker, and the test's own client certificate)."""
    s = make_secrets(folder)
    return {
        "ca_crt": s.ca,
        "server_crt": s.cert("worker"),
        "server_key": s.key("worker"),
        "client_crt": s.cert("gateway"),
        "client_key": s.key("gateway"),
    }


def test_the_key_file_digests_are_the_auth_layers(tmp_path: Path) -> None:
    s = make_secrets(tmp_path / "secrets")
    digests = {k["name"]: k["sha256"] for k in yaml.safe_load(s.keys_file.read_text())["keys"]}
    assert digests == {"admin": hash_key(s.admin_key), "infer": hash_key(s.infer_key)}


# "limited" is spent only by the rate-limit test, so every other test passes in any order around it
KEYS = {"reader": "reader-secret", "limited": "limited-secret", "open": "open-secret"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    root = tmp_path_factory.mktemp("store")
    onnx = export_mlp(tmp_path_factory.mktemp("onnx") / "mlp.onnx")
    publish(root, "mlp", 1, onnx, {"max_batch_size": 16})
    publish(root, "secret-model", 1, onnx, {"max_batch_size": 16})
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"name": "reader", "sha256": hash_key(KEYS["reader"]), "models": ["ml*"]},
                    {"name": "limited", "sha256": hash_key(KEYS["limited"]), "rate_per_s": 0.5, "burst": 3},
                    {"name": "open", "sha256": hash_key(KEYS["open"])},
                ]
            }
        )
    )
    procs: list[ServiceProcess] = []
    try:
        # the worker only talks to clients with a certificate from the CA (mTLS)
        worker_tls = ["--tls-cert", str(pki["server_crt"]), "--tls-key", str(pki["server_key"])]
        procs += start_workers(root, 1, *worker_tls, "--tls-client-ca", str(pki["ca_crt"]))
        to_worker = [
            "--worker-ca", str(pki["ca_crt"]), "--worker-cert", str(pki["client_crt"]),
            "--worker-key", str(pki["client_key"]),
        ]  # fmt: skip
        tls = ["--tls-cert", str(pki["server_crt"]), "--tls-key", str(pki["server_key"])]
        procs.append(start_gateway(procs[:1], *to_worker, *tls, "--api-keys-file", str(keys)))
        mtls = ["--tls-client-ca", str(pki["ca_crt"]), "--worker-server-name", "localhost"]
        procs.append(start_gateway(procs[:1], *to_worker, *tls, *mtls))
        yield {"pki": pki, "worker": procs[0], "tls": procs[1], "mtls": procs[2], "to_worker": to_worker}
    finally:
        for p in reversed(procs):
            p.stop()


def secure(address: str, pki: dict[str, Path], client_cert: bool) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        pki["ca_crt"].read_bytes(),
        pki["client_key"].read_bytes() if client_cert else None,
        pki["client_crt"].read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(address, creds)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def triton(address: str, pki: dict[str, Path], client_cert: bool) -> Any:
    kw: dict[str, Any] = {"ssl": True, "root_certificates": str(pki["ca_crt"])}
    if client_cert:
        kw |= {"private_key": str(pki["client_key"]), "certificate_chain": str(pki["client_crt"])}
    return tc.InferenceServerClient(address, **kw)


def triton_infer(client: Any, **kw: Any) -> Any:
    inp = tc.InferInput("input", [2, 8], "FP32")
    inp.set_data_from_numpy(np.ones((2, 8), np.float32))
    return client.infer("mlp", [inp], **kw)


def test_tls_gateway_over_an_mtls_hop_to_the_worker(setup: dict[str, Any]) -> None:
    client = triton(setup["tls"].address, setup["pki"], client_cert=False)
    wait_until(lambda: client.is_server_ready(), 30, "gateway ready over TLS")
    result = triton_infer(client, headers={"authorization": f"Bearer {KEYS['reader']}"})
    assert result.as_numpy("output").shape == (2, 3)


def test_plaintext_client_cannot_talk_to_a_tls_port(setup: dict[str, Any]) -> None:
    with grpc.insecure_channel(setup["tls"].address) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_gateway_demands_a_client_certificate(setup: dict[str, Any]) -> None:
    client = triton(setup["mtls"].address, setup["pki"], client_cert=True)
    wait_until(lambda: client.is_server_ready(), 30, "gateway ready over mTLS")
    assert triton_infer(client).as_numpy("output").shape == (2, 3)
    with (
        secure(setup["mtls"].address, setup["pki"], client_cert=False) as ch,
        pytest.raises(grpc.RpcError) as err,
    ):
        pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_worker_refuses_clients_without_a_certificate(setup: dict[str, Any]) -> None:
    with (
        secure(setup["worker"].address, setup["pki"], client_cert=False) as ch,
        pytest.raises(grpc.RpcError) as err,
    ):
        pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake is refused


# -- API keys ------------------------------------------------------------------------------------
def _status(call: Any) -> tuple[str, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code().name, err.details()
    return "OK", ""


def test_health_and_liveness_stay_open_without_a_key(setup: dict[str, Any]) -> None:
    with secure(setup["tls"].address, setup["pki"], client_cert=False) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        wait_until(lambda: stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready, 30, "ready")
        assert stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5).name == "ferry-gateway"
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_missing_or_unknown_key_is_unauthenticated(setup: dict[str, Any]) -> None:
    message = "missing or unknown API key (send 'authorization: Bearer <key>')"
    with secure(setup["tls"].address, setup["pki"], client_cert=False) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for md in (None, bearer("wrong"), (("authorization", "Basic abc"),)):
            assert _status(lambda md=md: stub.ModelInfer(mlp_request(1), timeout=10, metadata=md)) == (
                "UNAUTHENTICATED",
                message,
            )
        assert _status(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"), timeout=10)) == (
            "UNAUTHENTICATED",
            message,
        )
        stream = stub.ModelStreamInfer(iter([mlp_request(1)]), timeout=10)
        assert _status(lambda: list(stream)) == ("UNAUTHENTICATED", message)


def test_model_outside_the_keys_patterns_is_permission_denied(setup: dict[str, Any]) -> None:
    with secure(setup["tls"].address, setup["pki"], client_cert=False) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        md = bearer(KEYS["reader"])
        assert _status(lambda: stub.ModelInfer(mlp_request(1), timeout=10, metadata=md))[0] == "OK"
        denied = mlp_request(1, model="secret-model")
        assert _status(lambda: stub.ModelInfer(denied, timeout=10, metadata=md)) == (
            "PERMISSION_DENIED",
            "API key 'reader' may not use model 'secret-model'",
        )
        stream = stub.ModelStreamInfer(iter([denied]), timeout=10, metadata=md)
        assert _status(lambda: list(stream)) == (
            "PERMISSION_DENIED",
            "API key 'reader' may not use model 'secret-model'",
        )
        # the unrestricted key may use it
        assert _status(lambda: stub.ModelInfer(denied, timeout=10, metadata=bearer(KEYS["open"])))[0] == "OK"


def test_over_the_rate_limit_is_resource_exhausted(setup: dict[str, Any]) -> None:
    with secure(setup["tls"].address, setup["pki"], client_cert=False) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        md = bearer(KEYS["limited"])
        # Call until the first refusal, at most 40 times: 40 calls admitted at 0.5/s with a burst
        # of 3 would take over a minute, so the refusal comes whatever the machine's pace.
        answers: list[tuple[str, str]] = []
        while len(answers) < 40 and (not answers or answers[-1][0] == "OK"):
            answers.append(_status(lambda: stub.ModelInfer(mlp_request(1), timeout=10, metadata=md)))
    assert answers[-1] == ("RESOURCE_EXHAUSTED", "API key 'limited' is over its rate limit of 0.5 calls/s")
    assert len(answers) > 3, answers  # the burst was admitted first


def test_rediss_cache_over_tls(setup: dict[str, Any]) -> None:
    require_binary("redis-server")
    pki = setup["pki"]
    tls_port = free_port()
    redis = RedisServer(
        extra=[
            "--tls-port", str(tls_port), "--tls-cert-file", str(pki["server_crt"]),
            "--tls-key-file", str(pki["server_key"]), "--tls-ca-cert-file", str(pki["ca_crt"]),
            "--tls-auth-clients", "no",
        ]
    ).start()  # fmt: skip
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={pki['ca_crt']}"
    gateway = None
    try:
        gateway = start_gateway(
            [setup["worker"]], *setup["to_worker"], "--redis-url", url, "--cache-timeout-ms", "2000"
        )
        with grpc.insecure_channel(gateway.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            wait_until(
                lambda: stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=5).ready, 30, "ready"
            )
            req = mlp_request(2, seed=77)
            first = stub.ModelInfer(req, timeout=10)
            second = stub.ModelInfer(req, timeout=10)
        assert "ferry_cache_hit" not in first.parameters
        assert second.parameters["ferry_cache_hit"].bool_param
    finally:
        if gateway is not None:
            gateway.stop()
        redis.stop()
