"""Raw text against token ids: what tokenizing in the worker costs, in process and served.

``python -m benchmarks.text`` measures, in one run on one machine:

- in process: the tokenizer and ONNX Runtime on one text and on a batch of 32, timed apart;
- served at ``--concurrency`` (default 32) through a worker and through a gateway in front of it:
  each request one text of the built-in ``topics`` corpus, sent as a BYTES text, and the same
  text sent as the token ids the version's own tokenizer gives (tokenized by the client,
  outside the timing). Both paths meet the same ``sequence_buckets``. The gateway's cache is
  off, so every request reaches the worker.

The model is a published version (``--store`` and ``--model``), or by default a random-weight
``transformer_text`` with a WordPiece tokenizer fitted on the corpus: the cost of text does not
depend on what the weights learned. With ``--trained`` a real trainer and exporter first train
``ferry demo --text``'s transformer and export it in fp32, fp16 and int8 (dynamic quantisation);
each precision is served, the held-out texts are classified from strings through the worker,
and the run reports each one's accuracy and its agreement with fp32 before the speed figures.
Each point stops after ``--seconds`` or ``--requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.procs import ServerProcess
from benchmarks.stats import latency_summary
from ferry.core.text import TOKENIZER_FILE, TextEncoder, TokenizerConfig, fit_tokenizer, read_tokenizer

MAX_LENGTH = 64


def corpus(samples: int) -> list[str]:
    from ferry.datasets import load_dataset

    data = load_dataset({"name": "topics", "params": {"samples": samples}, "seed": 0})
    return [*data.texts_train, *data.texts_test]


def build_store(root: Path, texts: Sequence[str]) -> str:
    """A random-weight text model with a tokenizer fitted on ``texts``, published as ``text``."""
    from benchmarks.buckets import VOCAB, export_transformer

    folder = root / "models" / "text" / "1"
    folder.mkdir(parents=True)
    export_transformer(folder / "model.onnx", max_len=MAX_LENGTH)
    tokenizer = fit_tokenizer(texts, TokenizerConfig(vocab_size=min(VOCAB, 4000)))
    (folder / TOKENIZER_FILE).write_text(tokenizer.to_str(), encoding="utf-8")
    config = {
        "max_batch_size": 32,
        "dynamic_batching": {},
        "text": {"max_length": MAX_LENGTH},
        "sequence_buckets": {"max_length": MAX_LENGTH},
    }
    (root / "models" / "text" / "config.json").write_text(json.dumps(config))
    return "text"


PRECISIONS = ("fp32", "fp16", "int8")


def train_and_export(root: Path, epochs: int) -> dict[str, Any]:
    """The text demo's model trained on a real trainer and exported three ways (models
    ``text-fp32`` ...); returns each export's gate summary."""
    from ferry.client.exporter import SyncExporterClient
    from ferry.client.trainer import SyncTrainerClient, state_name
    from ferry.demo import text_spec

    trainer = ServerProcess.ferry("trainer", "trainer", "--store", str(root), "--port", "0").start()
    exporter = ServerProcess.ferry("exporter", "exporter", "--store", str(root), "--port", "0").start()
    gates: dict[str, Any] = {}
    try:
        with SyncTrainerClient(trainer.address) as client:
            began = time.monotonic()
            job = client.submit(text_spec(epochs), name="bench-text")
            for event in client.watch(job.id):
                if event.kind == "epoch":
                    p = event.job.progress
                    print(f"  epoch {p.epoch}/{p.epochs} val_accuracy {p.metrics.get('val_accuracy', 0):.3f}")
            job = client.get(job.id)
            if state_name(job) != "SUCCEEDED":
                raise SystemExit(f"training failed: {job.error}")
            gates["train_s"] = time.monotonic() - began
            gates["test_accuracy_torch"] = dict(job.test_metrics).get("test_accuracy")
        with SyncExporterClient(exporter.address) as client:
            for precision in PRECISIONS:
                report = client.export(job.id, f"text-{precision}", precision=precision)
                if not report.published:
                    raise SystemExit(f"{precision} export failed: {report.failure}")
                pooled = report.meta["parity"].get("pooled", {}).get("logits", {})
                gates[precision] = {"bytes": report.meta["files"]["model_bytes"], **pooled}
    finally:
        exporter.stop()
        trainer.stop()
    return gates


async def held_out_accuracy(address: str, texts: Sequence[str], truth: Sequence[int]) -> dict[str, Any]:
    """Each precision's predictions on the held-out texts, sent as strings in batches of 32."""
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(address)
    predicted: dict[str, np.ndarray] = {}
    try:
        for precision in PRECISIONS:
            rows = []
            for start in range(0, len(texts), 32):
                chunk = [[t.encode()] for t in texts[start : start + 32]]
                tensor = tc.InferInput("text", [len(chunk), 1], "BYTES")
                tensor.set_data_from_numpy(np.array(chunk, dtype=object))
                answer = await client.infer(f"text-{precision}", [tensor])
                rows.append(answer.as_numpy("logits").argmax(axis=1))
            predicted[precision] = np.concatenate(rows)
    finally:
        await client.close()
    labels = np.asarray(truth)
    return {
        p: {
            "accuracy": float(np.mean(predicted[p] == labels)),
            "agreement_with_fp32": float(np.mean(predicted[p] == predicted["fp32"])),
        }
        for p in PRECISIONS
    }


def _median_ms(run: Callable[[], object], runs: int, seconds: float) -> float:
    times = []
    stop = time.monotonic() + seconds
    for _ in range(runs):
        began = time.perf_counter_ns()
        run()
        times.append(time.perf_counter_ns() - began)
        if time.monotonic() > stop:
            break
    return statistics.median(times) / 1e6


