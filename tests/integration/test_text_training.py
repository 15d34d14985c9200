"""Training on raw text through the real services: the tokenizer is part of the model version.

A trainer fits a tokenizer on the built-in ``topics`` corpus once, trains a tiny
``transformer_text`` on it and keeps ``tokenizer.json`` in the job folder and in every checkpoint;
an exporter publishes it beside ``model.onnx`` with ``labels.txt`` and a ``config.json`` whose
``text`` entry tells the worker to take raw texts. A JSONL upload trains the same way. The model
is tiny (width 32, one layer) and the corpus 600 sentences, so the file runs in well under a
minute on 2 vCPUs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.client.exporter import SyncExporterClient
from ferry.client.trainer import SyncTrainerClient, state_name
from ferry.core.errors import InvalidArgument
from ferry.core.store import CONFIG_FILE, Store
from ferry.core.text import TOKENIZER_FILE, TextEncoder, read_tokenizer
from tests.support.deps import require_module
from tests.support.procs import REPO, ServiceProcess, on_store

pytestmark = pytest.mark.solo  # its own trainer and exporter: the file-order pass only

torch = require_module("torch")
ort = require_module("onnxruntime")

TOPICS = ["sports", "weather", "finance", "cooking"]
PARAMS = {"width": 32, "layers": 1, "heads": 4, "ff": 64, "max_len": 64, "dropout": 0.1}
SPEC: dict[str, Any] = {
    "model": {"arch": "transformer_text", "params": PARAMS},
    "dataset": {
        "name": "topics",
        "params": {"samples": 600},
        "tokenizer": {"kind": "wordpiece", "vocab_size": 400},
    },
    "epochs": 2,
    "lr": 3e-3,
    "batch_size": 32,
    "seed": 0,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("text-store"))


@pytest.fixture(scope="module")
def trainer(store: Store) -> Iterator[ServiceProcess]:
    with on_store("trainer", store.root, "--threads-per-job", "2") as proc:
        yield proc


@pytest.fixture(scope="module")
def exporter(store: Store) -> Iterator[ServiceProcess]:
    with on_store("exporter", store.root) as proc:
        yield proc


@pytest.fixture(scope="module")
def trained(trainer: ServiceProcess) -> str:
    with SyncTrainerClient(trainer.address) as client:
        job = client.wait(client.submit(SPEC, name="topics").id, timeout=240)
    assert state_name(job) == "SUCCEEDED", job.error
    return str(job.id)


def test_the_job_fits_one_tokenizer_and_every_checkpoint_keeps_it(
    trainer: ServiceProcess, store: Store, trained: str
) -> None:
    with SyncTrainerClient(trainer.address) as client:
        job = client.get(trained)
    spec = json.loads(job.spec_json)
    fitted = spec["tokenizer"]["vocab_size"]
    assert spec["tokenizer"] == {
        "kind": "wordpiece",
        "vocab_size": fitted,
        "lowercase": True,
        "max_length": 64,
    }
    assert fitted <= 400 and spec["model"]["params"]["vocab_size"] == fitted
    assert spec["class_names"] == TOPICS and spec["input"] == {
        "name": "input",
        "datatype": "INT64",
        "shape": [-1],
    }
    print(f"\ntopics transformer_text test metrics after 2 epochs: {dict(job.test_metrics)}")
    assert job.test_metrics["test_accuracy"] >= 0.55, dict(job.test_metrics)  # chance is 0.25
    job_dir = store.checkpoints_dir / trained
    saved = (job_dir / TOKENIZER_FILE).read_bytes()
    assert list(job.checkpoints) == ["epoch-0001", "epoch-0002", "final"]
    for tag in job.checkpoints:
        assert (job_dir / tag / TOKENIZER_FILE).read_bytes() == saved, tag
    final = json.loads((job_dir / "final" / "spec.json").read_text())
    assert final["tokenizer"] == spec["tokenizer"] and final["class_names"] == TOPICS
    assert read_tokenizer(job_dir / TOKENIZER_FILE).get_vocab_size() <= fitted


def test_the_export_publishes_the_tokenizer_labels_and_the_text_config(
    exporter: ServiceProcess, store: Store, trained: str
) -> None:
    from ferry.datasets import load_dataset
    from services.exporter.source import load_checkpoint

    with SyncExporterClient(exporter.address) as client:
        report = client.export(trained, "topics")
    assert report.published and report.parity_passed, report.failure
    assert report.meta["parity"]["samples_source"] == "dataset:test"
    version = store.version_dir("topics", report.version)
    job_dir = store.checkpoints_dir / trained
    assert (version / TOKENIZER_FILE).read_bytes() == (job_dir / "final" / TOKENIZER_FILE).read_bytes()
    assert (version / "labels.txt").read_text().splitlines() == TOPICS
    config = json.loads((store.model_dir("topics") / CONFIG_FILE).read_text())
    assert config["text"] == {"input": "text", "max_length": 64}
    assert config["sequence_buckets"] == {"max_length": 64}
    assert config["input"] == [{"name": "input", "data_type": "INT64", "dims": [-1]}]

    # The published file and tokenizer give torch's answers on the held-out texts.
    ckpt = load_checkpoint(store, trained)
    encoder = TextEncoder(read_tokenizer(version / TOKENIZER_FILE), 64)
    data = load_dataset(ckpt.spec["dataset"], encoder=encoder)
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(None, {"input": data.x_test})[0]
    with torch.no_grad():
        expected = ckpt.module(torch.from_numpy(data.x_test)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4, rtol=1e-4)
    accuracy = float(np.mean(served.argmax(1) == data.y_test))
    assert accuracy == pytest.approx(ckpt.metrics["test"]["accuracy"])

    # Static int8 calibrates on texts tokenized the same way; its exact fp32 check passes either way.
    with SyncExporterClient(exporter.address) as client:
        int8 = client.export(trained, "topics-int8", precision="int8", quantization="static")
    parity = int8.meta["parity"]
    assert parity["fp32_graph"]["passed"] and parity["samples_source"] == "dataset:test", parity
    if int8.published:
        assert (store.version_dir("topics-int8", int8.version) / TOKENIZER_FILE).is_file()


def test_a_jsonl_upload_trains_a_text_model(trainer: ServiceProcess, store: Store) -> None:
    from ferry.textcorpus import generate

    texts, labels = generate(300, 5)
    names = ["sport", "sky", "money", "food"]
    lines = [json.dumps({"text": t, "label": names[int(y)]}) for t, y in zip(texts, labels, strict=True)]
    with SyncTrainerClient(trainer.address) as client:
        answer = client.upload_dataset("news", "\n".join(lines).encode(), "jsonl")
        assert (list(answer.x_shape), answer.classes) == ([300], 4)
        with pytest.raises(InvalidArgument) as caught:
            client.upload_dataset(
                "broken", b'{"text": "a", "label": "x"}\n{"text": "", "label": "y"}\n', "jsonl"
            )
        assert caught.value.message == "JSONL dataset line 2: 'text' is empty"
        with pytest.raises(InvalidArgument) as caught:
            client.submit({**SPEC, "model": {"arch": "lstm_text"}, "dataset": {"upload": "news"}})
        assert "only 'transformer_text' trains on raw text" in caught.value.message
        spec = {
            **SPEC,
            "dataset": {"upload": "news", "tokenizer": {"kind": "bpe", "vocab_size": 300}},
            "epochs": 1,
        }
        job = client.wait(client.submit(spec, name="news").id, timeout=240)
    assert state_name(job) == "SUCCEEDED", job.error
    normalized = json.loads(job.spec_json)
    assert normalized["class_names"] == sorted(names) and normalized["tokenizer"]["kind"] == "bpe"
    assert (store.checkpoints_dir / job.id / "final" / TOKENIZER_FILE).is_file()
    kept = {p.name for p in store.datasets_dir.iterdir() if not p.name.startswith(".")}
    assert "news.jsonl" in kept and not [name for name in kept if name.startswith("broken")]


def test_two_ddp_ranks_share_the_one_tokenizer(trainer: ServiceProcess, store: Store) -> None:
    spec = {**SPEC, "dataset": {**SPEC["dataset"], "params": {"samples": 300}}, "epochs": 1, "nprocs": 2}
    with SyncTrainerClient(trainer.address) as client:
        job = client.wait(client.submit(spec, name="topics-ddp").id, timeout=240)
    assert state_name(job) == "SUCCEEDED", job.error
    assert json.loads(store.job_file(job.id).read_text())["world"] == 2
    job_dir = store.checkpoints_dir / job.id
    saved = (job_dir / TOKENIZER_FILE).read_bytes()
    assert [(job_dir / tag / TOKENIZER_FILE).read_bytes() == saved for tag in job.checkpoints] == [True, True]
    assert not [p.name for p in job_dir.iterdir() if p.name.endswith(".tmp")]


def test_ferry_upload_takes_a_jsonl_file(trainer: ServiceProcess, tmp_path: Path) -> None:
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "rain again", "label": "weather"}\n{"text": "a goal", "label": "sports"}\n')
    argv = [sys.executable, "-m", "ferry.cli.main", "upload", str(path), "--trainer", trainer.address]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(
        f"uploaded dataset tiny: {path.stat().st_size} bytes, x [2], 2 classes, sha256 "
    )
    assert (
        lines[1]
        == "train on it with: ferry train --upload tiny --model transformer_text --tokenizer wordpiece"
    )
