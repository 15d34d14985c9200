"""The model store: one folder that every service shares, laid out like Triton's.

    models/<model>/config.json            serving config (see ferry.core.modelconfig)
    models/<model>/<version>/model.onnx   versions are positive integers
    models/<model>/<version>/meta.json    lineage and the exporter's report
    checkpoints/<job>/<tag>/...           weights.safetensors, spec.json, metrics.json (CheckpointFiles)
    jobs/<job>.json                       job records
    datasets/<name>.npz                   uploaded datasets

Every write lands beside its target and is renamed into place, so a reader sees
the old file or the new one, never half of one. A version folder appears in one
rename of a complete staging folder (``.staging-*``, see ``Store.publish_version``),
which is why a worker that scans during an export never loads a partial version. Files are
fsynced before their rename and folders after it. What a killed writer leaves (staging folders,
``.*.tmp`` files) no reader takes for data; the next publish of that model sweeps its debris.
A write that finds the disk full (ENOSPC, EDQUOT) is RESOURCE_EXHAUSTED naming the store
(``ferry.core.errors.store_full``), and nothing partial stays. Names that become paths
are validated before they touch the file system.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from ferry.core.classify import LABELS_FILE
from ferry.core.errors import InvalidArgument, NotFound, store_full_is_exhausted
from ferry.core.text import TOKENIZER_FILE

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
STAGING_PREFIX = ".staging-"  # a version being written; never a version to any reader


class CheckpointFiles:
    """File names inside a checkpoint folder (``checkpoints/<job>/<tag>/``): the trainer writes
    them, the exporter reads them back."""

    WEIGHTS: Final = "weights.safetensors"  # the model's state_dict
    SPEC: Final = "spec.json"  # job, model, input, output, task, dataset, classes, class_names, tokenizer
    METRICS: Final = "metrics.json"  # epoch metrics (final: plus the test evaluation)
    OPTIMIZER: Final = "optimizer.safetensors"  # optimizer tensors, to resume (epoch tags only)
    STATE: Final = "state.json"  # optimizer scalars and loop state, to resume
    # A text job's tokenizer (ferry.core.text.TOKENIZER_FILE), fitted once per job: the job folder
    # holds it (checkpoints/<job>/tokenizer.json) and every tag a copy, the one an export publishes.
    TOKENIZER: Final = "tokenizer.json"


def weight_bytes(version_dir: Path) -> int:
    """The bytes of a version's graph and weights: ``model.onnx`` and its external data.

    That is every file in the folder but the sidecars that ride along (meta, labels, tokenizer):
    the exporter and ImportOnnx publish nothing else, and an imported model's data files may
    have any name its tensors give them, so no name pattern would find them all.
    """
    sidecars = {META_FILE, LABELS_FILE, TOKENIZER_FILE}
    return sum(
        p.stat().st_size
        for p in version_dir.rglob("*")
        if p.is_file() and not p.is_symlink() and p.relative_to(version_dir).as_posix() not in sidecars
    )


def validate_name(name: str, what: str = "name") -> str:
    """Reject anything that could escape its folder or surprise a shell."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidArgument(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '_', '-', '.', starting with a letter "
            "or digit, no path separators and no '..'"
        )
    return name


