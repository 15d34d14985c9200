"""Checkpoints in the store, the contract the exporter builds against (docs/training.md, Store layout).

    checkpoints/<job>/<tag>/weights.safetensors   the model's state_dict
    checkpoints/<job>/<tag>/spec.json             job, model entry, input, output, task, dataset, classes,
                                                  class_names (index -> name; empty when unnamed),
                                                  tokenizer (text jobs: kind, vocab_size, lowercase,
                                                  max_length)
    checkpoints/<job>/<tag>/metrics.json          epoch metrics (final: plus the test evaluation)
    checkpoints/<job>/<tag>/optimizer.safetensors optimizer tensors, to resume (epoch tags only)
    checkpoints/<job>/<tag>/state.json            optimizer scalars and loop state, to resume
    checkpoints/<job>/<tag>/tokenizer.json        text jobs: a copy of the job's tokenizer
    checkpoints/<job>/tokenizer.json              text jobs: the tokenizer, fitted once before training

The file names are defined once, in ``ferry.core.store.CheckpointFiles``. Tags are
``epoch-0001``, ``epoch-0002``... and ``final``. Nothing is pickled. A checkpoint
is written into a ``.staging-*`` folder, each file fsynced, and renamed into place (the
job folder fsynced after), so a reader (or a resume after SIGKILL) never sees half of one.
Rewriting an existing tag moves the old one to ``.staging-old-<tag>-<pid>`` first; a kill
between the two renames leaves the old one there, and ``remove_staging`` puts it back. A full
disk is RESOURCE_EXHAUSTED naming the store, with the staging folder removed.

A text job fits its tokenizer once (``prepare_tokenizer``, before any rank reads the data),
because fitting is not reproducible; a resume and every rank load that one file, and each tag
carries a copy, so exporting any tag finds the tokenizer its weights were trained with.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ferry.core.errors import DISK_FULL_ERRNOS, store_full_is_exhausted
from ferry.core.store import CheckpointFiles, fsync_dir, json_bytes, write_synced

FINAL = "final"
STAGING = ".staging-"
OLD = f"{STAGING}old-"  # a complete checkpoint moved aside while its tag is rewritten
SPEC_KEYS = ("model", "input", "output", "task", "dataset", "classes", "class_names", "tokenizer")


def prepare_tokenizer(job_dir: Path, spec: dict[str, Any], store_root: str | Path) -> Path | None:
    """The job's ``tokenizer.json``, fitted on the train split and written once (temporary, fsync,
    rename); a resume reuses the file. None for a job that is not text."""
    entry = spec.get("tokenizer")
    if not entry:
        return None
    path = job_dir / CheckpointFiles.TOKENIZER
    if path.is_file():
        return path
    from ferry.core.text import TokenizerConfig, fit_tokenizer
    from ferry.datasets import load_dataset

    data = load_dataset(spec["dataset"], store=store_root)
    config = TokenizerConfig(str(entry["kind"]), int(entry["vocab_size"]), bool(entry["lowercase"]))
    text = fit_tokenizer(data.texts_train, config).to_str()
    with store_full_is_exhausted(job_dir.parent.parent):
        job_dir.mkdir(parents=True, exist_ok=True)
        tmp = job_dir / f".{CheckpointFiles.TOKENIZER}.{os.getpid()}.tmp"
        try:
            write_synced(tmp, text.encode("utf-8"))
            os.replace(tmp, path)
            fsync_dir(job_dir)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return path


def epoch_tag(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def list_tags(job_dir: Path) -> list[str]:
    """Complete checkpoints of a job, epochs in order, ``final`` last."""
    if not job_dir.is_dir():
        return []
    epochs = sorted(p.name for p in job_dir.iterdir() if p.name.startswith("epoch-") and p.is_dir())
    return [*epochs, *([FINAL] if (job_dir / FINAL).is_dir() else [])]


def last_epoch_tag(job_dir: Path) -> str:
    epochs = [t for t in list_tags(job_dir) if t != FINAL]
    return epochs[-1] if epochs else ""


def remove_staging(job_dir: Path) -> None:
    """Drop half-written checkpoints a killed process left behind (call it when no job process
    writes there). An old checkpoint moved aside for a rewrite that never landed is put back."""
    if not job_dir.is_dir():
        return
    for p in sorted(job_dir.glob(f"{OLD}*")):
        tag = p.name[len(OLD) :].rpartition("-")[0]
        if tag and not (job_dir / tag).exists():
            os.rename(p, job_dir / tag)
    for p in job_dir.glob(f"{STAGING}*"):
        shutil.rmtree(p, ignore_errors=True)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            name = f"{idx}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    job_dir: Path,
    tag: str,
    model: torch.nn.Module,
    spec: dict[str, Any],
    metrics: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    loop_state: dict[str, Any] | None = None,
) -> Path:
    """Write one complete checkpoint and rename it into ``job_dir/tag``."""
    with store_full_is_exhausted(job_dir.parent.parent):  # checkpoints/<job>/ is in the store's root
        job_dir.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=job_dir, prefix=f"{STAGING}{tag}-"))
        try:
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            _save_tensors(weights, staged / CheckpointFiles.WEIGHTS)
            picked = {k: spec[k] for k in ("job", *SPEC_KEYS) if k in spec}
            write_synced(staged / CheckpointFiles.SPEC, json_bytes(picked))
            write_synced(staged / CheckpointFiles.METRICS, json_bytes(metrics))
            tokenizer = job_dir / CheckpointFiles.TOKENIZER
            if spec.get("tokenizer") and tokenizer.is_file():
                write_synced(staged / CheckpointFiles.TOKENIZER, tokenizer)
            if optimizer is not None:
                tensors, meta = _flatten_optimizer(optimizer.state_dict())
                _save_tensors(tensors, staged / CheckpointFiles.OPTIMIZER)
                state = {"optimizer": meta, "loop": loop_state or {}}
                write_synced(staged / CheckpointFiles.STATE, json_bytes(state))
            fsync_dir(staged)
            target = job_dir / tag
            trash = job_dir / f"{OLD}{tag}-{os.getpid()}"
            if target.exists():  # a resumed run rewrites the epoch it re-ran
                os.rename(target, trash)
            os.rename(staged, target)
            fsync_dir(job_dir)
            shutil.rmtree(trash, ignore_errors=True)
            return target
        except BaseException:
            with contextlib.suppress(OSError):
                shutil.rmtree(staged)
            raise


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, str(path))
    except Exception as err:  # SafetensorError carries the Rust io error's "(os error N)" in its text
        code = next((n for n in DISK_FULL_ERRNOS if f"(os error {n})" in str(err)), 0)
        if code:
            raise OSError(code, os.strerror(code), str(path)) from err
        raise
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / CheckpointFiles.WEIGHTS))


def load_resume(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer from an epoch checkpoint; returns the loop state."""
    model.load_state_dict(load_weights(folder))
    state = json.loads((folder / CheckpointFiles.STATE).read_text())
    tensors = load_file(str(folder / CheckpointFiles.OPTIMIZER))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    return dict(state["loop"])
