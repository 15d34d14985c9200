"""The typed job record: its file round trip, the files older trainers wrote, its state vocabulary."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from ferry._proto.ferry.v1 import trainer_pb2 as pb
from ferry.core.store import Store, atomic_write_json
from services.trainer.jobs import JobManager
from services.trainer.records import TERMINAL, JobRecord, JobState, Progress
from services.trainer.servicer import job_to_proto
from services.trainer.settings import TrainerSettings

SPEC: dict[str, Any] = {"model": {"arch": "mlp", "params": {}}, "dataset": {"name": "iris"}, "epochs": 3}


def legacy_new(job_id: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The record ``records.new_record`` built when records were plain dicts."""
    return {
        "id": job_id,
        "name": name,
        "state": "QUEUED",
        "spec": spec,
        "progress": {"epoch": 0, "epochs": spec["epochs"], "metrics": {}},
        "error": "",
        "created_ms": 1_700_000_000_000,
        "started_ms": 0,
        "finished_ms": 0,
        "checkpoints": [],
        "test_metrics": {},
        "history": [],
        "attempts": 0,
        "resumed_from": "",
        "pid": 0,
    }


def legacy_finished() -> dict[str, Any]:
    """A dict record as the old manager left it after a run: owner, world, device, live progress."""
    record = legacy_new("iris-0123456789", "iris", SPEC)
    record["owner"] = "alice"
    record.update(world=1, device="cpu")
    record["progress"].update(
        epoch=3, epochs=3, step=10, loss=0.25, samples_per_second=1234.5, eta_seconds=0.0, steps_per_epoch=10
    )
    record["progress"]["metrics"] = {"lr": 0.001, "train_loss": 0.25, "val_accuracy": 0.9}
    record["history"] = [{"epoch": e, "lr": 0.001, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    record.update(state="SUCCEEDED", error="", started_ms=1_700_000_000_100, finished_ms=1_700_000_009_000)
    record.update(checkpoints=["epoch-1", "epoch-2", "epoch-3", "final"], attempts=1, pid=0)
    record["test_metrics"] = {"test_accuracy": 0.93, "test_loss": 0.2}
    return record


def file_bytes(value: Any) -> bytes:
    """What ``atomic_write_json`` writes for ``value``."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


# --- round trip -------------------------------------------------------------------------------


def test_new_record_round_trips_and_matches_the_old_shape() -> None:
    record = JobRecord.new("iris-0123456789", "iris", SPEC)
    assert record.state is JobState.QUEUED and record.progress == Progress(epoch=0, epochs=3)
    assert JobRecord.from_json(record.to_json()) == record
    old = legacy_new("iris-0123456789", "iris", SPEC)
    old["created_ms"] = record.created_ms
    assert record.to_json() == old
    assert file_bytes(record.to_json()) == file_bytes(old)


def test_full_record_round_trips_through_its_file_text() -> None:
    record = JobRecord.from_json(legacy_finished())
    assert JobRecord.from_json(json.loads(file_bytes(record.to_json()))) == record
    assert JobRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "old",
    [
        legacy_new("j-1", "", SPEC),
        {**legacy_new("j-2", "n", SPEC), "owner": "-"},
        legacy_finished(),
        # rank 0 under torchrun: no owner, world but no device
        {**legacy_new("j-3", "j-3", SPEC), "state": "RUNNING", "attempts": 1, "pid": 42, "world": 2},
    ],
    ids=["new", "submitted", "finished", "torchrun"],
)
def test_a_file_the_dict_code_wrote_loads_and_is_written_back_unchanged(old: dict[str, Any]) -> None:
    text = file_bytes(old)
    record = JobRecord.from_json(json.loads(text))
    assert (record.id, record.state, record.spec) == (old["id"], old["state"], old["spec"])
    assert record.owner == old.get("owner") and record.world == old.get("world")
    assert record.to_json() == old
    assert file_bytes(record.to_json()) == text


def test_the_typed_fields_read_from_an_old_file() -> None:
    record = JobRecord.from_json(legacy_finished())
    assert record.state is JobState.SUCCEEDED and record.terminal
    assert (record.owner, record.world, record.device) == ("alice", 1, "cpu")
    assert record.progress.epoch == 3 and record.progress.steps_per_epoch == 10
    assert record.progress.metrics["val_accuracy"] == 0.9
    assert record.checkpoints[-1] == "final" and record.test_metrics["test_accuracy"] == 0.93
    assert record.extra == {} and record.progress.extra == {}


def test_keys_this_version_does_not_know_are_kept() -> None:
    old = legacy_finished()
    old["future"] = {"a": [1, 2]}
    old["progress"]["future_rate"] = 7
    record = JobRecord.from_json(old)
    assert record.extra == {"future": {"a": [1, 2]}} and record.progress.extra == {"future_rate": 7}
    assert record.to_json() == old


def test_a_sparse_record_takes_the_defaults_the_servicer_used() -> None:
    record = JobRecord.from_json({"id": "j", "state": "FAILED", "spec": {}})
    assert (record.name, record.error, record.attempts, record.owner) == ("", "", 0, None)
    assert record.progress == Progress()
    job = job_to_proto(record)
    assert job.state == pb.TRAIN_JOB_STATE_FAILED and job.progress.epochs == 0 and job.spec_json == "{}"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"state": "QUEUED", "spec": {}}, KeyError),
        ({"id": "j", "spec": {}}, KeyError),
        ({"id": "j", "state": "QUEUED"}, KeyError),
        ({"id": "j", "state": "PAUSED", "spec": {}}, ValueError),
        ({"id": "j", "state": "QUEUED", "spec": []}, ValueError),
        ({"id": "j", "state": "QUEUED", "spec": {}, "progress": 3}, ValueError),
        ([1, 2], ValueError),
    ],
)
def test_a_broken_record_is_refused(data: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        JobRecord.from_json(data)


def test_to_json_does_not_share_the_record_lists() -> None:
    record = JobRecord.from_json(legacy_finished())
    out = record.to_json()
    out["checkpoints"].append("x")
    out["progress"]["metrics"]["x"] = 1.0
    assert "x" not in record.checkpoints and "x" not in record.progress.metrics
    assert copy.deepcopy(record) == record


# --- states: one vocabulary, the proto's ------------------------------------------------------


def test_the_states_are_the_proto_enum() -> None:
    proto = {n.removeprefix("TRAIN_JOB_STATE_") for n, _ in pb.TrainJobState.items()} - {"UNSPECIFIED"}
    assert {s.value for s in JobState} == proto
    for state in JobState:
        assert pb.TrainJobState.Name(state.to_proto()) == f"TRAIN_JOB_STATE_{state}"
        assert JobState.from_proto(state.to_proto()) is state
    assert set(TERMINAL) == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


@pytest.mark.parametrize(
    ("value", "name"), [(pb.TRAIN_JOB_STATE_UNSPECIFIED, "TRAIN_JOB_STATE_UNSPECIFIED"), (99, "99")]
)
def test_a_state_outside_the_vocabulary_is_refused(value: int, name: str) -> None:
    with pytest.raises(ValueError, match=f"^unknown job state '{name}'$"):
        JobState.from_proto(value)


def test_job_to_proto_encodes_every_field() -> None:
    record = JobRecord.from_json(legacy_finished())
    job = job_to_proto(record)
    assert (job.id, job.name, job.state) == (record.id, "iris", pb.TRAIN_JOB_STATE_SUCCEEDED)
    assert json.loads(job.spec_json) == SPEC
    assert (job.progress.epoch, job.progress.steps_per_epoch, job.progress.loss) == (3, 10, 0.25)
    assert dict(job.progress.metrics) == record.progress.metrics
    assert list(job.checkpoints) == record.checkpoints and dict(job.test_metrics) == record.test_metrics
    assert (job.created_ms, job.finished_ms, job.attempts) == (record.created_ms, record.finished_ms, 1)


# --- the manager reads and writes the same files ----------------------------------------------


def test_the_manager_loads_old_files_and_rewrites_them_byte_for_byte(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    old = legacy_finished()
    atomic_write_json(store.job_file(old["id"]), old)
    (store.jobs_dir / "broken.json").write_text("[1, 2]")
    before = store.job_file(old["id"]).read_bytes()

    async def main() -> None:
        manager = JobManager(store, TrainerSettings(store=str(store.root)))
        await manager.start()
        try:
            record = manager.get(old["id"])
            assert isinstance(record, JobRecord) and record.state is JobState.SUCCEEDED
            assert list(manager.jobs) == [old["id"]]
            page, token = manager.list([JobState.SUCCEEDED], 0, "")
            assert page == [record] and token == ""
            assert manager.list([JobState.QUEUED], 0, "") == ([], "")
            manager._save(record)
        finally:
            await manager.stop()
            manager._lock.close()

    asyncio.run(main())
    assert store.job_file(old["id"]).read_bytes() == before
