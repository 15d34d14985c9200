"""The attacks the security issue lists, against real servers: all four services with auth on.

One stack (worker, gateway, trainer, exporter) reads one key file; a second, plain trainer
shows what a job spec can and cannot make a trainer import. Store files are compared before and
after every refused call, and every log the stack wrote is searched for the keys at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry._proto.ferry.v1 import admin_pb2, exporter_pb2, trainer_pb2
from ferry._proto.ferry.v1 import exporter_pb2_grpc as ex_grpc
from ferry._proto.ferry.v1 import trainer_pb2_grpc as tr_grpc
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.client.inference import build_request
from ferry.client.trainer import SyncTrainerClient, build_spec, state_name
from ferry.core.auth import hash_key, is_open
from ferry.core.store import Store
from tests.support.deps import require_module
from tests.support.models import export_mlp, publish
from tests.support.procs import REPO, ServiceProcess

require_module("torch")

KEYS = {
    "admin": ("admin-secret-1f7c", ["admin"], ["*"]),
    "reader": ("reader-secret-88aa", ["read"], ["*"]),
    "inferer": ("inferer-secret-2b9d", ["infer"], ["mlp*"]),
    "ops": ("ops-secret-77e1", ["models", "read"], ["mlp"]),
    "trainer": ("trainer-secret-c0de", ["train", "read"], ["*"]),
    "trainer2": ("trainer2-secret-d00d", ["train", "read"], ["*"]),
    "gateway": ("gateway-secret-5e5e", ["infer", "read", "models"], ["*"]),
}
WRONG_KEY = (("authorization", "Bearer not-a-key"),)
IRIS = {"model": {"arch": "mlp"}, "dataset": {"name": "iris"}, "epochs": 1}
HOSTILE = "tests.support.hostile"
ATTACKS = ["os:system", "subprocess:getoutput", "builtins:eval", "ferry.zoo:load_factory"]
HOSTILE_MODULES = [f"{HOSTILE}.raises:make", f"{HOSTILE}.hangs:make", f"{HOSTILE}.exits:make"]


def hostile_checkpoints(store: Store) -> None:
    """Finished jobs whose spec.json names each hostile factory (weights of a real one)."""
    from tests.unit.test_exporter_source import train_job

    for module in ("raises", "hangs", "exits"):
        job = f"job-hostile-{module}"
        folder = train_job(store, job, "factory", steps=1)
        spec = json.loads((folder / "spec.json").read_text())
        spec["model"] = {"factory": f"{HOSTILE}.{module}:make", "params": {}}
        (folder / "spec.json").write_text(json.dumps(spec))
        record = json.loads(store.job_file(job).read_text())
        store.job_file(job).write_text(json.dumps({**record, "spec": spec}))


def secret(name: str) -> str:
    return KEYS[name][0]


def auth(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret(name)}"),)


def snapshot(root: Path) -> dict[str, str]:
    """Every file of the store by content; lock files and logs the services keep open are left out."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.endswith((".lock", ".log")):
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("secure-store")
    markers = tmp_path_factory.mktemp("markers")
    onnx = export_mlp(tmp_path_factory.mktemp("onnx") / "mlp.onnx")
    publish(root, "mlp", 1, onnx, {"max_batch_size": 8})
    publish(root, "secret-model", 1, onnx, {"max_batch_size": 8})
    hostile_checkpoints(Store(root))
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    entries = [
        {"name": n, "sha256": hash_key(k), "roles": roles, "models": models}
        for n, (k, roles, models) in KEYS.items()
    ]
    keys.write_text(json.dumps({"keys": entries}))
    env = {"FERRY_HOSTILE_MARKER": str(markers)}
    plain_markers = tmp_path_factory.mktemp("plain-markers")
    export_markers = tmp_path_factory.mktemp("export-markers")
    common = ["--port", "0", "--api-keys-file", str(keys)]
    procs: dict[str, ServiceProcess] = {}
    try:
        procs["worker"] = ServiceProcess.serve(
            "worker", "--store", str(root), *common, "--poll-interval-s", "0.2", env=env
        ).start()
        procs["gateway"] = ServiceProcess.serve(
            "gateway", "--workers", procs["worker"].address, "--worker-api-key", secret("gateway"), *common,
            "--http-port", "0",
        ).start()  # fmt: skip
        procs["trainer"] = ServiceProcess.serve(
            "trainer", "--store", str(root), *common, "--threads-per-job", "1",
            "--allowed-factories", HOSTILE, "--start-timeout-s", "8", "--max-queued-jobs-per-key", "1",
            "--max-epochs", "50", "--max-upload-bytes", "4096", env=env,
        ).start()  # fmt: skip
        procs["exporter"] = ServiceProcess.serve(
            "exporter", "--store", str(root), *common, "--max-parity-samples", "1000",
            "--allowed-factories", HOSTILE, "--factory-timeout-s", "8",
            env={"FERRY_HOSTILE_MARKER": str(export_markers)},
        ).start()  # fmt: skip
        procs["plain"] = ServiceProcess.serve(
            "trainer", "--store", str(tmp_path_factory.mktemp("plain-store")), "--port", "0",
            env={"FERRY_HOSTILE_MARKER": str(plain_markers)},
        ).start()  # fmt: skip
        yield {
            "procs": procs,
            "root": root,
            "markers": markers,
            "plain_markers": plain_markers,
            "export_markers": export_markers,
        }
    finally:
        for proc in reversed(procs.values()):
            proc.stop()


