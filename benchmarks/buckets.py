"""Mixed-length text: requests padded to shared buckets, against batching only exact lengths.

``python -m benchmarks.buckets`` exports the zoo's ``transformer_text`` (random weights; it
masks padding, so a padded text gives the unpadded text's logits) and serves it from one worker
under two names: ``exact`` batches only requests of the same length, as before, and
``bucketed`` pads each request to the smallest of ``sequence_buckets`` that fits. Every client
sends one text of a random length from ``--min-len`` to ``--max-len`` per request over
tritonclient.aio, the same texts to both names; every answer is checked against the exact
model's own answer to that text. It prints one JSON line per point and the bucketed/exact ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.procs import ServerProcess
from benchmarks.stats import latency_summary

VOCAB, CLASSES = 1000, 4


def export_transformer(
    path: Path, width: int = 64, layers: int = 2, max_len: int = 128, seed: int = 0
) -> Path:
    """``transformer_text`` with random weights as ONNX: tokens ``[batch, sequence]`` -> logits."""
    import torch

    from ferry.zoo import TransformerText

    torch.manual_seed(seed)
    model = TransformerText(VOCAB, CLASSES, width=width, layers=layers, heads=4, max_len=max_len).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.ones(2, 8, dtype=torch.int64),),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch", 1: "sequence"}, "output": {0: "batch"}},
            dynamo=False,
        )
    return path


def bucket_configs(max_len: int, **held: Any) -> dict[str, dict[str, Any]]:
    """config.json of both names; ``held`` adds dynamic_batching knobs to both."""
    batching = {"dynamic_batching": dict(held)}
    return {
        "exact": {"max_batch_size": 32, **batching},
        "bucketed": {"max_batch_size": 32, **batching, "sequence_buckets": {"max_length": max_len}},
    }


def texts(n: int, low: int, high: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, (1, int(rng.integers(low, high + 1)))).astype(np.int64) for _ in range(n)]


async def measure(
    address: str,
    model: str,
    items: list[np.ndarray],
    expected: list[np.ndarray] | None,
    c: int,
    seconds: float,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(address)
    answers: list[np.ndarray] = [np.empty(0)] * len(items)
    latencies: list[int] = []
    stop = time.monotonic() + seconds
    queue = iter(range(len(items)))

    async def lane() -> None:
        for i in queue:
            tokens = tc.InferInput("input", list(items[i].shape), "INT64")
            tokens.set_data_from_numpy(items[i])
            started = time.perf_counter_ns()
            answer = (await client.infer(model, [tokens])).as_numpy("output")
            latencies.append(time.perf_counter_ns() - started)
            answers[i] = answer
            if expected is not None:
                np.testing.assert_allclose(answer, expected[i], atol=1e-4, rtol=1e-4)
            if time.monotonic() > stop:
                return

    async def executions() -> int:
        stats = await client.get_inference_statistics(model, as_json=True)
        return int(stats["model_stats"][0].get("execution_count", 0))

    try:
        before = await executions()
        began = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(c)))
        elapsed = time.perf_counter() - began
        runs = await executions() - before
    finally:
        await client.close()
    row = {
        "model": model,
        "concurrency": c,
        "requests": len(latencies),
        "req_per_s": len(latencies) / elapsed,
        "mean_batch": len(latencies) / runs if runs else float("nan"),
    } | latency_summary(latencies)
    return row, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.buckets", description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--min-len", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000, help="most requests per point")
    parser.add_argument("--seconds", type=float, default=8.0, help="longest time per point")
    args = parser.parse_args(argv)
    items = texts(args.requests, args.min_len, args.max_len)
    with tempfile.TemporaryDirectory(prefix="ferry-buckets-") as tmp:
        root = Path(tmp) / "store"
        onnx_file = export_transformer(Path(tmp) / "tt.onnx", max_len=args.max_len)
        for name, config in bucket_configs(args.max_len).items():
            folder = root / "models" / name / "1"
            folder.mkdir(parents=True)
            (folder / "model.onnx").write_bytes(onnx_file.read_bytes())
            (root / "models" / name / "config.json").write_text(json.dumps(config))
        worker = ServerProcess.ferry("worker", "worker", "--store", str(root), "--port", "0").start()
        rows = []
        try:
            for c in args.concurrency:
                exact, answers = asyncio.run(measure(worker.address, "exact", items, None, c, args.seconds))
                done = [a for a in answers if a.size]
                bucketed, _ = asyncio.run(
                    measure(worker.address, "bucketed", items[: len(done)], done, c, 60)
                )
                for row in (exact, bucketed):
                    print(json.dumps(row), flush=True)
                rows.append((exact, bucketed))
        finally:
            worker.stop()
    print("\n| c | exact lengths | buckets | ratio |\n|---|---|---|---|")
    for exact, bucketed in rows:
        ratio = bucketed["req_per_s"] / exact["req_per_s"]
        print(
            f"| {exact['concurrency']} | {exact['req_per_s']:.0f} req/s, p50 {exact['p50_ms']:.1f} ms "
            f"| {bucketed['req_per_s']:.0f} req/s, p50 {bucketed['p50_ms']:.1f} ms | {ratio:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
