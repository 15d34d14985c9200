"""The demo flows on a running stack: train, export, classify the held-out split through the gateway.

Two demos: a CNN on scikit-learn's digits (``ferry demo``), and a ``transformer_text`` on the
generated ``topics`` corpus with its WordPiece tokenizer (``ferry demo --text``).
``ensure_demo_model`` trains and exports only when the store has no such model yet, so the first
run builds it and later ones reuse it. ``classify_digits`` sends the digits test split (the same
split the trainer held out) one image per request; ``classify_texts`` sends the held-out texts
as strings with tritonclient, which the worker tokenizes with the version's own tokenizer. Both
report accuracy and latency.
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
TEXT_MODEL = "topics"
TEXT_DATASET: dict[str, Any] = {"name": "topics", "params": {"samples": 2400}}
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


def text_spec(epochs: int) -> dict[str, Any]:
    """A small BERT-style encoder: 2 layers of width 64, texts cut at 64 tokens."""
    params = {"width": 64, "layers": 2, "heads": 4, "max_len": 64, "dropout": 0.1}
    return {
        "model": {"arch": "transformer_text", "params": params},
        "dataset": {**TEXT_DATASET, "tokenizer": {"kind": "wordpiece", "vocab_size": 2000}},
        "epochs": epochs,
        "batch_size": 32,
        "lr": 0.002,
        "optimizer": "adamw",
        "schedule": "cosine",
        "seed": SEED,
    }


@dataclass(frozen=True)
class Demo:
    model: str
    what: str  # said while it is built
    job_name: str
    spec: Callable[[int], dict[str, Any]]
    epochs: int


DIGITS = Demo(DEMO_MODEL, "a CNN trained on scikit-learn digits", "demo-digits-cnn", demo_spec, 20)
TOPICS = Demo(
    TEXT_MODEL,
    "a transformer_text with a WordPiece tokenizer, trained on the generated topics corpus",
    "demo-topics-transformer",
    text_spec,
    8,
)


async def ensure_demo_model(
    store: Store,
    trainer: str,
    exporter: str,
    epochs: int | None = None,
    say: Callable[[str], None] = print,
    options: dict[str, Any] | None = None,
    demo: Demo = DIGITS,
) -> int:
    """The demo model's latest version, training and exporting it first if the store has none.
    ``options`` are the clients' credentials (``ferry up --secure``)."""
    versions = store.list_versions(demo.model)
    if versions:
        say(f"demo model '{demo.model}' version {versions[-1]} found in the store; reusing it")
        return versions[-1]
    epochs = epochs or demo.epochs
    say(f"building the demo model: {demo.what} for {epochs} epochs")
    async with TrainerClient(trainer, **(options or {})) as client:
        job = await client.submit(demo.spec(epochs), name=demo.job_name)
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
            demo.model,
            on_progress=lambda stage: (
                say(f"  export {stage.stage}: {stage.detail}") if stage.state == "done" else None
            ),
        )
    if not report.published:
        raise FailedPrecondition(f"demo export published nothing: {report.failure}")
    say(f"  published '{demo.model}' version {report.version}")
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


async def classify_texts(
    gateway: str,
    version: int,
    concurrency: int = 8,
    timeout_s: float = 120,
    options: dict[str, Any] | None = None,
) -> Classification:
    """Classify the held-out topics texts through the gateway, one text per request, sent as a
    string with tritonclient (Triton's own client, unchanged); the answer is the top label."""
    import tempfile

    try:
        import tritonclient.grpc as tc
        import tritonclient.grpc.aio as tc_aio
    except ImportError as err:
        raise FailedPrecondition(
            "the text demo sends its strings with Triton's own client: pip install 'tritonclient[grpc]'"
        ) from err

    data = load_dataset({**TEXT_DATASET, "seed": SEED})
    names = data.class_names
    opts = options or {}
    headers = {"authorization": f"Bearer {opts['api_key']}"} if opts.get("api_key") else None
    with tempfile.NamedTemporaryFile(suffix=".pem") as ca:
        tls: dict[str, Any] = {}
        if opts.get("tls"):
            ca.write(opts["root_certificates"])
            ca.flush()
            tls = {"ssl": True, "root_certificates": ca.name}
        client = tc_aio.InferenceServerClient(gateway, **tls)
        try:
            deadline = time.monotonic() + timeout_s
            while not await client.is_model_ready(TEXT_MODEL, str(version), headers=headers):
                if time.monotonic() > deadline:
                    raise FailedPrecondition(f"the gateway never saw '{TEXT_MODEL}' version {version} ready")
                await asyncio.sleep(0.2)
            meta = await client.get_model_metadata(TEXT_MODEL, str(version), headers=headers)
            output = meta.outputs[0].name
            predictions = [""] * len(data.texts_test)
            latencies: list[float] = []
            queue = list(range(len(data.texts_test)))

            async def lane() -> None:
                while queue:
                    i = queue.pop()
                    text = tc.InferInput("text", [1, 1], "BYTES")
                    text.set_data_from_numpy(np.array([[data.texts_test[i].encode()]], dtype=object))
                    top = [tc.InferRequestedOutput(output, class_count=1)]
                    t0 = time.perf_counter()
                    result = await client.infer(
                        TEXT_MODEL, [text], model_version=str(version), outputs=top, headers=headers
                    )
                    latencies.append(time.perf_counter() - t0)
                    best = result.as_numpy(output)
                    predictions[i] = best.reshape(-1)[0].decode().split(":", 2)[-1]

            start = time.perf_counter()
            await asyncio.gather(*(lane() for _ in range(concurrency)))
            seconds = time.perf_counter() - start
        finally:
            await client.close()
    truth = [names[int(y)] for y in data.y_test]
    lat = np.array(latencies) * 1000
    return Classification(
        samples=len(predictions),
        accuracy=float(np.mean([p == t for p, t in zip(predictions, truth, strict=True)])),
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        seconds=seconds,
        model_version=str(version),
    )
