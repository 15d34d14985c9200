"""`ferry up --secure`: TLS and keys on every service, and every CLI command finds its way in."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client.inference import build_request
from tests.e2e.conftest import RunningStack, ferry, running_stack


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    root = tmp_path_factory.mktemp("secure-stack")
    with running_stack(root, "--secure", "--secrets-dir", str(root / "secrets")) as running:
        yield running


def _state(stack: RunningStack) -> dict:  # type: ignore[type-arg]
    return json.loads(Path(stack.state_file).read_text())


def _keys(stack: RunningStack) -> tuple[str, str]:
    secrets = stack.root / "secrets"
    return (secrets / "admin.key.txt").read_text(), (secrets / "infer.key.txt").read_text()


def test_keys_are_made_private_and_printed_once(secure: RunningStack) -> None:
    secrets = secure.root / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secrets.iterdir())
    admin, infer = _keys(secure)
    out = "".join(secure.lines)
    assert out.count(admin) == 1 and out.count(infer) == 1
    assert f"CA and keys in {secrets}" in out


def test_cli_commands_find_addresses_tls_and_keys_in_the_state_file(
    secure: RunningStack, tmp_path: Path
) -> None:
    args = ["--state-file", secure.state_file]
    status = ferry("status", *args)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("SERVING") >= 5
    models = ferry("models", *args)
    assert models.returncode == 0 and "cnn\tversions 1" in models.stdout, models.stderr
    jobs = ferry("jobs", *args)
    assert jobs.returncode == 0, jobs.stderr
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    infer = ferry("infer", "cnn", str(tmp_path / "x.npy"), "--top-k", "1", *args)
    assert infer.returncode == 0 and infer.stdout.startswith("row 0: class"), infer.stderr
    wrong = ferry("models", *args, "--api-key", "not-a-key")
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr


def test_the_gateway_wants_tls_then_a_key_then_the_role(secure: RunningStack) -> None:
    state = _state(secure)
    gateway = state["services"]["gateway"]
    _, infer_key = _keys(secure)
    request = build_request("cnn", {"input": np.zeros((1, 1, 8, 8), np.float32)})
    with grpc.insecure_channel(gateway) as ch, pytest.raises(grpc.RpcError) as plain:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=10)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE  # no TLS, no handshake
    creds = grpc.ssl_channel_credentials(Path(state["secure"]["ca"]).read_bytes())
    with grpc.secure_channel(gateway, creds) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as nokey:
            stub.ModelInfer(request, timeout=10)
        assert nokey.value.code() == grpc.StatusCode.UNAUTHENTICATED
        bearer = (("authorization", f"Bearer {infer_key}"),)
        assert stub.ModelInfer(request, timeout=30, metadata=bearer).model_name == "cnn"
        with pytest.raises(grpc.RpcError) as unload:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="cnn"), metadata=bearer)
        assert unload.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_no_key_reaches_a_log(secure: RunningStack) -> None:
    admin, infer = _keys(secure)
    logs = "".join(p.read_text(errors="replace") for p in (secure.root / "logs").glob("*.log"))
    assert logs and admin not in logs and infer not in logs