def channel(stack: dict[str, Any], service: str) -> grpc.Channel:
    return grpc.insecure_channel(stack["procs"][service].address)


def _status(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    return "OK", ""


SERVICES = {
    "worker": [pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]],
    "gateway": [
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        admin_pb2.DESCRIPTOR.services_by_name["GatewayAdmin"],
    ],
    "trainer": [trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]],
    "exporter": [exporter_pb2.DESCRIPTOR.services_by_name["Exporter"]],
}


@pytest.mark.parametrize("service", list(SERVICES))
def test_every_rpc_without_a_key_is_unauthenticated(stack: dict[str, Any], service: str) -> None:
    before = snapshot(stack["root"])
    seen = []
    with channel(stack, service) as ch:
        for desc in SERVICES[service]:
            for method in desc.methods:
                path = f"/{desc.full_name}/{method.name}"
                if is_open(path):
                    continue
                kinds = {
                    (False, False): ch.unary_unary,
                    (False, True): ch.unary_stream,
                    (True, False): ch.stream_unary,
                    (True, True): ch.stream_stream,
                }
                call = kinds[(method.client_streaming, method.server_streaming)](path)
                request: Any = iter([b""]) if method.client_streaming else b""
                code, message = _status(lambda c=call, r=request: c(r, timeout=10))
                assert code == "UNAUTHENTICATED", (path, code, message)
                assert "missing or unknown API key" in message
                request = iter([b""]) if method.client_streaming else b""
                bad = _status(lambda c=call, r=request: c(r, timeout=10, metadata=WRONG_KEY))
                assert bad[0] == "UNAUTHENTICATED", path
                seen.append(method.name)
    assert seen and snapshot(stack["root"]) == before
    with channel(stack, service) as ch:  # health stays open
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def _state_changes(stack: dict[str, Any]) -> list[tuple[str, str, Callable[[Any], Any]]]:
    """(service, rpc, call(metadata)) for every call that would change the store."""
    job_spec = build_spec(IRIS)
    upload = [
        trainer_pb2.DatasetChunk(name="evil", format="csv"),
        trainer_pb2.DatasetChunk(data=b"1,2,0\n3,4,1\n"),
    ]
    onnx_bytes = (stack["root"] / "models" / "mlp" / "1" / "model.onnx").read_bytes()
    imports = [
        exporter_pb2.ImportChunk(header=exporter_pb2.ImportHeader(model_name="mlp")),
        exporter_pb2.ImportChunk(data=onnx_bytes),
    ]

    def kserve(service: str) -> list[tuple[str, str, Callable[[Any], Any]]]:
        stub = pb_grpc.GRPCInferenceServiceStub(channel(stack, service))
        return [
            (service, "Unload", lambda md: stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="mlp"), timeout=30, metadata=md)),
            (service, "Load", lambda md: stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="mlp"), timeout=30, metadata=md)),
        ]  # fmt: skip

    tr = tr_grpc.TrainerStub(channel(stack, "trainer"))
    ex = ex_grpc.ExporterStub(channel(stack, "exporter"))
    return [
        *kserve("worker"),
        *kserve("gateway"),
        ("trainer", "SubmitJob", lambda md: tr.SubmitJob(
            trainer_pb2.TrainSubmitRequest(spec=job_spec), timeout=60, metadata=md)),
        ("trainer", "CancelJob", lambda md: tr.CancelJob(
            trainer_pb2.TrainCancelRequest(id="job-x"), timeout=30, metadata=md)),
        ("trainer", "UploadDataset", lambda md: tr.UploadDataset(iter(upload), timeout=30, metadata=md)),
        ("exporter", "DeleteVersion", lambda md: ex.DeleteVersion(
            exporter_pb2.DeleteVersionRequest(model_name="mlp", version=1), timeout=30, metadata=md)),
        ("exporter", "ImportOnnx", lambda md: ex.ImportOnnx(iter(imports), timeout=30, metadata=md)),
        ("exporter", "Export", lambda md: ex.Export(
            exporter_pb2.ExportRequest(job_id="job-x", model_name="mlp"), timeout=30, metadata=md)),
    ]  # fmt: skip