def in_process(version_dir: Path, texts: Sequence[str], max_length: int, runs: int) -> list[dict[str, Any]]:
    import onnxruntime as ort

    encoder = TextEncoder(read_tokenizer(version_dir / TOKENIZER_FILE), max_length)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = []
    for batch in (1, 32):
        chunk = list(texts[:batch])
        ids = encoder.encode(chunk).ids
        tokenize = _median_ms(lambda c=chunk: encoder.encode(c), runs, 10)
        infer = _median_ms(lambda i=ids: session.run(None, {name: i}), runs, 10)
        rows.append({"batch": batch, "tokenize_ms": tokenize, "onnx_ms": infer, "total_ms": tokenize + infer})
    return rows


async def served(
    address: str,
    model: str,
    texts: Sequence[str],
    ids: Sequence[np.ndarray],
    raw_text: bool,
    c: int,
    seconds: float,
) -> dict[str, Any]:
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(address)
    latencies: list[int] = []
    stop = time.monotonic() + seconds
    queue = iter(range(len(texts)))

    async def lane() -> None:
        for i in queue:
            if raw_text:
                tensor = tc.InferInput("text", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[texts[i].encode()]], dtype=object))
            else:
                tensor = tc.InferInput("input", list(ids[i].shape), "INT64")
                tensor.set_data_from_numpy(ids[i])
            began = time.perf_counter_ns()
            await client.infer(model, [tensor])
            latencies.append(time.perf_counter_ns() - began)
            if time.monotonic() > stop:
                return

    try:
        began = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(c)))
        elapsed = time.perf_counter() - began
    finally:
        await client.close()
    return {"requests": len(latencies), "req_per_s": len(latencies) / elapsed} | latency_summary(latencies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.text", description=__doc__)
    parser.add_argument("--store", type=Path, default=None, help="a store with a published text model")
    parser.add_argument("--model", default="", help="its name (with --store)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3000, help="most requests per point")
    parser.add_argument("--seconds", type=float, default=8.0, help="longest time per point")
    parser.add_argument("--runs", type=int, default=200, help="most runs per in-process figure")
    parser.add_argument("--trained", action="store_true", help="train and export the text demo's model first")
    parser.add_argument("--epochs", type=int, default=8, help="with --trained")
    args = parser.parse_args(argv)
    texts = corpus(max(args.requests, 64))
    accuracy: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ferry-text-") as tmp:
        root = args.store or Path(tmp) / "store"
        if args.trained:
            gates = train_and_export(root, args.epochs)
            print(json.dumps({"gates": gates}), flush=True)
            model = "text-fp32"
        else:
            model = args.model if args.store else build_store(root, texts)
        version_dir = max(
            (p for p in (root / "models" / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        config = json.loads((root / "models" / model / "config.json").read_text())
        max_length = int(config.get("text", {}).get("max_length", MAX_LENGTH))
        local = in_process(version_dir, texts, max_length, args.runs)
        for row in local:
            print(json.dumps({"in_process": row}), flush=True)
        encoder = TextEncoder(read_tokenizer(version_dir / TOKENIZER_FILE), max_length)
        ids = [np.asarray([row], dtype=np.int64) for row in encoder.token_ids(texts[: args.requests])]
        worker = ServerProcess.ferry("worker", "worker", "--store", str(root), "--port", "0").start()
        gateway = None
        results: dict[tuple[str, str], dict[str, Any]] = {}
        try:
            gateway = ServerProcess.ferry(
                "gateway", "gateway", "--workers", worker.address, "--port", "0", "--http-port", "0",
                "--host", "127.0.0.1", "--no-cache-enabled",
            ).start()  # fmt: skip
            if args.trained:
                from ferry.datasets import load_dataset
                from ferry.demo import TEXT_DATASET

                data = load_dataset({**TEXT_DATASET, "seed": 0})
                accuracy = asyncio.run(held_out_accuracy(worker.address, data.texts_test, list(data.y_test)))
                print(json.dumps({"held_out": len(data.texts_test), "accuracy": accuracy}), flush=True)
            hops = {"worker": worker.address, "gateway": gateway.address}
            for hop, address in hops.items():
                for kind in ("token ids", "raw text"):
                    row = asyncio.run(
                        served(
                            address, model, texts[: args.requests], ids, kind == "raw text",
                            args.concurrency, args.seconds,
                        )
                    )  # fmt: skip
                    results[(hop, kind)] = row
                    print(
                        json.dumps({"hop": hop, "input": kind, "concurrency": args.concurrency} | row),
                        flush=True,
                    )
        finally:
            if gateway is not None:
                gateway.stop()
            worker.stop()
    if accuracy:
        print("\n| precision | held-out accuracy | agreement with fp32 |\n|---|---|---|")
        for precision, row in accuracy.items():
            print(f"| {precision} | {row['accuracy']:.4f} | {row['agreement_with_fp32']:.4f} |")
    print("\n| in process | tokenize | ONNX Runtime | total |\n|---|---|---|---|")
    for row in local:
        print(
            f"| batch {row['batch']} | {row['tokenize_ms']:.3f} ms | {row['onnx_ms']:.3f} ms "
            f"| {row['total_ms']:.3f} ms |"
        )
    print(f"\n| c={args.concurrency} | token ids | raw text | text / ids |\n|---|---|---|---|")
    for hop in ("worker", "gateway"):
        a, b = results[(hop, "token ids")], results[(hop, "raw text")]
        print(
            f"| {hop} | {a['req_per_s']:.0f} req/s, p50 {a['p50_ms']:.1f} ms "
            f"| {b['req_per_s']:.0f} req/s, p50 {b['p50_ms']:.1f} ms "
            f"| {b['req_per_s'] / a['req_per_s']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
