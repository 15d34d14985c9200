"""Checkpoints and the training loop's pure parts: schedules, save/resume round trips, tags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from services.trainer import checkpoints as ckpt
from services.trainer.runner import lr_at
from tests.support.deps import require_module

torch = require_module("torch")

BASE = {"lr": 0.1, "warmup_epochs": 0, "schedule": "constant", "gamma": 0.5, "step_size": 2, "epochs": 10}


def test_learning_rate_schedules() -> None:
    assert [lr_at(BASE, e) for e in (1, 5)] == [0.1, 0.1]
    step = {**BASE, "schedule": "step"}
    assert [lr_at(step, e) for e in (1, 2, 3, 4, 5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert lr_at({**BASE, "schedule": "exponential"}, 3) == pytest.approx(0.025)
    cosine = {**BASE, "schedule": "cosine"}
    assert lr_at(cosine, 1) == pytest.approx(0.1) and lr_at(cosine, 6) == pytest.approx(0.05)
    warm = {**BASE, "warmup_epochs": 3}
    assert [lr_at(warm, e) for e in (1, 2, 3, 4)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert all(math.isfinite(lr_at(cosine, e)) and lr_at(cosine, e) >= 0 for e in range(1, 11))


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3)).sum().backward()
        opt.step()
    return model, opt


def test_save_and_resume_round_trip(tmp_path: Path) -> None:
    model, opt = _trained(0)
    spec = {"job": "j1", "model": {"arch": "x"}, "input": {}, "output": {}, "task": "classification",
            "dataset": {"name": "iris"}, "classes": 2, "lr": 0.01}  # fmt: skip
    folder = ckpt.save_checkpoint(
        tmp_path, "epoch-0001", model, spec, {"epoch": {"epoch": 1}}, opt, {"epoch": 1}
    )
    assert sorted(p.name for p in folder.iterdir()) == [
        "metrics.json", "optimizer.safetensors", "spec.json", "state.json", "weights.safetensors"
    ]  # fmt: skip
    written = json.loads((folder / "spec.json").read_text())
    assert "lr" not in written and written["job"] == "j1" and written["classes"] == 2
    fresh, fresh_opt = _trained(1)
    loop = ckpt.load_resume(folder, fresh, fresh_opt)
    assert loop == {"epoch": 1}
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    # The restored optimizer takes the same next step.
    for m, o in ((model, opt), (fresh, fresh_opt)):
        torch.manual_seed(9)
        o.zero_grad()
        m(torch.randn(8, 3)).sum().backward()
        o.step()
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )


def test_tags_and_staging(tmp_path: Path) -> None:
    model, _ = _trained(0)
    spec = {"model": {}}
    for tag in ("epoch-0002", "epoch-0001", "final"):
        ckpt.save_checkpoint(tmp_path, tag, model, spec, {})
    ckpt.save_checkpoint(tmp_path, "epoch-0002", model, spec, {"again": True})  # rewrite in place
    (tmp_path / ".staging-epoch-0003-x").mkdir()
    assert ckpt.list_tags(tmp_path) == ["epoch-0001", "epoch-0002", "final"]
    assert ckpt.last_epoch_tag(tmp_path) == "epoch-0002"
    assert json.loads((tmp_path / "epoch-0002" / "metrics.json").read_text()) == {"again": True}
    ckpt.remove_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001", "epoch-0002", "final"]
    assert ckpt.list_tags(tmp_path / "missing") == [] and ckpt.last_epoch_tag(tmp_path / "missing") == ""