@pytest.mark.parametrize("key", ["reader", "inferer"])
def test_keys_without_the_role_change_nothing(stack: dict[str, Any], key: str) -> None:
    """A read key and an inference key try every state-changing call: each is refused, the store is
    the same file for file, and the served model still answers."""
    for service, rpc, call in _state_changes(stack):
        before = snapshot(stack["root"])
        code, message = _status(lambda c=call: c(auth(key)))
        assert code == "PERMISSION_DENIED", (service, rpc, code, message)
        assert f"API key {key!r} lacks the role" in message
        assert snapshot(stack["root"]) == before, (service, rpc)
    infer = build_request("mlp", {"input": np.ones((1, 8), np.float32)})
    with channel(stack, "gateway") as ch:
        reply = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(infer, timeout=30, metadata=auth("inferer"))
    assert reply.model_name == "mlp"


def test_model_globs_narrow_infer_and_models(stack: dict[str, Any]) -> None:
    with channel(stack, "gateway") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        infer = build_request("secret-model", {"input": np.ones((1, 8), np.float32)})
        code, message = _status(lambda: stub.ModelInfer(infer, timeout=30, metadata=auth("inferer")))
        assert (code, message) == ("PERMISSION_DENIED", "API key 'inferer' may not use model 'secret-model'")
        code, _ = _status(
            lambda: stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="secret-model"), timeout=30, metadata=auth("ops")
            )
        )
        assert code == "PERMISSION_DENIED"
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"), timeout=30, metadata=auth("inferer"))
        assert meta.name == "mlp"  # an infer key reads the metadata of what it may infer with
        code, _ = _status(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=auth("inferer")))
        assert code == "PERMISSION_DENIED"
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30, metadata=auth("reader"))
        assert {m.name for m in index.models} == {"mlp", "secret-model"}


def test_the_worker_refuses_direct_callers_and_trusts_the_gateway_key(stack: dict[str, Any]) -> None:
    infer = build_request("mlp", {"input": np.ones((2, 8), np.float32)})
    with channel(stack, "worker") as ch:
        code, _ = _status(lambda: pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(infer, timeout=30))
    assert code == "UNAUTHENTICATED"
    with channel(stack, "gateway") as ch:  # the gateway reaches the worker with its own key
        reply = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(infer, timeout=30, metadata=auth("inferer"))
    assert list(reply.outputs[0].shape) == [2, 3]


@pytest.mark.parametrize("factory", ATTACKS + HOSTILE_MODULES)
def test_factories_outside_the_list_are_refused_before_import(stack: dict[str, Any], factory: str) -> None:
    """The plain trainer allows no factory: each is PERMISSION_DENIED and nothing ran."""
    spec = {**IRIS, "model": {"factory": factory, "params": {"cmd": "touch pwned", "command": "touch pwned"}}}
    with SyncTrainerClient(stack["procs"]["plain"].address) as client, pytest.raises(Exception) as err:
        client.submit(spec)
    assert type(err.value).__name__ == "PermissionDenied"
    assert f"factory {factory!r} is not allowed here (allowed module prefixes: none)" in str(err.value)
    assert list(stack["plain_markers"].iterdir()) == []  # no hostile module was imported anywhere
    assert not (REPO / "pwned").exists()
    plain = stack["procs"]["plain"]
    assert plain.proc is not None and plain.proc.poll() is None


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        ("raises", "hostile module refuses to import"),
        ("hangs", "did not start within start_timeout_s=8 s"),
        ("exits", "exited with code 7"),
    ],
)
def test_an_allowed_hostile_factory_fails_its_job_not_the_trainer(
    stack: dict[str, Any], module: str, reason: str
) -> None:
    trainer = stack["procs"]["trainer"]
    with SyncTrainerClient(trainer.address, api_key=secret("admin")) as client:
        job = client.submit({**IRIS, "model": {"factory": f"{HOSTILE}.{module}:make"}})
        job = client.wait(job.id, timeout=120)
        assert state_name(job) == "FAILED"
        assert reason in job.error
        assert trainer.proc is not None and trainer.proc.poll() is None  # the trainer lives on
        assert client.get(job.id).id == job.id
    marker = stack["markers"] / module
    assert marker.is_file() and int(marker.read_text()) != trainer.pid  # it ran, in the job's process


def test_an_allowed_factory_that_behaves_trains(stack: dict[str, Any]) -> None:
    with SyncTrainerClient(stack["procs"]["trainer"].address, api_key=secret("admin")) as client:
        job = client.wait(client.submit({**IRIS, "model": {"factory": f"{HOSTILE}.fine:make"}}).id, 120)
    assert state_name(job) == "SUCCEEDED", job.error


