"""Every bad input the trainer issue lists, against a real trainer: status code and message.

Also the good path of the same doors: an uploaded dataset trains, a user factory imports.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry.client.trainer import SyncTrainerClient, state_name
from ferry.core.errors import FailedPrecondition, FerryError, InvalidArgument, NotFound, ResourceExhausted
from tests.support.deps import require_module
from tests.support.procs import REPO, ServiceProcess

require_module("torch")

UPLOAD_LIMIT = 200_000
IRIS = {"model": {"arch": "mlp"}, "dataset": {"name": "iris"}, "epochs": 1}


def tiny_factory(in_features: int = 4, num_classes: int = 3) -> Any:
    """A user factory the trainer imports by path (``tests.integration.test_trainer_errors:...``)."""
    import torch

    return torch.nn.Linear(in_features, num_classes)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer-errors-store")


@pytest.fixture(scope="module")
def trainer(store: Path) -> Iterator[ServiceProcess]:
    proc = ServiceProcess.serve(
        "trainer",
        "--store",
        str(store),
        "--port",
        "0",
        "--threads-per-job",
        "1",
        "--max-upload-bytes",
        str(UPLOAD_LIMIT),
        "--allowed-factories",
        "tests.integration.test_trainer_errors,tests.integration.nowhere",
    ).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(trainer: ServiceProcess) -> Iterator[SyncTrainerClient]:
    with SyncTrainerClient(trainer.address) as c:
        yield c


def expect(err_type: type[FerryError], code: grpc.StatusCode, fn: Any, *args: Any) -> str:
    with pytest.raises(err_type) as caught:
        fn(*args)
    assert caught.value.code == code
    return caught.value.message


def submit_error(client: SyncTrainerClient, spec: dict[str, Any]) -> str:
    return expect(InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, client.submit, spec)


def test_unknown_model_dataset_optimizer(client: SyncTrainerClient) -> None:
    message = submit_error(client, {**IRIS, "model": {"arch": "resnet9000"}})
    assert message.startswith("unknown model 'resnet9000'; the zoo has cnn, embedding_bag_text")
    message = submit_error(client, {**IRIS, "dataset": {"name": "imagenet"}})
    assert message.startswith("unknown dataset 'imagenet'; built-in: digits, iris")
    message = submit_error(client, {**IRIS, "optimizer": "lbfgs"})
    assert message == "unknown optimizer 'lbfgs'; choose one of sgd, adam, adamw"


def test_model_that_does_not_fit_the_data_is_rejected_with_both_shapes(client: SyncTrainerClient) -> None:
    message = submit_error(
        client,
        {**IRIS, "model": {"arch": "mlp", "params": {"in_features": 32}}, "dataset": {"name": "digits"}},
    )
    assert message == (
        "model 'mlp' takes in_features=32 but dataset 'digits' has 64 features "
        "(feature shape [1, 8, 8], output shape [10])"
    )
    message = submit_error(client, {**IRIS, "model": {"arch": "mlp", "params": {"num_classes": 5}}})
    assert message == (
        "model 'mlp' takes num_classes=5 but dataset 'iris' needs 3 outputs "
        "(feature shape [4], output shape [3])"
    )
    message = submit_error(client, {**IRIS, "model": {"arch": "cnn"}})
    assert message == (
        "model 'cnn' takes images [channels, height, width] but dataset 'iris' has feature shape [4]"
    )
    message = submit_error(client, {**IRIS, "model": {"arch": "lstm_text"}})
    assert (
        message
        == "model 'lstm_text' takes token ids [sequence] but dataset 'iris' has float features of shape [4]"
    )


def test_factory_that_does_not_fit_fails_its_job(client: SyncTrainerClient) -> None:
    """A factory is checked in the job's own process, never in the server: the job fails, with shapes."""
    factory = "tests.integration.test_trainer_errors:tiny_factory"
    job = client.submit({**IRIS, "model": {"factory": factory, "params": {"in_features": 7}}})
    job = client.wait(job.id, timeout=120)
    assert state_name(job) == "FAILED"
    assert f"model '{factory}' does not fit dataset 'iris': input shape [4]" in job.error


def test_factory_that_does_not_import(client: SyncTrainerClient) -> None:
    job = client.wait(
        client.submit({**IRIS, "model": {"factory": "tests.integration.nowhere:build"}}).id, 120
    )
    assert state_name(job) == "FAILED"
    assert "factory 'tests.integration.nowhere:build' does not import: No module named" in job.error
    message = submit_error(client, {**IRIS, "model": {"factory": "not-a-path"}})
    assert message == "factory 'not-a-path' must look like 'package.module:function'"


def test_user_factory_trains(client: SyncTrainerClient) -> None:
    factory = "tests.integration.test_trainer_errors:tiny_factory"
    job = client.wait(client.submit({**IRIS, "model": {"factory": factory}}).id, timeout=120)
    assert state_name(job) == "SUCCEEDED", job.error
    assert json.loads(job.spec_json)["model"] == {"factory": factory, "params": {}}


def test_unknown_job_id(client: SyncTrainerClient) -> None:
    for call in (client.get, client.cancel, lambda i: list(client.watch(i))):
        message = expect(NotFound, grpc.StatusCode.NOT_FOUND, call, "nope-123")
        assert message == "no job 'nope-123' on this trainer"


def test_bad_list_requests(client: SyncTrainerClient) -> None:
    message = expect(InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, client.list, (), 0, "xyz")
    assert message == "invalid page_token 'xyz'"
    message = expect(InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, client.list, (), -1)
    assert message == "page_size must not be negative, got -1"
    message = expect(InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, client.list, [99])
    assert message == "unknown job state '99' in the filter"


