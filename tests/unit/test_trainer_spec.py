"""Job spec validation without a server: defaults, sizes derived from the data, refusals with reasons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ferry.client.trainer import build_spec
from ferry.core.errors import InvalidArgument
from services.trainer.servicer import spec_from_proto
from services.trainer.spec import normalize_spec
from tests.support.deps import require_module

require_module("torch")


def norm(tmp_path: Path, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"arch": "mlp"}, "dataset": {"name": "iris"}}
    return normalize_spec({**base, **spec}, tmp_path)


def test_defaults_and_derived_sizes(tmp_path: Path) -> None:
    spec = norm(tmp_path)
    assert spec["model"] == {"arch": "mlp", "params": {"in_features": 4, "num_classes": 3}}
    assert (spec["optimizer"], spec["lr"], spec["epochs"], spec["batch_size"]) == ("adam", 1e-3, 10, 64)
    assert (spec["task"], spec["loss"], spec["val_fraction"], spec["nprocs"]) == (
        "classification",
        "cross_entropy",
        0.1,
        1,
    )
    assert spec["input"] == {"name": "input", "datatype": "FP32", "shape": [4]}
    assert spec["output"] == {"name": "logits", "shape": [3]} and spec["classes"] == 3
    assert spec["dataset"] == {
        "name": "iris",
        "upload": "",
        "params": {},
        "test_fraction": 0.2,
        "seed": 0,
        "task": "classification",
    }
    cnn = norm(tmp_path, model={"arch": "cnn"}, dataset={"name": "digits"})
    assert cnn["model"]["params"] == {"in_channels": 1, "num_classes": 10}
    text = norm(tmp_path, model={"arch": "embedding_bag_text"}, dataset={"name": "synthetic_tokens"})
    assert text["model"]["params"] == {"vocab_size": 64, "num_classes": 4}
    assert text["input"] == {"name": "input", "datatype": "INT64", "shape": [-1]}
    assert norm(tmp_path, optimizer="sgd")["lr"] == 1e-2
    reg = norm(tmp_path, dataset={"name": "synthetic_regression"}, loss="l1")
    assert (reg["task"], reg["loss"], reg["classes"], reg["output"]["shape"]) == ("regression", "l1", 0, [1])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'; choose one of sgd, adam, adamw"),
        (
            {"schedule": "cyclic"},
            "unknown schedule 'cyclic'; choose one of constant, step, cosine, exponential",
        ),
        ({"loss": "mse"}, "unknown loss for classification 'mse'; choose one of cross_entropy"),
        ({"device": "tpu"}, "unknown device 'tpu'; choose one of auto, cpu, cuda"),
        ({"task": "regression"}, "dataset 'iris' is a classification dataset, not regression"),
        ({"lr": -1.0}, "lr must be a positive number, got -1.0"),
        ({"epochs": 0, "nprocs": 99}, "nprocs must be in [1, 8] on this trainer, got 99"),
        ({"val_fraction": 1.5}, "val_fraction must lie in [0, 1), got 1.5"),
        ({"grad_clip_norm": -2.0}, "grad_clip_norm must be zero or positive, got -2.0"),
        ({"model": {"arch": "mlp", "factory": "a.b:c"}}, "give the model as an arch or a factory, not both"),
        ({"dataset": {}}, "the job spec names no dataset (set dataset.name or dataset.upload)"),
        (
            {"model": {"arch": "mlp", "params": {"hidden": "wide"}}},
            "model 'mlp': bad parameters {'hidden': 'wide', 'in_features': 4, 'num_classes': 3}",
        ),
    ],
)
def test_refusals(tmp_path: Path, override: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        norm(tmp_path, **override)
    assert caught.value.message.startswith(message)


def test_client_dict_spec_round_trips_through_the_proto(tmp_path: Path) -> None:
    given = {
        "model": {"arch": "cnn", "params": {"channels": [8]}},
        "dataset": {"name": "digits", "params": {"flatten": False}, "test_fraction": 0.25},
        "optimizer": "sgd",
        "lr": 0.05,
        "seed": 0,
        "val_fraction": 0.0,
        "epochs": 3,
        "nprocs": 2,
    }
    raw = spec_from_proto(build_spec(given))
    assert raw["model"] == {"arch": "cnn", "factory": "", "params": {"channels": [8]}}
    assert raw["dataset"]["test_fraction"] == 0.25 and raw["val_fraction"] == 0.0 and raw["seed"] == 0
    assert "gamma" not in raw  # unset optional fields stay absent, so defaults apply
    spec = normalize_spec(raw, tmp_path)
    assert (spec["val_fraction"], spec["lr"], spec["nprocs"]) == (0.0, 0.05, 2)
    with pytest.raises(InvalidArgument, match=r"^bad training spec"):
        build_spec({"epochz": 3})
