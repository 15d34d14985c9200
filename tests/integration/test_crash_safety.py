"""Crash-safe writes, proven with real processes: SIGKILL at random points never leaves a partial
checkpoint or version where a reader looks, and a store that fills up answers RESOURCE_EXHAUSTED
("the store at ... is full") with nothing partial left behind.

The kill loops are bounded (``MAX_KILLS`` kills or ``LOOP_BUDGET_S`` seconds each). After every
kill the store is read the way its readers read it (``list_tags`` for the trainer and the
exporter, ``Store.list_versions`` for the worker) and everything they would pick up is loaded:
safetensors and JSON parsed, ONNX loaded and opened in ONNX Runtime. Debris found on disk right
after a kill (a ``.staging-*`` folder) is a kill that landed inside a write; each loop prints
how many did.

The full-disk tests mount a small tmpfs (root, or CAP_SYS_ADMIN): they skip with the reason
where mounting is refused, and fail instead with CI set (tests/support/deps.py's policy).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ferry.client.exporter import SyncExporterClient
from ferry.client.trainer import SyncTrainerClient, state_name
from ferry.core.errors import FerryError, ResourceExhausted
from ferry.core.store import META_FILE, CheckpointFiles, Store
from services.trainer import checkpoints as ckpt
from tests.support.deps import in_ci, require_module
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.solo  # slow; its own servers: the file-order pass only

onnx = require_module("onnx")
ort = require_module("onnxruntime")
safetensors_torch = require_module("safetensors.torch")

MAX_KILLS = 5
LOOP_BUDGET_S = 35.0
TAG_RE = re.compile(r"^(epoch-\d{4,}|final)$")
SPEC = {
    "model": {"arch": "mlp", "params": {"hidden": [64]}},
    "dataset": {"name": "wine"},
    "epochs": 5000,
    "batch_size": 64,
    "seed": 1,
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def _wait_dead(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while pid and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid or not _alive(pid), f"process {pid} outlived its trainer"


def _debris(folder: Path) -> list[str]:
    return (
        sorted(p.name for p in folder.iterdir() if p.name.startswith(".staging-")) if folder.is_dir() else []
    )


def _start_trainer(store: Path, *flags: str) -> ServiceProcess:
    return ServiceProcess.serve(
        "trainer", "--store", str(store), "--port", "0", "--threads-per-job", "1", *flags
    ).start()


def _start_exporter(store: Path) -> ServiceProcess:
    return ServiceProcess.serve("exporter", "--store", str(store), "--port", "0").start()


def check_checkpoints(job_dir: Path) -> list[str]:
    """Every checkpoint a reader sees (``list_tags``) is whole: each file CheckpointFiles names is
    there and parses. Returns the tags."""
    tags = ckpt.list_tags(job_dir)
    for tag in tags:
        assert TAG_RE.match(tag), f"a reader would take {tag!r} for a checkpoint"
        folder = job_dir / tag
        weights = safetensors_torch.load_file(str(folder / CheckpointFiles.WEIGHTS))
        assert weights, f"{tag}: empty weights"
        spec = json.loads((folder / CheckpointFiles.SPEC).read_text())
        assert spec["model"]["arch"] == "mlp", tag
        json.loads((folder / CheckpointFiles.METRICS).read_text())
        if tag != ckpt.FINAL:
            safetensors_torch.load_file(str(folder / CheckpointFiles.OPTIMIZER))
            state = json.loads((folder / CheckpointFiles.STATE).read_text())
            assert state["loop"]["epoch"] == int(tag.removeprefix("epoch-")), tag
    return tags


def check_versions(store: Store) -> int:
    """Every version a worker would see (``Store.list_versions``) loads: onnx.load, an ORT
    session, meta.json and config.json parse. Returns how many there are."""
    seen = 0
    for model in store.list_models():
        versions = store.list_versions(model)
        if versions:
            assert store.read_config(model)["name"] == model
        for version in versions:
            path = store.model_file(model, version)
            onnx.checker.check_model(onnx.load(str(path)))
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            meta = json.loads((path.parent / META_FILE).read_text())
            assert meta["source"]["kind"] == "import"
            seen += 1
    return seen


def onnx_matmul(width: int, seed: int = 0) -> bytes:
    """A valid ONNX model (input [batch, width] @ a width x width float initializer) of about
    ``4 * width**2`` bytes, random so it does not compress."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((width, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