def test_cli_train_jobs_and_upload(trainer: ServiceProcess, tmp_path: Path) -> None:
    env = {**os.environ, "FERRY_TRAINER_ADDRESS": trainer.address}

    def ferry(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "ferry.cli.main", *args]
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)

    done = ferry("train", "--model", "mlp", "--dataset", "iris", "--epochs", "2", "--name", "cli")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("submitted job cli-")
    job_id = lines[0].split()[-1]
    assert any(line.startswith("epoch 2/2  loss ") for line in lines)
    assert f"job {job_id}: SUCCEEDED" in lines and any(
        line.startswith("test: test_accuracy") for line in lines
    )
    listed = ferry("jobs", "list", "--state", "SUCCEEDED")
    assert listed.returncode == 0 and job_id in listed.stdout
    missing = ferry("jobs", "cancel", "nope-1")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: NOT_FOUND: no job 'nope-1' on this trainer"
    refused = ferry("train", "--model", "resnet", "--dataset", "iris")
    assert refused.returncode == 1 and "error: INVALID_ARGUMENT: unknown model 'resnet'" in refused.stderr
    path = tmp_path / "cli-data.npz"
    np.savez(path, x=np.ones((10, 2)), y=np.arange(10) % 2)
    uploaded = ferry("upload", str(path))
    assert uploaded.returncode == 0, uploaded.stderr
    assert (
        uploaded.stdout.startswith("uploaded dataset cli-data: ")
        and "x [10, 2], 2 classes" in uploaded.stdout
    )


def test_cancel_finished_job(client: SyncTrainerClient) -> None:
    job = client.wait(client.submit(IRIS).id, timeout=120)
    assert state_name(job) == "SUCCEEDED"
    message = expect(FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, client.cancel, job.id)
    assert message == f"job '{job.id}' is already SUCCEEDED; only queued or running jobs can be cancelled"


def _npz(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


def test_upload_with_wrong_checksum_keeps_nothing(client: SyncTrainerClient, store: Path) -> None:
    data = _npz(np.zeros((10, 3), np.float32), np.arange(10) % 2)
    wrong = hashlib.sha256(b"something else").hexdigest()
    before = sorted((store / "datasets").iterdir())
    message = expect(
        InvalidArgument,
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.upload_dataset("bad", data, sha256=wrong),
    )
    actual = hashlib.sha256(data).hexdigest()
    assert message == (
        f"checksum mismatch for dataset 'bad': sent sha256 {wrong}, received data has {actual}; "
        "nothing was kept"
    )
    assert sorted((store / "datasets").iterdir()) == before


def test_upload_over_the_size_limit_keeps_nothing(client: SyncTrainerClient, store: Path) -> None:
    data = _npz(np.zeros((UPLOAD_LIMIT // 8, 2), np.float32), np.zeros(UPLOAD_LIMIT // 8, np.int64))
    before = sorted((store / "datasets").iterdir())
    message = expect(
        ResourceExhausted,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        lambda: client.upload_dataset("huge", data, chunk_bytes=16_384),
    )
    assert message == f"dataset upload exceeds the size limit of {UPLOAD_LIMIT} bytes; nothing was kept"
    assert sorted((store / "datasets").iterdir()) == before


def test_upload_with_overwrite_replaces_the_dataset(client: SyncTrainerClient, store: Path) -> None:
    first = _npz(np.zeros((10, 3), np.float32), np.arange(10) % 2)
    second = _npz(np.ones((20, 4), np.float32), np.arange(20) % 3)
    assert list(client.upload_dataset("again", first).x_shape) == [10, 3]
    message = expect(
        FerryError, grpc.StatusCode.ALREADY_EXISTS, lambda: client.upload_dataset("again", second)
    )
    assert message == "dataset 'again' already exists; upload with overwrite to replace it"
    assert (store / "datasets" / "again.npz").read_bytes() == first  # the refusal changed nothing
    answer = client.upload_dataset("again", second, overwrite=True)
    assert (list(answer.x_shape), answer.classes) == ([20, 4], 3)
    assert (store / "datasets" / "again.npz").read_bytes() == second


def test_uploaded_npz_and_csv_train(client: SyncTrainerClient, store: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    answer = client.upload_dataset("blobs", _npz(x, y), "npz")
    assert (answer.name, list(answer.x_shape), answer.classes) == ("blobs", [200, 5], 2)
    csv = "a,b,c,d,e,label\n" + "\n".join(
        ",".join(map(str, [*row, label])) for row, label in zip(x, y, strict=True)
    )
    client.upload_dataset("blobs-csv", csv.encode(), "csv")
    assert {"blobs-csv.csv", "blobs.npz"} <= {p.name for p in (store / "datasets").iterdir()}
    answer_names = ["blobs", "blobs-csv"]
    message = expect(
        FerryError, grpc.StatusCode.ALREADY_EXISTS, lambda: client.upload_dataset("blobs", _npz(x, y))
    )
    assert message == "dataset 'blobs' already exists; upload with overwrite to replace it"
    specs = [
        {"model": {"arch": "mlp"}, "dataset": {"upload": n}, "epochs": 20, "lr": 1e-2} for n in answer_names
    ]
    for job_id in [client.submit(spec).id for spec in specs]:
        job = client.wait(job_id, timeout=120)
        assert state_name(job) == "SUCCEEDED", job.error
        assert job.test_metrics["test_accuracy"] >= 0.85
    message = submit_error(client, {**IRIS, "dataset": {"upload": "missing"}})
    assert message == (
        "unknown uploaded dataset 'missing': the store holds no missing.npz, missing.csv or missing.jsonl"
    )
