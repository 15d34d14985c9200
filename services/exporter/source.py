"""Read a finished training job back: its record, its model spec and its weights.

This is the exporter's side of the trainer contract: ``jobs/<job>.json`` says
whether the job finished, ``checkpoints/<job>/<tag>/`` holds ``spec.json``,
``weights.safetensors`` and ``metrics.json``, and for a text job ``tokenizer.json`` (the
tokenizer the weights were trained with, published beside ``model.onnx``). Weights load through
safetensors only; nothing from the store is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ferry.core.errors import FailedPrecondition, FerryError, NotFound
from ferry.core.jobstates import JobState
from ferry.core.store import CheckpointFiles, Store, validate_name
from ferry.zoo import build_model, check_factory

FINISHED = JobState.SUCCEEDED


@dataclass
class Checkpoint:
    """A finished job's rebuilt module and everything the report needs about where it came from."""

    job_id: str
    tag: str
    path: Path
    spec: dict[str, Any]
    module: Any  # the nn.Module, or a stand-in for one kept in another process (isolated.py)
    weights_sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)
    tokenizer: Path | None = None  # a text job's tokenizer.json in the checkpoint folder

    @property
    def max_length(self) -> int:
        """A text job's token limit (specials included); 0 when the job is not text."""
        entry = self.spec.get("tokenizer") or {}
        return int(entry.get("max_length", 0)) if isinstance(entry, dict) else 0

    @property
    def input(self) -> dict[str, Any]:
        return dict(self.spec["input"])

    @property
    def output(self) -> dict[str, Any]:
        return dict(self.spec["output"])

    @property
    def task(self) -> str:
        return str(self.spec.get("task", "classification"))

    @property
    def class_names(self) -> list[str]:
        """Names by class index, from the training data; empty when it named none."""
        return [str(n) for n in self.spec.get("class_names") or []]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FailedPrecondition(f"checkpoint is missing its {what}: {path} does not exist") from err
    except (OSError, ValueError) as err:
        raise FailedPrecondition(f"checkpoint {what} {path} is corrupt: {err}") from err


def job_state(store: Store, job_id: str) -> str:
    """The job's state; NOT_FOUND when the store has no such job."""
    validate_name(job_id, "job id")
    path = store.job_file(job_id)
    if not path.is_file():
        raise NotFound(f"job {job_id!r} not found in the store ({path})")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FailedPrecondition(f"job record {path} is unreadable: {err}") from err
    return str(record.get("state", "UNKNOWN")) if isinstance(record, dict) else "UNKNOWN"


def _check_spec(spec: Any, path: Path) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise FailedPrecondition(f"checkpoint spec {path} is corrupt: not a JSON object")
    for key in ("model", "input", "output"):
        if not isinstance(spec.get(key), dict):
            raise FailedPrecondition(f"checkpoint spec {path} is corrupt: no {key!r} object")
    inp, out = spec["input"], spec["output"]
    if inp.get("datatype", "FP32") not in ("FP32", "INT64"):
        raise FailedPrecondition(
            f"checkpoint spec {path}: input datatype {inp.get('datatype')!r} unsupported"
        )
    for part, what in ((inp, "input"), (out, "output")):
        shape = part.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and (d > 0 or d == -1) for d in shape):
            raise FailedPrecondition(f"checkpoint spec {path}: {what} shape {shape!r} is not a list of dims")
    return spec


def load_checkpoint(
    store: Store, job_id: str, tag: str = "final", allowed_factories: Sequence[str] = (), build: bool = True
) -> Checkpoint:
    """Rebuild a finished job's module from its checkpoint, in eval mode.

    NOT_FOUND for an unknown job, FAILED_PRECONDITION for an unfinished one or a
    checkpoint that is missing or corrupt (the message names the path), PERMISSION_DENIED
    for a factory model outside ``allowed_factories`` (nothing is imported then). With
    ``build=False`` the module is not rebuilt (``module`` is None): everything else is checked.
    """
    state = job_state(store, job_id)
    if state != FINISHED:
        raise FailedPrecondition(
            f"job {job_id!r} is {state}, not {FINISHED}: only a finished job can be exported"
        )
    folder = store.checkpoint_dir(job_id, validate_name(tag, "checkpoint tag"))
    if not folder.is_dir():
        raise FailedPrecondition(f"job {job_id!r} has no checkpoint: {folder} does not exist")
    spec_path = folder / CheckpointFiles.SPEC
    spec = _check_spec(_read_json(spec_path, "spec"), spec_path)
    weights = folder / CheckpointFiles.WEIGHTS
    if not weights.is_file():
        raise FailedPrecondition(f"checkpoint is missing its weights: {weights} does not exist")
    metrics_path = folder / CheckpointFiles.METRICS
    metrics = _read_json(metrics_path, "metrics") if metrics_path.is_file() else {}
    tokenizer = folder / CheckpointFiles.TOKENIZER
    if spec.get("tokenizer") and not tokenizer.is_file():
        raise FailedPrecondition(
            f"checkpoint of text job {job_id!r} is missing its tokenizer: {tokenizer} does not exist"
        )
    if "factory" in spec["model"]:
        check_factory(str(spec["model"]["factory"]), allowed_factories)
    raw = weights.read_bytes()
    module = _rebuild(spec, spec_path, weights, raw, allowed_factories) if build else None
    return Checkpoint(
        job_id=job_id,
        tag=tag,
        path=folder,
        spec=spec,
        module=module,
        weights_sha256=hashlib.sha256(raw).hexdigest(),
        metrics=metrics if isinstance(metrics, dict) else {},
        tokenizer=tokenizer if spec.get("tokenizer") else None,
    )


def _rebuild(
    spec: dict[str, Any], spec_path: Path, weights: Path, raw: bytes, allowed_factories: Sequence[str]
) -> nn.Module:
    try:
        module = build_model(spec["model"], allowed_factories)
    except FerryError as err:
        raise FailedPrecondition(f"checkpoint spec {spec_path}: {err.message}") from err
    try:
        from safetensors.torch import load as load_safetensors

        state_dict = load_safetensors(raw)
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise FailedPrecondition(f"checkpoint weights {weights} are corrupt: {err}") from err
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise FailedPrecondition(f"checkpoint weights {weights} do not fit the model spec: {first}") from err
    module.eval()
    return module


def vocab_size(spec: dict[str, Any]) -> int | None:
    """Token-id range of a text model: its embedding size, else its dataset's vocabulary."""
    params = spec.get("model", {}).get("params", {})
    for key in ("vocab_size", "vocab", "num_embeddings"):
        if isinstance(params.get(key), int):
            return int(params[key])
    dataset = spec.get("dataset") or {}
    vocab = (dataset.get("params") or {}).get("vocab") if isinstance(dataset, dict) else None
    return int(vocab) if isinstance(vocab, int) else None