def test_limits_are_named(stack: dict[str, Any]) -> None:
    with SyncTrainerClient(stack["procs"]["trainer"].address, api_key=secret("trainer2")) as client:
        with pytest.raises(Exception) as err:
            client.submit({**IRIS, "epochs": 500})
        assert type(err.value).__name__ == "InvalidArgument"
        assert "epochs must be an integer in [1, 50] on this trainer, got 500" in str(err.value)
        first = client.submit({**IRIS, "epochs": 50, "dataset": {"name": "digits"}})
        try:
            with pytest.raises(Exception) as err:
                client.submit(IRIS)
            assert type(err.value).__name__ == "ResourceExhausted"
            assert "max_queued_jobs_per_key=1" in str(err.value) and "'trainer2'" in str(err.value)
        finally:
            client.cancel(first.id)
        with pytest.raises(Exception) as err:
            client.upload_dataset("big", b"1,2,0\n" * 2000, "csv")
        assert type(err.value).__name__ == "ResourceExhausted"
    with channel(stack, "exporter") as ch:
        request = exporter_pb2.ExportRequest(
            job_id="job-x", model_name="m", options=exporter_pb2.ExportOptions(parity_samples=5000)
        )
        code, message = _status(
            lambda: ex_grpc.ExporterStub(ch).Export(request, timeout=30, metadata=auth("admin"))
        )
    assert code == "INVALID_ARGUMENT" and "max_parity_samples=1000" in message


def test_state_changes_are_audited_and_no_key_reaches_a_log(stack: dict[str, Any]) -> None:
    with channel(stack, "trainer") as ch:
        stub = tr_grpc.TrainerStub(ch)
        _status(
            lambda: stub.CancelJob(trainer_pb2.TrainCancelRequest(id="job-audit"), metadata=auth("reader"))
        )
        _status(
            lambda: stub.CancelJob(trainer_pb2.TrainCancelRequest(id="job-audit"), metadata=auth("trainer"))
        )
        _status(
            lambda: stub.CancelJob(
                trainer_pb2.TrainCancelRequest(id="job-audit"), metadata=(("x-request-id", "rid-42"),)
            )
        )
    deadline = time.monotonic() + 10
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        lines = [
            json.loads(line)
            for line in stack["procs"]["trainer"].lines
            if line.startswith("{") and '"audit": true' in line and "job-audit" in line
        ]
        if len(lines) >= 3:
            break
        time.sleep(0.1)
    outcomes = {(e["key"], e["outcome"]) for e in lines}
    assert ("reader", "PERMISSION_DENIED") in outcomes
    assert ("trainer", "NOT_FOUND") in outcomes
    assert ("-", "UNAUTHENTICATED") in outcomes
    assert all(e["method"] == "CancelJob" and e["service"] == "trainer" for e in lines)
    assert any(e["request_id"] == "rid-42" for e in lines)
    every_log = "".join(line for proc in stack["procs"].values() for line in proc.lines)
    job_logs = "".join(p.read_text(errors="replace") for p in (stack["root"] / "jobs").glob("*.log"))
    for name, (key, _, _) in KEYS.items():
        assert key not in every_log and key not in job_logs, f"the {name} key reached a log"


@pytest.mark.parametrize("service", list(SERVICES))
def test_a_non_loopback_bind_without_auth_refuses_to_start(service: str, tmp_path: Path) -> None:
    """Protected mode: exit 2 and a message, before any port opens."""
    argv = [sys.executable, "-m", "ferry.cli.main", "serve", service, "--host", "0.0.0.0", "--port", "0"]
    argv += ["--workers", "127.0.0.1:1"] if service == "gateway" else ["--store", str(tmp_path)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 2, done.stderr
    assert "refusing to listen on 0.0.0.0 with no API keys and no client certificates" in done.stderr
    assert "--insecure" in done.stderr


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        ("raises", "hostile module refuses to import"),
        ("hangs", "did not answer within 8 s (loading the factory model); it was killed"),
        ("exits", "ended with exit code 7 (loading the factory model)"),
    ],
)
def test_the_exporter_keeps_an_allowed_hostile_factory_out_of_its_process(
    stack: dict[str, Any], module: str, reason: str
) -> None:
    exporter = stack["procs"]["exporter"]
    before = snapshot(stack["root"] / "models")
    with channel(stack, "exporter") as ch:
        request = exporter_pb2.ExportRequest(job_id=f"job-hostile-{module}", model_name=f"h-{module}")
        code, message = _status(
            lambda: ex_grpc.ExporterStub(ch).Export(request, timeout=120, metadata=auth("admin"))
        )
    assert code == "FAILED_PRECONDITION" and reason in message, (code, message)
    assert exporter.proc is not None and exporter.proc.poll() is None  # the exporter lives on
    assert snapshot(stack["root"] / "models") == before  # nothing published
    marker = stack["export_markers"] / module
    assert marker.is_file() and int(marker.read_text()) != exporter.pid
