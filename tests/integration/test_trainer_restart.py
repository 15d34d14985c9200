"""Jobs survive the trainer: a SIGKILLed trainer's job resumes from its last checkpoint on restart
(or is marked FAILED when resuming is off), and a restarted trainer reports every job it knew."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from ferry.client.trainer import SyncTrainerClient, state_name
from tests.support.deps import require_module
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.solo  # slow; its own servers: the file-order pass only

torch = require_module("torch")
safetensors_torch = require_module("safetensors.torch")

SPEC = {
    "model": {"arch": "mlp", "params": {"hidden": [32]}},
    "dataset": {"name": "wine"},
    "epochs": 60,
    "batch_size": 4,
    "seed": 3,
}


def start(store: Path, *flags: str) -> ServiceProcess:
    return ServiceProcess.serve(
        "trainer", "--store", str(store), "--port", "0", "--threads-per-job", "1", *flags
    ).start()


def kill_trainer_mid_job(store: Path, trainer: ServiceProcess) -> tuple[str, int]:
    """Submit SPEC, let it write two epoch checkpoints, SIGKILL the trainer; returns (job, runner pid)."""
    with SyncTrainerClient(trainer.address) as client:
        job_id = client.submit(SPEC, name="survivor").id
        for event in client.watch(job_id, timeout=240):
            if event.kind == "epoch" and event.job.progress.epoch >= 2:
                break
        else:
            raise AssertionError("the job ended before its second epoch")
    pid = json.loads((store / "jobs" / f"{job_id}.json").read_text())["pid"]
    trainer.signal(signal.SIGKILL)
    trainer.wait(10)
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:  # the runner dies with its trainer
        time.sleep(0.1)
    assert not _alive(pid), "the job process outlived its trainer"
    return job_id, pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def test_restarted_trainer_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    store = tmp_path / "store"
    job_id, _ = kill_trainer_mid_job(store, start(store))
    assert json.loads((store / "jobs" / f"{job_id}.json").read_text())["state"] == "RUNNING"
    trainer = start(store)
    try:
        with SyncTrainerClient(trainer.address) as client:
            assert [j.id for j in client.list().jobs] == [job_id]
            job = client.wait(job_id, timeout=240)
            assert state_name(job) == "SUCCEEDED", job.error
            assert job.attempts == 2
            assert job.resumed_from.startswith("epoch-") and job.resumed_from >= "epoch-0002"
            assert job.checkpoints[-1] == "final" and len(job.checkpoints) == SPEC["epochs"] + 1
            # Resuming repeats the lost epochs exactly: same weights as a run never interrupted.
            twin = client.wait(client.submit(SPEC).id, timeout=240)
            assert state_name(twin) == "SUCCEEDED"
        weights = [
            safetensors_torch.load_file(str(store / "checkpoints" / j / "final" / "weights.safetensors"))
            for j in (job_id, twin.id)
        ]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    finally:
        trainer.stop()


def test_restarted_trainer_marks_interrupted_job_failed_when_resume_is_off(tmp_path: Path) -> None:
    store = tmp_path / "store"
    job_id, _ = kill_trainer_mid_job(store, start(store))
    trainer = start(store, "--no-resume-interrupted")
    try:
        with SyncTrainerClient(trainer.address) as client:
            job = client.get(job_id)
            assert state_name(job) == "FAILED"
            assert (
                job.error == "interrupted: the trainer stopped while the job ran (resume_interrupted is off)"
            )
            assert job.checkpoints and job.checkpoints[0] == "epoch-0001" and "final" not in job.checkpoints
    finally:
        trainer.stop()


def test_second_trainer_on_the_same_store_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = start(store)
    try:
        with pytest.raises(RuntimeError) as caught:
            start(store)
        assert f"error: FAILED_PRECONDITION: another trainer is running on the store {store}" in str(
            caught.value
        )
    finally:
        first.stop()


def test_sigterm_ends_watches_with_unavailable_and_the_job_resumes(tmp_path: Path) -> None:
    from ferry.core.errors import Unavailable

    store = tmp_path / "store"
    trainer = start(store)
    with SyncTrainerClient(trainer.address) as client:
        job_id = client.submit({**SPEC, "epochs": 100_000}, name="long").id
        events = client.watch(job_id, timeout=240)
        for event in events:
            if event.kind == "epoch":
                break
        trainer.signal(signal.SIGTERM)
        with pytest.raises(Unavailable) as caught:
            for _ in events:
                pass
        assert caught.value.message == "the trainer is shutting down; watch the job again on its restart"
    assert trainer.wait(30) == 0
    trainer = start(store)
    try:
        with SyncTrainerClient(trainer.address) as client:
            job = client.get(job_id)
            assert state_name(job) in ("QUEUED", "RUNNING") and job.resumed_from.startswith("epoch-")
            assert state_name(client.cancel(job_id)) == "CANCELLED"
    finally:
        trainer.stop()
