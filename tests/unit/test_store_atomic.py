"""The store's write paths in one process: a full disk's one message, readers that ignore staging
names, and debris from a killed writer swept only when its writer is gone.

The real crashes and a real full disk are in tests/integration/test_crash_safety.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
import torch

from ferry.core.errors import ResourceExhausted, store_full, store_full_is_exhausted
from ferry.core.store import MODEL_FILE, Store
from services.trainer import checkpoints as ckpt
from services.trainer.uploads import _sweep


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_or_quota_is_resource_exhausted_naming_the_store(code: int) -> None:
    err = store_full(OSError(code, os.strerror(code), "/s/x"), Path("/s"))
    assert isinstance(err, ResourceExhausted)
    assert err.message == (
        f"the store at /s is full: {os.strerror(code)} ({errno.errorcode[code]}); "
        "nothing was kept, free space and retry"
    )


def test_other_errors_pass_through_unchanged() -> None:
    assert store_full(OSError(errno.EACCES, "denied"), "/s") is None
    assert store_full(ValueError("no"), "/s") is None
    with pytest.raises(PermissionError), store_full_is_exhausted("/s"):
        raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(ResourceExhausted) as caught, store_full_is_exhausted("/s"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(caught.value.__cause__, OSError)


def test_readers_never_take_staging_or_half_deleted_folders_for_versions(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = store.model_dir("m")
    for name in (".staging-abc", ".deleting-2", "3"):  # "3" has no model file yet
        (folder / name).mkdir(parents=True)
    (folder / ".staging-abc" / MODEL_FILE).write_bytes(b"x")
    (folder / ".deleting-2" / MODEL_FILE).write_bytes(b"x")
    assert store.list_versions("m") == []
    assert store.list_models() == ["m"]


def test_a_publish_sweeps_dead_writers_debris_but_not_a_live_writers(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = store.model_dir("m")
    dead, live = folder / ".staging-dead", folder / ".staging-live"
    for path in (dead, live, folder / ".deleting-1"):
        path.mkdir(parents=True)
        (path / MODEL_FILE).write_bytes(b"half")
    (folder / ".config.json.x1.tmp").write_text("{")
    held = os.open(live, os.O_RDONLY | os.O_DIRECTORY)  # a publisher still writing
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        assert store.publish_version("m", {MODEL_FILE: b"onnx"}, {"k": 1}) == 1
        assert sorted(p.name for p in folder.iterdir()) == [".lock", ".staging-live", "1"]
    finally:
        os.close(held)
    assert store.publish_version("m", {MODEL_FILE: b"onnx"}, {"k": 2}) == 2
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "1", "2"]


def test_a_failed_publish_leaves_no_staging_folder(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(FileNotFoundError):
        store.publish_version("m", {MODEL_FILE: tmp_path / "missing.onnx"}, {})
    assert [p.name for p in store.model_dir("m").iterdir()] == [".lock"]


def _save(job_dir: Path, tag: str, value: float) -> None:
    model = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(model.weight, value)
    spec = {"job": "j", "model": {"arch": "mlp"}}
    ckpt.save_checkpoint(job_dir, tag, model, spec, {"epoch": {}}, torch.optim.SGD(model.parameters()), {})


def test_a_rewrite_interrupted_between_its_renames_gets_the_old_checkpoint_back(tmp_path: Path) -> None:
    job_dir = tmp_path / "checkpoints" / "j"
    _save(job_dir, "epoch-0001", 1.0)
    _save(job_dir, "epoch-0001", 2.0)  # a rewrite: replaced, nothing left beside it
    assert sorted(p.name for p in job_dir.iterdir()) == ["epoch-0001"]
    assert ckpt.load_weights(job_dir / "epoch-0001")["weight"].flatten().tolist() == [2.0, 2.0]
    # A kill after the old one moved aside and before the new one landed, plus a half-written one:
    os.rename(job_dir / "epoch-0001", job_dir / f"{ckpt.OLD}epoch-0001-4242")
    (job_dir / ".staging-epoch-0001-abc").mkdir()
    assert ckpt.list_tags(job_dir) == []
    ckpt.remove_staging(job_dir)
    assert sorted(p.name for p in job_dir.iterdir()) == ["epoch-0001"]
    assert ckpt.load_weights(job_dir / "epoch-0001")["weight"].flatten().tolist() == [2.0, 2.0]
    # Killed while the old one was being removed: the new one is there, the old one goes.
    _save(job_dir, "epoch-0002", 3.0)
    (job_dir / f"{ckpt.OLD}epoch-0002-4242").mkdir()
    ckpt.remove_staging(job_dir)
    assert ckpt.list_tags(job_dir) == ["epoch-0001", "epoch-0002"]
    assert ckpt.load_weights(job_dir / "epoch-0002")["weight"].flatten().tolist() == [3.0, 3.0]


def test_the_upload_sweep_removes_dead_temporaries_only(tmp_path: Path) -> None:
    dead, live = tmp_path / ".upload-dead.tmp", tmp_path / ".upload-live.tmp"
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    keep = tmp_path / "kept.npz"
    keep.write_bytes(b"data")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        _sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".upload-live.tmp", "kept.npz"]
