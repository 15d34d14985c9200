"""Finished-job checkpoints made by really training zoo models, and the exporter's checkpoint reader.

``train_job`` makes a finished job quickly: a few real optimiser steps on real data,
the checkpoint written by the trainer's own ``save_checkpoint`` and a minimal
``jobs/<job>.json`` (``tests/integration/test_trainer.py`` checks both key for key
against a real trainer job). The integration tests use it too. The factories below are user
models named by ``spec.json`` (``tests.unit.test_exporter_source:...``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ferry.core.errors import FailedPrecondition, NotFound, PermissionDenied
from ferry.core.store import Store, atomic_write_json
from ferry.datasets import load_dataset
from ferry.zoo import build_model
from services.exporter.source import load_checkpoint
from services.trainer.checkpoints import FINAL, save_checkpoint

HERE = "tests.unit.test_exporter_source"
ALLOWED = ("tests",)  # the factories these tests train live here


class TinyRegressor(nn.Module):
    """A user factory model: two linear layers with a tanh, regression head."""

    def __init__(self, features: int = 6, outputs: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TwoFaced(nn.Module):
    """Computes one thing in eager mode and another while being exported: parity must catch it."""

    def __init__(self, features: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(x)
        if torch.onnx.is_in_onnx_export():
            return y + 0.5
        return y


class Eigen(nn.Module):
    """Uses an operator the ONNX converter has no mapping for."""

    def __init__(self, features: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(features, classes * classes)
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.head(x).reshape(-1, self.classes, self.classes)
        return torch.linalg.eigvals(m).real


def make_regressor(features: int = 6, outputs: int = 2) -> nn.Module:
    return TinyRegressor(features, outputs)


def make_gated(features: int = 6, outputs: int = 2, gate: str = "") -> nn.Module:
    """A regressor whose building waits while the file ``gate`` exists (a minute at most): a
    test holds an export inside its load stage for as long as it needs, without a timer."""
    deadline = time.monotonic() + 60
    while gate and Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return TinyRegressor(features, outputs)


def make_two_faced(features: int = 6, classes: int = 3) -> nn.Module:
    return TwoFaced(features, classes)


def make_eigen(features: int = 6, classes: int = 3) -> nn.Module:
    return Eigen(features, classes)


KINDS: dict[str, dict[str, Any]] = {
    "mlp": {
        "model": {"arch": "mlp", "params": {"in_features": 64, "num_classes": 10, "hidden": [32]}},
        "input": {"name": "input", "datatype": "FP32", "shape": [64]},
        "classes": 10,
        "dataset": {"name": "digits", "params": {"flatten": True}},
    },
    "cnn": {
        "model": {"arch": "cnn", "params": {"in_channels": 1, "num_classes": 10, "channels": [16, 32]}},
        "input": {"name": "input", "datatype": "FP32", "shape": [1, 8, 8]},
        "classes": 10,
        "dataset": {"name": "digits"},
    },
    "lstm_text": {
        "model": {
            "arch": "lstm_text",
            "params": {"vocab_size": 50, "num_classes": 4, "embed_dim": 16, "hidden": 24},
        },
        "input": {"name": "input", "datatype": "INT64", "shape": [-1]},
        "classes": 4,
        "dataset": {"name": "synthetic_tokens", "params": {"vocab": 50, "seq_len": 12, "samples": 400}},
    },
    "factory": {
        "model": {"factory": f"{HERE}:make_regressor", "params": {"features": 6, "outputs": 2}},
        "input": {"name": "input", "datatype": "FP32", "shape": [6]},
        "classes": 2,
        "task": "regression",
        "dataset": {"name": "synthetic_regression", "params": {"features": 6, "targets": 2, "samples": 400}},
    },
    "gated": {
        "model": {"factory": f"{HERE}:make_gated", "params": {"features": 6, "outputs": 2, "gate": ""}},
        "input": {"name": "input", "datatype": "FP32", "shape": [6]},
        "classes": 2,
        "task": "regression",
        "dataset": {"name": "synthetic_regression", "params": {"features": 6, "targets": 2, "samples": 400}},
    },
    "two_faced": {
        "model": {"factory": f"{HERE}:make_two_faced", "params": {"features": 6, "classes": 3}},
        "input": {"name": "input", "datatype": "FP32", "shape": [6]},
        "classes": 3,
        "dataset": {
            "name": "synthetic_classification",
            "params": {"features": 6, "classes": 3, "samples": 400},
        },
    },
    "eigen": {
        "model": {"factory": f"{HERE}:make_eigen", "params": {"features": 6, "classes": 3}},
        "input": {"name": "input", "datatype": "FP32", "shape": [6]},
        "classes": 3,
        "dataset": {
            "name": "synthetic_classification",
            "params": {"features": 6, "classes": 3, "samples": 400},
        },
    },
}


def _data(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The train split of the job's dataset (the trainer's loader), as the trainer would use it."""
    from ferry.datasets import load_dataset

    data = load_dataset(KINDS[kind]["dataset"])
    return data.x_train, data.y_train


