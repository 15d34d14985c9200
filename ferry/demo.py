"""The demo flow on a running stack: train a CNN on digits, export it, classify through the gateway.

``ensure_demo_model`` trains and exports only when the store has no demo model yet,
so the first ``ferry up`` builds it and later ones reuse it. ``classify_digits``
sends the digits test split (the same split the trainer held out) through the
gateway one request per image and reports accuracy and latency.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferry.client.exporter import ExporterClient
from ferry.client.inference import InferenceClient
from ferry.client.trainer import TrainerClient, state_name
from ferry.core.errors import FailedPrecondition
from ferry.core.jobstates import JobState
from ferry.core.store import Store
from ferry.datasets import load_dataset

DEMO_MODEL = "digits"
DATASET = {"name": "digits"}
SEED = 0


def demo_spec(epochs: int) -> dict[str, Any]:
    return {
        "model": {"arch": "cnn", "params": {"in_channels": 1, "num_classes": 10, "channels": [16, 32]}},
        "dataset": dict(DATASET),
        "epochs": epochs,
        "batch_size": 32,
        "lr": 0.01,
        "optimizer": "adam",
        "schedule": "cosine",
        "seed": SEED,
    }


async def ensure_demo_model(
    store: Store,
    trainer: str,
    exporter: str,
    epochs: int = 20,
    say: Callable[[str], None] = print,
    options: dict[str, Any] | None = None,
) -> int:
    """The demo model's latest version, training and exporting it first if the store has none.
    ``options`` are the clients' credentials (``ferry up --secure``)."""
    versions = store.list_versions(DEMO_MODEL)
    if versions:
        say(f"demo model '{DEMO_MODEL}' version {versions[-1]} found in the store; reusing it")
        return versions[-1]
    say(f"building the demo model: a CNN trained on scikit-learn digits for {epochs} epochs")
    async with TrainerClient(trainer, **(options or {})) as client:
        job = await client.submit(demo_spec(epochs), name="demo-digits-cnn")
        async for event in client.watch(job.id):
            job = event.job
            if event.kind == "epoch":
                p = job.progress
                acc = p.metrics.get("val_accuracy", float("nan"))
                say(f"  epoch {p.epoch}/{p.epochs}  loss {p.loss:.4f}  val_accuracy {acc:.3f}")
        job = await client.get(job.id)
        if state_name(job) != JobState.SUCCEEDED:
            raise FailedPrecondition(f"demo training job {job.id} ended {state_name(job)}: {job.error}")
    say(f"  trained: job {job.id}; exporting to ONNX with the parity gate")
    async with ExporterClient(exporter, **(options or {})) as client:
        report = await client.export(
            job.id,
            DEMO_MODEL,
            on_progress=lambda stage: (
                say(f"  export {stage.stage}: {stage.detail}") if stage.state == "done" else None
            ),
        )
    if not report.published:
        raise FailedPrecondition(f"demo export published nothing: {report.failure}")
    say(f"  published '{DEMO_MODEL}' version {report.version}")
    return int(report.version)


@dataclass
class Classification:
    samples: int
    accuracy: float
    p50_ms: float
    p99_ms: float
    seconds: float
    model_version: str


async def classify_digits(
    gateway: str,
    version: int,
    concurrency: int = 8,
    timeout_s: float = 120,
    options: dict[str, Any] | None = None,
) -> Classification:
    """Classify the held-out digits through the gateway, one image per request."""
    data = load_dataset(DATASET, seed=SEED)
    async with InferenceClient(gateway, **(options or {})) as client:
        deadline = time.monotonic() + timeout_s
        while not await client.model_ready(DEMO_MODEL, version):
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"the gateway never saw '{DEMO_MODEL}' version {version} ready")
            await asyncio.sleep(0.2)
        predictions = np.zeros(len(data.x_test), dtype=np.int64)
        latencies: list[float] = []
        served = ""
        queue = list(range(len(data.x_test)))

        async def lane() -> None:
            nonlocal served
            while queue:
                i = queue.pop()
                t0 = time.perf_counter()
                result = await client.infer(DEMO_MODEL, {"input": data.x_test[i : i + 1]}, timeout=30)
                latencies.append(time.perf_counter() - t0)
                predictions[i] = int(np.argmax(next(iter(result.values()))[0]))
                served = result.model_version

        start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return Classification(
        samples=len(predictions),
        accuracy=float((predictions == data.y_test).mean()),
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        seconds=seconds,
        model_version=served,
    )


def describe(result: Classification) -> str:
    return json.dumps(result.__dict__)