def fsync_dir(folder: Path) -> None:
    """Make the renames and new names in ``folder`` durable, not only the files' data."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, source: Path | bytes) -> None:
    """Write a new file inside a staging folder (the bytes, or a copy of ``source``) and fsync it,
    so the folder's rename into place publishes data that is on disk."""
    if isinstance(source, bytes):
        with open(path, "wb") as out:
            out.write(source)
            out.flush()
            os.fsync(out.fileno())
        return
    shutil.copyfile(source, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_folder(fd: int, wait: bool) -> bool:
    """flock a staging folder (open as ``fd``): True when held. A file system without flock on
    folders (some network mounts) answers False, and the folder is then never swept."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: someone holds it
        return False
    return True


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, *, root: Path | None = None) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file: a temporary name
    beside it, fsync, rename, fsync of the folder. The file is new (mkstemp makes it 0600);
    ``mode`` sets its permissions exactly, whatever the umask, while it is still empty. A full
    disk is RESOURCE_EXHAUSTED naming ``root`` (default: the file's folder)."""
    with store_full_is_exhausted(root or path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                if mode is not None:
                    os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: Path, value: Any, *, root: Path | None = None) -> None:
    atomic_write_bytes(path, json_bytes(value), root=root)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class Store:
    """A local model store rooted at ``root`` (created on first use).

    ``create=False`` is for readers on a read-only mount (workers on a cluster): nothing is
    created, and a store whose folders do not exist yet reads as empty instead of failing with
    EROFS, so its models can appear later.
    """

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self.models_dir = self.root / "models"
        self.checkpoints_dir = self.root / "checkpoints"
        self.jobs_dir = self.root / "jobs"
        self.datasets_dir = self.root / "datasets"
        if create:
            for folder in (self.models_dir, self.checkpoints_dir, self.jobs_dir, self.datasets_dir):
                folder.mkdir(parents=True, exist_ok=True)

    # --- models -------------------------------------------------------------------------------

    def model_dir(self, model: str) -> Path:
        return self.models_dir / validate_name(model, "model name")

    def version_dir(self, model: str, version: int) -> Path:
        if version < 1:
            raise InvalidArgument(f"invalid version {version}: versions are positive integers")
        return self.model_dir(model) / str(version)

    def list_models(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def list_versions(self, model: str) -> list[int]:
        """Published versions: integer folders holding a model file (staging folders never match)."""
        folder = self.model_dir(model)
        if not folder.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in folder.iterdir()
            if p.name.isdigit() and int(p.name) > 0 and (p / MODEL_FILE).is_file()
        )

    def model_file(self, model: str, version: int) -> Path:
        path = self.version_dir(model, version) / MODEL_FILE
        if not path.is_file():
            raise NotFound(f"model {model!r} has no version {version} in the store")
        return path

    def read_config(self, model: str) -> dict[str, Any] | None:
        path = self.model_dir(model) / CONFIG_FILE
        return read_json(path) if path.is_file() else None

    def write_config(self, model: str, config: dict[str, Any]) -> None:
        atomic_write_json(self.model_dir(model) / CONFIG_FILE, config, root=self.root)

    def read_meta(self, model: str, version: int) -> dict[str, Any] | None:
        path = self.version_dir(model, version) / META_FILE
        return read_json(path) if path.is_file() else None

    @contextlib.contextmanager
    def _model_lock(self, model: str) -> Iterator[None]:
        folder = self.model_dir(model)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def publish_version(
        self,
        model: str,
        files: Mapping[str, Path | bytes],
        meta: Mapping[str, Any],
        config: dict[str, Any] | None = None,
    ) -> int:
        """Publish ``files`` and ``meta`` as the next version of ``model``; returns the version.

        ``files`` maps a file name in the version folder to the file to copy there or the bytes
        to write; it must hold ``model.onnx``, and ``meta`` becomes ``meta.json``. Everything is
        staged in a private ``.staging-*`` folder (removed again if anything fails) that becomes
        the version in one rename, so a worker never sees half a version. The model lock
        serialises concurrent publishers of one model so each gets its own number; ``config``
        (when given) is written under it before the version appears, so a worker that sees the
        version also sees its serving config.
        """
        if MODEL_FILE not in files:
            raise InvalidArgument(f"a version needs a {MODEL_FILE}; got {sorted(files)}")
        for name in files:
            validate_name(name, "file name")
            if name == META_FILE:
                raise InvalidArgument(f"{META_FILE} is written from meta, not passed as a file")
        folder = self.model_dir(model)
        with store_full_is_exhausted(self.root):
            folder.mkdir(parents=True, exist_ok=True)
            with self._model_lock(model):  # a sweeper never sees it before its owner's lock
                self._sweep_staging(folder)
                staged = Path(tempfile.mkdtemp(dir=folder, prefix=STAGING_PREFIX))
                held = os.open(staged, os.O_RDONLY | os.O_DIRECTORY)
                _lock_folder(held, wait=True)  # released by the kernel when this process dies
            try:
                for name, source in files.items():
                    write_synced(staged / name, source)
                write_synced(staged / META_FILE, json_bytes(meta))
                fsync_dir(staged)
                with self._model_lock(model):
                    if config is not None:
                        self.write_config(model, config)
                    taken = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
                    version = max(taken, default=0) + 1
                    os.rename(staged, folder / str(version))
                    fsync_dir(folder)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            finally:
                os.close(held)
        return version

    @staticmethod
    def _sweep_staging(folder: Path) -> None:
        """Remove what killed publishers left in a model's folder (called under its lock): staging
        folders whose writer's lock is gone, half-deleted versions, config temporaries. Readers
        ignore all of them anyway; this only gives the space back."""
        for p in folder.iterdir():
            if p.name.startswith(STAGING_PREFIX):
                fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    dead = _lock_folder(fd, wait=False)  # a live publisher still holds its own
                finally:
                    os.close(fd)
                if dead:
                    shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".deleting-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(f".{CONFIG_FILE}.") and p.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def delete_version(self, model: str, version: int) -> None:
        path = self.version_dir(model, version)
        if not path.is_dir():
            raise NotFound(f"model {model!r} has no version {version} in the store")
        with self._model_lock(model):
            trash = path.with_name(f".deleting-{version}")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # --- jobs, checkpoints, datasets ----------------------------------------------------------

    def job_file(self, job_id: str) -> Path:
        return self.jobs_dir / f"{validate_name(job_id, 'job id')}.json"

    def checkpoint_dir(self, job_id: str, tag: str = "final") -> Path:
        return self.checkpoints_dir / validate_name(job_id, "job id") / validate_name(tag, "checkpoint tag")

    def dataset_file(self, name: str) -> Path:
        return self.datasets_dir / validate_name(name, "dataset name")
