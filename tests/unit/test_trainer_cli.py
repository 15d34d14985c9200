"""``ferry train`` turns flags (and an optional spec file) into the job spec the trainer takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.cli.main import build_parser
from ferry.cli.train import build_spec_dict


def test_flags_become_the_spec() -> None:
    args = build_parser().parse_args(
        ["train", "--model", "mlp", "--params", '{"hidden": [32]}', "--dataset", "digits",
         "--dataset-params", '{"flatten": true}', "--epochs", "3", "--lr", "0.01", "--nprocs", "2",
         "--early-stopping-patience", "2", "--name", "x"]
    )  # fmt: skip
    assert build_spec_dict(args) == {
        "model": {"arch": "mlp", "params": {"hidden": [32]}},
        "dataset": {"name": "digits", "params": {"flatten": True}},
        "epochs": 3,
        "lr": 0.01,
        "nprocs": 2,
        "early_stopping_patience": 2,
    }


def test_spec_file_with_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    spec = {"model": {"arch": "cnn", "params": {"channels": [8]}}, "dataset": {"name": "digits"}, "epochs": 9}
    path.write_text(json.dumps({**spec, "optimizer": "sgd"}))
    args = build_parser().parse_args(["train", "--spec", str(path), "--epochs", "2", "--upload", "mine"])
    assert build_spec_dict(args) == {
        "model": {"arch": "cnn", "params": {"channels": [8]}},
        "dataset": {"upload": "mine"},
        "epochs": 2,
        "optimizer": "sgd",
    }


def test_bad_json_params_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model", "mlp", "--params", "{not json"])
