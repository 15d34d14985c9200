"""A real trainer process on a loopback port: training quality, watch, cancel, kill, DDP, determinism.

Jobs run in the trainer's own child processes with real torch; accuracy thresholds
are the issue's (>= 95% test accuracy on digits for mlp and cnn).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.client.trainer import SyncTrainerClient, state_name
from ferry.core.errors import FailedPrecondition
from tests.support.deps import require_module
from tests.support.procs import ServiceProcess, free_port

pytestmark = pytest.mark.solo  # its own trainer and store: the file-order pass only

torch = require_module("torch")
safetensors_torch = require_module("safetensors.torch")

MLP_DIGITS = {
    "model": {"arch": "mlp", "params": {"hidden": [256]}},
    "dataset": {"name": "digits"},
    "epochs": 20,
    "lr": 3e-3,
    "batch_size": 32,
    "schedule": "cosine",
    "seed": 0,
}
CNN_DIGITS = {
    "model": {"arch": "cnn", "params": {"channels": [16, 32]}},
    "dataset": {"name": "digits"},
    "epochs": 20,
    "lr": 1e-2,
    "batch_size": 32,
    "schedule": "cosine",
    "seed": 1,
}
NAN = {
    "model": {"arch": "mlp"},
    "dataset": {"name": "synthetic_regression"},
    "optimizer": "sgd",
    "lr": 1e20,
    "epochs": 1,
}
IRIS = {"model": {"arch": "mlp", "params": {"hidden": [16], "dropout": 0.1}}, "dataset": {"name": "iris"}}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer-store")


@pytest.fixture(scope="module")
def trainer(store: Path) -> Iterator[ServiceProcess]:
    proc = ServiceProcess.serve(
        "trainer",
        "--store",
        str(store),
        "--port",
        "0",
        "--max-concurrent-jobs",
        "2",
        "--threads-per-job",
        "1",
        "--cancel-grace-s",
        "2",
        "--metrics-port",
        str(free_port()),
    ).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(trainer: ServiceProcess) -> Iterator[SyncTrainerClient]:
    with SyncTrainerClient(trainer.address) as c:
        yield c


def record(store: Path, job_id: str) -> dict[str, Any]:
    return json.loads((store / "jobs" / f"{job_id}.json").read_text())


def final_weights(store: Path, job_id: str) -> dict[str, Any]:
    return safetensors_torch.load_file(str(store / "checkpoints" / job_id / "final" / "weights.safetensors"))


def test_mlp_and_cnn_reach_95_percent_on_digits(client: SyncTrainerClient, store: Path) -> None:
    mlp = client.submit(MLP_DIGITS, name="mlp-digits")
    cnn = client.submit(CNN_DIGITS, name="cnn-digits")
    for job_id, arch in ((mlp.id, "mlp"), (cnn.id, "cnn")):
        job = client.wait(job_id, timeout=240)
        assert state_name(job) == "SUCCEEDED", job.error
        assert job.test_metrics["test_accuracy"] >= 0.95, (arch, dict(job.test_metrics))
        tags = list(job.checkpoints)
        assert tags[-1] == "final" and tags[0] == "epoch-0001" and len(tags) == job.progress.epochs + 1
        # The checkpoint contract the exporter reads.
        folder = store / "checkpoints" / job_id / "final"
        spec = json.loads((folder / "spec.json").read_text())
        assert spec["job"] == job_id and spec["model"]["arch"] == arch
        assert spec["input"] == {"name": "input", "datatype": "FP32", "shape": [1, 8, 8]}
        assert spec["output"] == {"name": "logits", "shape": [10]}
        assert spec["task"] == "classification" and spec["classes"] == 10
        assert spec["dataset"]["name"] == "digits"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["test"]["accuracy"] == pytest.approx(job.test_metrics["test_accuracy"])
        assert len(metrics["history"]) == job.progress.epochs
        from ferry.datasets import load_dataset
        from ferry.zoo import build_model

        model = build_model(spec["model"]).eval()
        model.load_state_dict(final_weights(store, job_id))
        data = load_dataset(spec["dataset"])
        with torch.no_grad():
            predicted = model(torch.from_numpy(data.x_test)).argmax(1).numpy()
        assert np.mean(predicted == data.y_test) == pytest.approx(job.test_metrics["test_accuracy"])


def test_lstm_text_learns_tokens(client: SyncTrainerClient) -> None:
    spec = {
        "model": {"arch": "lstm_text"},
        "dataset": {"name": "synthetic_tokens", "params": {"classes": 4}},
        "epochs": 8,
        "lr": 1e-2,
        "batch_size": 32,
    }
    job = client.wait(client.submit(spec, name="lstm").id, timeout=240)
    assert state_name(job) == "SUCCEEDED", job.error
    assert job.test_metrics["test_accuracy"] >= 0.6  # chance is 0.25
    assert json.loads(job.spec_json)["input"] == {"name": "input", "datatype": "INT64", "shape": [-1]}


def test_watch_streams_progress_to_completion(client: SyncTrainerClient) -> None:
    job = client.submit({**IRIS, "epochs": 4, "batch_size": 16}, name="watched")
    events = list(client.watch(job.id, timeout=240))
    kinds = [e.kind for e in events]
    assert kinds[0] == "snapshot"
    assert "progress" in kinds
    epochs = [e.job.progress.epoch for e in events if e.kind == "epoch"]
    assert epochs == [1, 2, 3, 4]
    last = events[-1].job
    assert state_name(last) == "SUCCEEDED"
    assert "val_loss" in last.progress.metrics and "val_accuracy" in last.progress.metrics
    progress = [e.job.progress for e in events if e.kind == "progress"]
    assert all(p.steps_per_epoch > 0 and p.samples_per_second > 0 for p in progress)
    # Watching a finished job answers its snapshot and ends.
    again = list(client.watch(job.id, timeout=30))
    assert len(again) == 1 and state_name(again[0].job) == "SUCCEEDED"


def test_same_seed_gives_identical_weights(client: SyncTrainerClient, store: Path) -> None:
    spec = {**IRIS, "epochs": 3, "batch_size": 8, "seed": 7}
    ids = [client.submit(spec).id, client.submit(spec).id, client.submit({**spec, "seed": 8}).id]
    for job_id in ids:
        assert state_name(client.wait(job_id, timeout=240)) == "SUCCEEDED"
    a, b, other = (final_weights(store, i) for i in ids)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_two_process_ddp_job_on_cpu(client: SyncTrainerClient, store: Path) -> None:
    spec = {
        "model": {"arch": "mlp", "params": {"hidden": [128]}},
        "dataset": {"name": "digits", "params": {"flatten": True}},
        "epochs": 10,
        "lr": 3e-3,
        "batch_size": 32,
        "schedule": "cosine",
        "nprocs": 2,
    }
    job = client.wait(client.submit(spec, name="ddp").id, timeout=240)
    assert state_name(job) == "SUCCEEDED", job.error
    rec = record(store, job.id)
    assert rec["world"] == 2 and rec["device"] == "cpu"
    assert job.test_metrics["test_accuracy"] >= 0.9
    # Each rank saw half of each epoch: steps per epoch are those of half the training split.
    n_train = round(1797 * 0.8)
    n_train -= round(n_train * 0.1)
    assert job.progress.steps_per_epoch == -(-(n_train // 2) // 32)
    assert json.loads((store / "checkpoints" / job.id / "final" / "spec.json").read_text())["input"][
        "shape"
    ] == [64]


def _wait_for_epoch(client: SyncTrainerClient, job_id: str, epoch: int) -> None:
    for event in client.watch(job_id, timeout=240):
        if event.kind == "epoch" and event.job.progress.epoch >= epoch:
            return
    raise AssertionError("the job ended before reaching the epoch")


def test_cancel_running_job_keeps_last_checkpoint(client: SyncTrainerClient, store: Path) -> None:
    endless = {**IRIS, "epochs": 100_000, "batch_size": 4}
    job, other, queued = (client.submit(endless, name="endless") for _ in range(3))
    # Two jobs at once on this trainer: the third waits in the queue, and cancelling it is immediate.
    assert state_name(client.get(queued.id)) == "QUEUED"
    cancelled_early = client.cancel(queued.id)
    assert (state_name(cancelled_early), cancelled_early.error) == (
        "CANCELLED",
        "cancelled before it started",
    )
    assert not cancelled_early.checkpoints and cancelled_early.attempts == 0
    assert state_name(client.cancel(other.id)) == "CANCELLED"
    _wait_for_epoch(client, job.id, 1)
    cancelled = client.cancel(job.id)  # returns once the job process has ended (grace 2 s)
    assert state_name(cancelled) == "CANCELLED"
    assert cancelled.checkpoints and "final" not in cancelled.checkpoints
    last = store / "checkpoints" / job.id / cancelled.checkpoints[-1]
    assert (last / "weights.safetensors").is_file() and (last / "spec.json").is_file()
    assert not list((store / "checkpoints" / job.id).glob(".staging-*"))
    assert record(store, job.id)["state"] == "CANCELLED"
    with pytest.raises(FailedPrecondition, match=f"job '{job.id}' is already CANCELLED"):
        client.cancel(job.id)


def test_sigkilled_job_process_ends_failed(client: SyncTrainerClient, store: Path) -> None:
    job = client.submit({**IRIS, "epochs": 100_000, "batch_size": 4}, name="victim")
    _wait_for_epoch(client, job.id, 1)
    pid = record(store, job.id)["pid"]
    assert pid > 0
    os.kill(pid, signal.SIGKILL)
    final = client.wait(job.id, timeout=60)
    assert state_name(final) == "FAILED"
    assert final.error == "the job process was killed by SIGKILL"


def test_nan_loss_fails_the_job(client: SyncTrainerClient) -> None:
    job = client.wait(client.submit({**NAN, "epochs": 2}, name="nan").id, timeout=120)
    assert state_name(job) == "FAILED"
    assert job.error.startswith("loss became ") and "(not finite) at epoch 1" in job.error


def test_early_stopping_keeps_the_best_epoch_and_regression_trains(
    client: SyncTrainerClient, store: Path
) -> None:
    # min_delta 1.0: no epoch after the first improves enough, so patience 1 stops after epoch 2.
    stopping = {**IRIS, "epochs": 50, "early_stopping_patience": 1, "early_stopping_min_delta": 1.0}
    regression = {
        "model": {"arch": "mlp", "params": {"hidden": [32]}},
        "dataset": {"name": "synthetic_regression", "params": {"samples": 500, "features": 4}},
        "loss": "smooth_l1",
        "optimizer": "adamw",
        "weight_decay": 0.01,
        "grad_clip_norm": 1.0,
        "epochs": 30,
        "lr": 1e-2,
    }
    stopped_id, regression_id = client.submit(stopping).id, client.submit(regression).id
    job = client.wait(stopped_id, timeout=240)
    assert state_name(job) == "SUCCEEDED", job.error
    assert list(job.checkpoints) == ["epoch-0001", "epoch-0002", "final"]
    summary = json.loads((store / "checkpoints" / job.id / "final" / "metrics.json").read_text())
    assert (summary["stopped_early"], summary["best_epoch"], summary["epochs_run"]) == (True, 1, 2)
    best = safetensors_torch.load_file(
        str(store / "checkpoints" / job.id / "epoch-0001" / "weights.safetensors")
    )
    assert all(torch.equal(best[k], v) for k, v in final_weights(store, job.id).items())

    job = client.wait(regression_id, timeout=240)
    assert state_name(job) == "SUCCEEDED", job.error
    assert set(job.test_metrics) == {"test_loss"}
    assert job.test_metrics["test_loss"] < 0.1  # targets have unit variance: far below a constant guess
    spec = json.loads(job.spec_json)
    assert (spec["task"], spec["classes"], spec["output"]["shape"]) == ("regression", 0, [1])


QUICK = {**IRIS, "epochs": 2}


def test_list_filters_by_state_and_pages(client: SyncTrainerClient) -> None:
    mine = [client.submit(QUICK, name=f"listed-{n}").id for n in range(3)]
    broken = client.submit(NAN, name="listed-nan").id
    for job_id in [*mine, broken]:
        client.wait(job_id, timeout=120)
    everything = client.list()
    assert not everything.next_page_token
    ids = [j.id for j in everything.jobs]
    assert set(mine) | {broken} <= set(ids) and len(ids) == len(set(ids))
    failed = client.list(states=["FAILED"])
    assert [j.id for j in failed.jobs] == [j.id for j in everything.jobs if state_name(j) == "FAILED"]
    assert broken in {j.id for j in failed.jobs}
    succeeded = {j.id for j in client.list(states=["SUCCEEDED"]).jobs}
    assert set(mine) <= succeeded and broken not in succeeded
    paged: list[str] = []
    token = ""
    while True:  # pages of 2 walk the same list in the same order, each id once
        page = client.list(page_size=2, page_token=token)
        assert 1 <= len(page.jobs) <= 2
        paged += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert paged == ids


def _scrape(trainer: ServiceProcess) -> dict[str, float]:
    import re
    import urllib.request

    port = int(re.search(r"metrics_port=(\d+)", trainer.output()).group(1))  # type: ignore[union-attr]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = re.findall(r"^(ferry_trainer_[^ ]+) (\S+)$", text, re.M)
    return {name: float(value) for name, value in samples}


def test_prometheus_metrics_count_jobs(trainer: ServiceProcess, client: SyncTrainerClient) -> None:
    before = _scrape(trainer)
    done = client.wait(client.submit(QUICK, name="metered").id, timeout=120)
    assert state_name(done) == "SUCCEEDED", done.error
    after = _scrape(trainer)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('ferry_trainer_jobs{state="SUCCEEDED"}') == 1
    assert delta('ferry_trainer_jobs_finished_total{state="SUCCEEDED"}') == 1
    assert delta("ferry_trainer_epoch_seconds_count") == QUICK["epochs"]


def test_the_exporter_tests_checkpoint_fixture_matches_a_real_job(
    client: SyncTrainerClient, store: Path, tmp_path: Path
) -> None:
    from ferry.core.store import Store
    from tests.unit.test_exporter_source import train_job

    real = client.wait(client.submit(QUICK, name="contract").id, timeout=120)
    assert state_name(real) == "SUCCEEDED", real.error
    real_final = store / "checkpoints" / real.id / "final"
    made_final = train_job(Store(tmp_path), "made", "mlp", steps=1)
    assert sorted(p.name for p in made_final.iterdir()) == sorted(p.name for p in real_final.iterdir())
    for name in ("spec.json", "metrics.json"):
        made, got = (json.loads((f / name).read_text()) for f in (made_final, real_final))
        assert set(made) == set(got), name
    assert set(json.loads((made_final / "metrics.json").read_text())["test"]) <= set(
        json.loads((real_final / "metrics.json").read_text())["test"]
    )
    made_record = json.loads((tmp_path / "jobs" / "made.json").read_text())
    real_record = record(store, real.id)
    assert set(made_record) <= set(real_record)
    assert set(made_record["spec"]) <= set(real_record["spec"]) | {"job", "input", "output", "classes"}