# --- SIGKILL loops -------------------------------------------------------------------------------


def test_sigkill_of_the_trainer_mid_checkpoint_leaves_only_whole_checkpoints(tmp_path: Path) -> None:
    store = tmp_path / "store"
    rng = random.Random(16)
    trainer = _start_trainer(store)
    kills, mid_write, restored = 0, 0, 0
    began = time.monotonic()
    try:
        with SyncTrainerClient(trainer.address) as client:
            job_id = client.submit(SPEC, name="crashy").id
        job_dir = store / "checkpoints" / job_id
        while kills < MAX_KILLS and time.monotonic() - began < LOOP_BUDGET_S:
            with SyncTrainerClient(trainer.address) as client:
                for event in client.watch(job_id, timeout=120):
                    if event.kind == "epoch":  # the job process is writing a checkpoint an epoch
                        break
                else:
                    raise AssertionError(f"the job ended: {client.get(job_id).error}")
            time.sleep(rng.uniform(0.0, 0.4))
            pid = json.loads((store / "jobs" / f"{job_id}.json").read_text())["pid"]
            trainer.signal(signal.SIGKILL)
            trainer.wait(10)
            _wait_dead(pid)  # PR_SET_PDEATHSIG: the job process dies with it, wherever it was
            kills += 1
            mid_write += bool(_debris(job_dir))
            restored += any(p.name.startswith(ckpt.OLD) for p in job_dir.iterdir())
            tags = check_checkpoints(job_dir)
            assert tags, "no complete checkpoint after the first epoch event"
            json.loads((store / "jobs" / f"{job_id}.json").read_text())  # the record is whole too
            trainer = _start_trainer(store)
            assert _debris(job_dir) == [], "a restarted trainer leaves a dead writer's staging folders"
            with SyncTrainerClient(trainer.address) as client:
                job = client.get(job_id)
                assert state_name(job) in ("QUEUED", "RUNNING"), job.error
                assert job.resumed_from in tags
        with SyncTrainerClient(trainer.address) as client:
            assert state_name(client.cancel(job_id)) == "CANCELLED"
        check_checkpoints(job_dir)
    finally:
        trainer.stop()
    print(
        f"\ntrainer kill loop: {kills} SIGKILLs in {time.monotonic() - began:.1f} s, {mid_write} inside "
        f"a checkpoint write (staging folder left), {restored} between a rewrite's renames; "
        "every visible checkpoint whole after each"
    )
    assert kills >= 3


def test_sigkill_of_the_exporter_mid_publish_leaves_only_whole_versions(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root)
    model = onnx_matmul(512)  # 1 MiB: copied and fsynced on every publish
    rng = random.Random(16)
    kills, mid_publish, published = 0, 0, 0
    began = time.monotonic()
    exporter = _start_exporter(root)
    try:
        while kills < MAX_KILLS and time.monotonic() - began < LOOP_BUDGET_S:
            done: list[int] = []
            stop = threading.Event()

            def importing(
                address: str = exporter.address, done: list[int] = done, stop: threading.Event = stop
            ) -> None:
                with SyncExporterClient(address) as client:
                    while not stop.is_set():
                        try:
                            done.append(client.import_onnx("crashy", model, source="kill-loop")[0])
                        except FerryError:
                            return  # the exporter is gone

            thread = threading.Thread(target=importing, daemon=True)
            thread.start()
            time.sleep(rng.uniform(0.05, 1.0))
            exporter.signal(signal.SIGKILL)
            exporter.wait(10)
            stop.set()
            thread.join(30)
            kills += 1
            published += len(done)
            mid_publish += bool(_debris(root / "models" / "crashy"))
            seen = check_versions(store)
            assert seen >= published, "a version the exporter answered for is gone"
            exporter = _start_exporter(root)
        with SyncExporterClient(exporter.address) as client:
            version = client.import_onnx("crashy", model)[0]
        assert version == max(store.list_versions("crashy"))
        assert _debris(root / "models" / "crashy") == [], "the next publish sweeps dead writers' staging"
        total = check_versions(store)
    finally:
        exporter.stop()
    print(
        f"\nexporter kill loop: {kills} SIGKILLs in {time.monotonic() - began:.1f} s, {mid_publish} inside "
        f"a publish (staging folder left), {published} imports answered, {total} versions all loadable"
    )
    assert kills >= 3


