"""The pipeline in process: cancellation and failures leave the store as it was."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ferry.core.classify import LABELS_FILE, read_labels
from ferry.core.errors import Cancelled, FailedPrecondition
from ferry.core.store import Store
from services.exporter.pipeline import ExportPipeline, resolve_options
from services.exporter.settings import ExporterSettings
from tests.unit.test_exporter_source import train_job


@pytest.fixture
def pipeline(tmp_path: Path) -> ExportPipeline:
    store = Store(tmp_path)
    train_job(store, "job-f", "factory", steps=20)
    train_job(store, "job-eigen", "eigen", steps=1)
    train_job(store, "job-mlp", "mlp", steps=5)
    settings = ExporterSettings(parity_samples=32, latency_runs=1, allowed_factories=["tests"])
    return ExportPipeline(store, settings)


def test_cancelled_export_stops_at_the_next_stage(pipeline: ExportPipeline) -> None:
    cancelled = threading.Event()
    seen: list[tuple[str, str]] = []

    def progress(stage: str, state: str, detail: str, elapsed: float) -> None:
        seen.append((stage, state))
        if stage == "check" and state == "done":
            cancelled.set()

    opts = resolve_options({}, pipeline.settings)
    with pytest.raises(Cancelled, match="export cancelled by the client"):
        pipeline.run("job-f", "m", opts, progress, cancelled)
    assert seen[-1] == ("check", "done")
    assert pipeline.store.list_versions("m") == []
    assert not (pipeline.store.models_dir / "m").exists()


def test_converter_failure_publishes_nothing(pipeline: ExportPipeline) -> None:
    opts = resolve_options({}, pipeline.settings)
    with pytest.raises(FailedPrecondition, match="aten::linalg_eigvals"):
        pipeline.run("job-eigen", "m", opts)
    assert not (pipeline.store.models_dir / "m").exists()


def test_export_in_process_publishes_with_meta(pipeline: ExportPipeline) -> None:
    result = pipeline.run("job-f", "reg", resolve_options({"precision": "fp16"}, pipeline.settings))
    assert result.published and result.version == 1
    meta = pipeline.store.read_meta("reg", 1)
    assert meta is not None and meta["precision"] == "fp16" and meta["task"] == "regression"
    assert (
        meta["parity"]["passed"]
        and meta["source"]["weights_sha256"] == result.meta["source"]["weights_sha256"]
    )
    assert not (pipeline.store.version_dir("reg", 1) / LABELS_FILE).exists()  # regression: no classes


def test_a_classifier_publishes_its_class_names_as_labels(pipeline: ExportPipeline) -> None:
    result = pipeline.run("job-mlp", "digits", resolve_options({}, pipeline.settings))
    assert result.published and result.version == 1
    labels = pipeline.store.version_dir("digits", 1) / LABELS_FILE
    assert labels.read_text(encoding="utf-8") == "".join(f"{d}\n" for d in range(10))
    assert read_labels(labels.parent) == tuple(str(d) for d in range(10))
