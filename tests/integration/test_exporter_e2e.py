"""End to end on real processes: the trainer trains, the exporter publishes, a running worker serves.

The worker starts before anything is exported and must pick each new version up
by itself; its answers must equal the trained torch module's within tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from ferry.client.exporter import SyncExporterClient
from ferry.client.inference import SyncInferenceClient
from ferry.client.trainer import SyncTrainerClient, state_name
from ferry.core.store import Store
from services.exporter.source import load_checkpoint
from tests.support.procs import ServiceProcess

CNN = {
    "model": {"arch": "cnn", "params": {"channels": [8, 16]}},
    "dataset": {"name": "digits"},
    "epochs": 3,
    "lr": 1e-2,
    "batch_size": 64,
    "seed": 0,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    root = str(tmp_path_factory.mktemp("e2e-store"))
    procs = {
        "trainer": ServiceProcess.serve("trainer", "--store", root, "--port", "0", "--threads-per-job", "1"),
        "exporter": ServiceProcess.serve("exporter", "--store", root, "--port", "0"),
        "worker": ServiceProcess.serve("worker", "--store", root, "--port", "0", "--poll-interval-s", "0.2"),
    }
    try:
        for proc in procs.values():
            proc.start()
        yield {**procs, "root": root}  # type: ignore[dict-item]
    finally:
        for proc in procs.values():
            proc.stop()


def _wait_ready(worker: SyncInferenceClient, model: str, version: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if worker.model_ready(model, version):
                return
        except Exception:  # not loaded yet: NOT_FOUND / UNAVAILABLE
            pass
        time.sleep(0.1)
    raise AssertionError(f"worker never served {model} version {version}")


def test_train_export_serve(stack: dict) -> None:
    store = Store(stack["root"])
    with SyncTrainerClient(stack["trainer"].address) as trainer:
        job = trainer.wait(trainer.submit(CNN, name="e2e-cnn").id, timeout=240)
    assert state_name(job) == "SUCCEEDED", job
    x = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    module = load_checkpoint(store, job.id).module
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    with (
        SyncExporterClient(stack["exporter"].address) as exporter,
        SyncInferenceClient(stack["worker"].address) as worker,
    ):
        report = exporter.export(job.id, "digits")
        assert report.published and report.version == 1, report.failure
        assert report.meta["parity"]["samples_source"] == "dataset:test"
        _wait_ready(worker, "digits", 1)
        out = worker.infer("digits", {"input": x})
        np.testing.assert_allclose(out["logits"], expected, atol=1e-4, rtol=1e-4)
        half = exporter.export(job.id, "digits", precision="fp16")
        assert half.published and half.version == 2, half.failure
        _wait_ready(worker, "digits", 2)
        served = worker.infer("digits", {"input": x})
        assert served.model_version == "2"
        np.testing.assert_allclose(served["logits"], expected, atol=0.05)
        np.testing.assert_array_equal(served["logits"].argmax(1), expected.argmax(1))
