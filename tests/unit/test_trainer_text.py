"""A text job's spec at submit (the one architecture, the tokenizer entry, the fitted vocabulary), its
way through the proto and ``ferry train``, and the tokenizer file every checkpoint carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.cli.main import build_parser
from ferry.cli.train import build_spec_dict
from ferry.client.trainer import build_spec
from ferry.core.errors import InvalidArgument
from ferry.core.store import CheckpointFiles
from ferry.core.text import TOKENIZER_FILE, read_tokenizer
from services.trainer.servicer import spec_from_proto
from services.trainer.spec import normalize_spec
from tests.support.deps import require_module

torch = require_module("torch")

PARAMS = {"width": 16, "layers": 1, "heads": 2, "ff": 32, "max_len": 48}
TOPICS: dict[str, Any] = {"name": "topics", "params": {"samples": 200}}


def norm(tmp_path: Path, model: dict[str, Any] | None = None, **dataset: Any) -> dict[str, Any]:
    raw = {
        "model": model or {"arch": "transformer_text", "params": PARAMS},
        "dataset": {**TOPICS, **dataset},
    }
    return normalize_spec(raw, tmp_path)


def test_a_text_spec_fills_the_vocabulary_from_the_fitted_tokenizer(tmp_path: Path) -> None:
    spec = norm(tmp_path, tokenizer={"kind": "bpe", "vocab_size": 150, "lowercase": False})
    assert spec["tokenizer"] == {"kind": "bpe", "vocab_size": 150, "lowercase": False, "max_length": 48}
    assert spec["model"]["params"] == {**PARAMS, "vocab_size": 150, "num_classes": 4}
    assert spec["input"] == {"name": "input", "datatype": "INT64", "shape": [-1]}
    assert spec["class_names"] == ["sports", "weather", "finance", "cooking"] and spec["classes"] == 4
    default = norm(tmp_path)  # the defaults: wordpiece, 8000 at most (a small corpus gives fewer)
    fitted = default["tokenizer"]["vocab_size"]
    assert default["tokenizer"] == {
        "kind": "wordpiece",
        "vocab_size": fitted,
        "lowercase": True,
        "max_length": 48,
    }
    assert 100 < fitted < 8000 and default["model"]["params"]["vocab_size"] == fitted
    no_max_len = norm(
        tmp_path, {"arch": "transformer_text", "params": {"width": 16, "heads": 2, "layers": 1}}
    )
    assert no_max_len["tokenizer"]["max_length"] == 128  # the model's own default max_len
    bigger = norm(tmp_path, {"arch": "transformer_text", "params": {**PARAMS, "vocab_size": 9000}})
    assert bigger["model"]["params"]["vocab_size"] == 9000  # room to spare is allowed


@pytest.mark.parametrize(
    ("model", "dataset", "message"),
    [
        ({"arch": "lstm_text"}, {},
         "dataset 'topics' is text, and only 'transformer_text' trains on raw text: "
         "model 'lstm_text' would not give a text the same answer"),
        ({"arch": "embedding_bag_text"}, {}, "dataset 'topics' is text, and only 'transformer_text'"),
        ({"arch": "mlp"}, {}, "dataset 'topics' is text, and only 'transformer_text'"),
        ({"factory": "tests.support.factories:tiny"}, {}, "dataset 'topics' is text, and only "
         "'transformer_text' trains on raw text: a factory model"),
        (None, {"tokenizer": {"kind": "sentencepiece"}},
         "unknown tokenizer kind 'sentencepiece'; choose one of wordpiece, bpe"),
        (None, {"tokenizer": {"vocab_size": 3}},
         "tokenizer vocab_size must be an integer in [6, 1000000], got 3"),
        (None, {"tokenizer": {"lowercase": "yes"}}, "tokenizer lowercase must be true or false, got 'yes'"),
        (None, {"tokenizer": {"size": 3}}, "tokenizer has unknown field(s) ['size']"),
        ({"arch": "transformer_text", "params": {**PARAMS, "vocab_size": 10}}, {},
         "model 'transformer_text' takes vocab_size=10 but dataset 'topics' has token ids up to"),
        ({"arch": "transformer_text", "params": {**PARAMS, "max_len": 1}}, {},
         "model 'transformer_text' param 'max_len' must be an integer of at least 2 for a text dataset"),
    ],
)  # fmt: skip
def test_text_refusals(
    tmp_path: Path, model: dict[str, Any] | None, dataset: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        norm(tmp_path, model, **dataset)
    assert caught.value.message.startswith(message), caught.value.message


def test_a_tokenizer_on_a_dataset_that_is_not_text_is_refused(tmp_path: Path) -> None:
    raw = {"model": {"arch": "mlp"}, "dataset": {"name": "iris", "tokenizer": {}}}
    with pytest.raises(InvalidArgument, match=r"^dataset 'iris' is not text: a tokenizer applies only"):
        normalize_spec(raw, tmp_path)


def test_the_tokenizer_travels_through_the_proto_and_the_cli(tmp_path: Path) -> None:
    given = {
        "model": {"arch": "transformer_text", "params": PARAMS},
        "dataset": {**TOPICS, "tokenizer": {"kind": "bpe", "vocab_size": 120, "lowercase": False}},
    }
    raw = spec_from_proto(build_spec(given))
    assert raw["dataset"]["tokenizer"] == {"kind": "bpe", "vocab_size": 120, "lowercase": False}
    assert normalize_spec(raw, tmp_path)["tokenizer"]["vocab_size"] == 120
    empty = spec_from_proto(build_spec({**given, "dataset": {**TOPICS, "tokenizer": {}}}))
    assert empty["dataset"]["tokenizer"] == {}  # set but empty: the defaults
    assert "tokenizer" not in spec_from_proto(build_spec({**given, "dataset": TOPICS}))["dataset"]

    args = build_parser().parse_args(
        ["train", "--dataset", "topics", "--model", "transformer_text", "--tokenizer", "wordpiece",
         "--vocab-size", "2000", "--no-lowercase", "--epochs", "2"]
    )  # fmt: skip
    assert build_spec_dict(args) == {
        "model": {"arch": "transformer_text", "params": {}},
        "dataset": {
            "name": "topics",
            "tokenizer": {"kind": "wordpiece", "vocab_size": 2000, "lowercase": False},
        },
        "epochs": 2,
    }
    plain = build_parser().parse_args(["train", "--dataset", "topics", "--model", "transformer_text"])
    assert "tokenizer" not in build_spec_dict(plain)["dataset"]
    upload = build_parser().parse_args(["upload", "texts.jsonl", "--format", "jsonl"])
    assert upload.format == "jsonl"


def test_the_job_fits_once_and_every_checkpoint_carries_a_copy(tmp_path: Path) -> None:
    from ferry.zoo import build_model
    from services.trainer import checkpoints as ckpt

    spec = {**norm(tmp_path), "job": "j1"}
    job_dir = tmp_path / "checkpoints" / "j1"
    path = ckpt.prepare_tokenizer(job_dir, spec, tmp_path)
    assert path == job_dir / TOKENIZER_FILE == job_dir / CheckpointFiles.TOKENIZER
    first = path.read_bytes()
    assert read_tokenizer(path).get_vocab_size() <= spec["tokenizer"]["vocab_size"]
    assert [p.name for p in job_dir.iterdir()] == [TOKENIZER_FILE]  # no temporary left behind
    assert ckpt.prepare_tokenizer(job_dir, spec, tmp_path) == path and path.read_bytes() == first  # reused
    model = build_model(spec["model"])
    for tag in ("epoch-0001", ckpt.FINAL):
        folder = ckpt.save_checkpoint(job_dir, tag, model, spec, {})
        assert (folder / TOKENIZER_FILE).read_bytes() == first
        assert json.loads((folder / CheckpointFiles.SPEC).read_text())["tokenizer"] == spec["tokenizer"]
    assert ckpt.list_tags(job_dir) == ["epoch-0001", ckpt.FINAL]
    iris = normalize_spec({"model": {"arch": "mlp"}, "dataset": {"name": "iris"}}, tmp_path)
    assert ckpt.prepare_tokenizer(tmp_path / "checkpoints" / "j2", iris, tmp_path) is None


def test_the_exporter_reads_the_checkpoints_tokenizer_and_samples_with_it(tmp_path: Path) -> None:
    from ferry.core.errors import FailedPrecondition
    from ferry.core.store import Store, atomic_write_json
    from ferry.core.text import TextEncoder
    from ferry.datasets import load_dataset
    from ferry.zoo import build_model
    from services.exporter.samples import held_out
    from services.exporter.source import load_checkpoint
    from services.trainer import checkpoints as ckpt

    store = Store(tmp_path)
    spec = {**norm(tmp_path), "job": "j3"}
    job_dir = store.checkpoints_dir / "j3"
    path = ckpt.prepare_tokenizer(job_dir, spec, tmp_path)
    assert path is not None
    ckpt.save_checkpoint(job_dir, ckpt.FINAL, build_model(spec["model"]), spec, {})
    atomic_write_json(store.job_file("j3"), {"id": "j3", "state": "SUCCEEDED"})
    loaded = load_checkpoint(store, "j3")
    assert loaded.tokenizer == job_dir / ckpt.FINAL / TOKENIZER_FILE and loaded.max_length == 48
    samples = held_out(loaded.spec, 16, store_root=tmp_path, tokenizer=loaded.tokenizer)
    expected = load_dataset(spec["dataset"], encoder=TextEncoder(read_tokenizer(path), 48))
    assert samples.source == "dataset:test"
    assert np.array_equal(samples.inputs, expected.x_test[:16]) and np.array_equal(
        samples.labels, expected.y_test[:16]
    )
    (job_dir / ckpt.FINAL / TOKENIZER_FILE).unlink()
    with pytest.raises(FailedPrecondition, match=r"^checkpoint of text job 'j3' is missing its tokenizer: "):
        load_checkpoint(store, "j3")