def train_job(
    store: Store,
    job_id: str,
    kind: str,
    steps: int = 30,
    state: str = "SUCCEEDED",
    lr: float = 0.01,
    params: dict[str, Any] | None = None,
) -> Path:
    """Train the ``kind`` model for a few real steps and write a finished job the way the trainer
    does; ``params`` overrides some of the model's constructor parameters."""
    entry = KINDS[kind]
    if params:
        model_spec = entry["model"]
        entry = {**entry, "model": {**model_spec, "params": {**model_spec["params"], **params}}}
    task = entry.get("task", "classification")
    torch.manual_seed(0)
    model = build_model(entry["model"], ALLOWED)
    x, y = _data(kind)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss() if task == "regression" else nn.CrossEntropyLoss()
    model.train()
    for step in range(steps):
        idx = slice((step * 64) % (len(x) - 64), (step * 64) % (len(x) - 64) + 64)
        opt.zero_grad()
        loss = loss_fn(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        loss.backward()
        opt.step()
    model.eval()
    spec = {
        "job": job_id,
        "model": entry["model"],
        "input": entry["input"],
        "output": {"name": "logits", "shape": [entry["classes"]]},
        "task": task,
        "dataset": entry["dataset"],
        "classes": entry["classes"],
        "class_names": load_dataset(entry["dataset"]).class_names if task == "classification" else [],
    }
    summary = {"test": {"loss": float(loss.item())}, "history": [], "best_epoch": 0, "stopped_early": False,
               "epochs_run": 1}  # fmt: skip
    # the trainer's own writer, so the layout the exporter reads is the one the trainer writes
    folder = save_checkpoint(store.checkpoint_dir(job_id, FINAL).parent, FINAL, model, spec, summary)
    atomic_write_json(store.job_file(job_id), {"id": job_id, "state": state, "spec": spec})
    return folder


# --- the reader ---------------------------------------------------------------------------------


def test_load_checkpoint_rebuilds_the_trained_module(tmp_path: Path) -> None:
    store = Store(tmp_path)
    train_job(store, "job-mlp", "mlp", steps=3)
    ckpt = load_checkpoint(store, "job-mlp")
    assert ckpt.spec["model"]["arch"] == "mlp"
    assert not ckpt.module.training
    assert len(ckpt.weights_sha256) == 64
    assert ckpt.metrics["epochs_run"] == 1 and ckpt.metrics["test"]["loss"] > 0  # read as written


def test_unknown_job_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="job 'nope' not found"):
        load_checkpoint(Store(tmp_path), "nope")


@pytest.mark.parametrize("state", ["QUEUED", "RUNNING", "FAILED", "CANCELLED"])
def test_unfinished_job_is_a_failed_precondition(tmp_path: Path, state: str) -> None:
    store = Store(tmp_path)
    atomic_write_json(store.job_file("j1"), {"id": "j1", "state": state})
    with pytest.raises(FailedPrecondition, match=f"job 'j1' is {state}, not SUCCEEDED"):
        load_checkpoint(store, "j1")


def test_missing_and_corrupt_checkpoints_name_the_path(tmp_path: Path) -> None:
    store = Store(tmp_path)
    atomic_write_json(store.job_file("j2"), {"id": "j2", "state": "SUCCEEDED"})
    with pytest.raises(FailedPrecondition, match=r"has no checkpoint: .*checkpoints/j2/final does not exist"):
        load_checkpoint(store, "j2")
    folder = train_job(store, "j3", "mlp", steps=1)
    (folder / "weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(
        FailedPrecondition, match=r"weights .*checkpoints/j3/final/weights.safetensors are corrupt"
    ):
        load_checkpoint(store, "j3")
    (folder / "spec.json").write_text("{not json")
    with pytest.raises(FailedPrecondition, match=r"spec .*checkpoints/j3/final/spec.json is corrupt"):
        load_checkpoint(store, "j3")
    (folder / "spec.json").unlink()
    with pytest.raises(FailedPrecondition, match=r"missing its spec: .*spec.json does not exist"):
        load_checkpoint(store, "j3")


def test_weights_that_do_not_fit_the_spec(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = train_job(store, "j4", "mlp", steps=1)
    spec = json.loads((folder / "spec.json").read_text())
    spec["model"]["params"]["hidden"] = [7]
    (folder / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(FailedPrecondition, match="do not fit the model spec"):
        load_checkpoint(store, "j4")


def test_a_factory_outside_the_allowed_prefixes_is_refused_before_import(tmp_path: Path) -> None:
    """A checkpoint's spec.json is data; naming a factory in it must not run that code."""
    store = Store(tmp_path)
    train_job(store, "job-f", "factory", steps=1)
    spec_path = store.checkpoint_dir("job-f", FINAL) / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["model"] = {"factory": "os:system", "params": {"command": "touch pwned"}}
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(PermissionDenied, match=r"factory 'os:system' is not allowed here \(allowed module"):
        load_checkpoint(store, "job-f", allowed_factories=["tests"])
    assert not (Path.cwd() / "pwned").exists()
    with pytest.raises(PermissionDenied, match="is not allowed here"):
        load_checkpoint(store, "job-f")  # nothing allowed by default
    ckpt_spec = {**spec, "model": KINDS["factory"]["model"]}
    spec_path.write_text(json.dumps(ckpt_spec))
    with pytest.raises(PermissionDenied, match="allowed module prefixes: none"):
        load_checkpoint(store, "job-f")
    assert load_checkpoint(store, "job-f", allowed_factories=[HERE]).module is not None