# --- a full store --------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "2m") -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        why = f"mounting a tmpfs needs root or CAP_SYS_ADMIN: {done.stderr.strip() or done.returncode}"
        if in_ci():
            pytest.fail(f"CI runs as root and must mount it: {why}", pytrace=False)
        pytest.skip(why)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``folder``'s file system."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(free - leave, 0))
    return filler


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _full_message(err: BaseException, store: Path) -> None:
    assert isinstance(err, ResourceExhausted), err
    assert f"the store at {store} is full" in err.message and "(ENOSPC)" in err.message, err.message


def npz(rows: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    body = io.BytesIO()
    np.savez(body, x=rng.standard_normal((rows, 16)).astype(np.float32), y=rng.integers(0, 3, rows))
    return body.getvalue()


def test_upload_into_a_full_store_is_resource_exhausted_and_keeps_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small") as disk:
        root = disk / "store"
        trainer = _start_trainer(root)
        try:
            before = files_under(disk)
            filler = fill(disk, leave=256 * 1024)
            data = npz(16 * 1024)  # 1.1 MiB
            with SyncTrainerClient(trainer.address) as client:
                with pytest.raises(ResourceExhausted) as caught:
                    client.upload_dataset("big", data, sha256=hashlib.sha256(data).hexdigest())
                _full_message(caught.value, root)
                assert files_under(disk) == before | {"filler"}, "a partial upload was left"
                filler.unlink()  # space freed: the same trainer takes the same upload
                result = client.upload_dataset("big", data)
                assert result.size_bytes == len(data)
            assert files_under(disk) == before | {"store/datasets/big.npz"}
            assert (root / "datasets" / "big.npz").read_bytes() == data
        finally:
            trainer.stop()


def test_import_into_a_full_store_is_resource_exhausted_and_publishes_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small") as disk:
        root = disk / "store"
        exporter = _start_exporter(root)
        try:
            model = onnx_matmul(384)  # 576 KiB
            with SyncExporterClient(exporter.address) as client:
                client.import_onnx("small", onnx_matmul(8))  # a version (and config) to keep
                before = files_under(disk)
                filler = fill(disk, leave=128 * 1024)
                with pytest.raises(ResourceExhausted) as caught:
                    client.import_onnx("small", model)
                _full_message(caught.value, root)
                assert files_under(disk) == before | {"filler"}, "a partial version was left"
                assert Store(root).list_versions("small") == [1]
                filler.unlink()
                assert client.import_onnx("small", model)[0] == 2
            assert check_versions(Store(root)) == 2
        finally:
            exporter.stop()


def test_checkpoint_into_a_full_store_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small") as disk:
        root = disk / "store"
        trainer = _start_trainer(root)
        try:
            fill(disk, leave=192 * 1024)
            big = {**SPEC, "model": {"arch": "mlp", "params": {"hidden": [2048]}}, "epochs": 3}
            with SyncTrainerClient(trainer.address) as client:  # weights + optimizer: 400 KiB
                job = client.wait(client.submit(big).id, timeout=120)
            assert state_name(job) == "FAILED"
            assert f"the store at {root} is full" in job.error and "(ENOSPC)" in job.error, job.error
            job_dir = root / "checkpoints" / job.id
            assert _debris(job_dir) == [] and ckpt.list_tags(job_dir) == []
        finally:
            trainer.stop()
