"""Stateful sequences: steps of different sequences batched together, against one step per run.

``python -m benchmarks.sequences`` exports the zoo's LSTM text classifier in its
piece-at-a-time form (``ferry.zoo.LSTMTextStep``) and serves it from one worker under two
names with the same graph and state declaration: ``batched`` lets the batcher stack steps of
different sequences into one run (Ferry's sequence batching), ``alone`` cuts every batch to one
row (``preferred_batch_size: [1]``), as a server without sequence batching runs them. For each
concurrency (live sequences at once), each name gets the same bounded load: every client reads
texts token by token over tritonclient.aio, one sequence after another, and every text's last
answer is checked against the whole-text torch model. It prints one JSON line per point and the
batched/alone throughput ratios.
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

LSTM_STATES = {"h_in": "h_out", "c_in": "c_out"}
VOCAB, CLASSES = 200, 4


def export_lstm_step(path: Path, vocab: int = 50, classes: int = 4, hidden: int = 16, seed: int = 0) -> Any:
    """The zoo's LSTM text classifier as a one-piece-at-a-time graph (``LSTMTextStep``); returns the
    whole-text torch model, the reference a sequence's last answer must match."""
    import torch

    from ferry.zoo import LSTMText, LSTMTextStep

    torch.manual_seed(seed)
    text = LSTMText(vocab, classes, embed_dim=max(8, hidden // 2), hidden=hidden, layers=1).eval()
    state = torch.zeros(2, 1, hidden)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = ["tokens", *LSTM_STATES]
    outputs = ["logits", *LSTM_STATES.values()]
    torch.onnx.export(
        LSTMTextStep(text).eval(),
        (torch.zeros(2, 1, dtype=torch.int64), state, state),
        str(path),
        input_names=names,
        output_names=outputs,
        dynamic_axes={n: {0: "batch", **({1: "piece"} if n == "tokens" else {})} for n in names + outputs},
        dynamo=False,
    )
    return text


def lstm_sequence_config(
    hidden: int = 16, max_sequences: int = 64, idle_us: int = 5_000_000, **oldest: Any
) -> dict[str, Any]:
    """config.json for ``export_lstm_step``: its (h, c) as implicit state, zeros to start."""
    zeros = {"name": "zeros", "data_type": "TYPE_FP32", "dims": [1, hidden], "zero_data": True}
    states = [
        {
            "input_name": i,
            "output_name": o,
            "data_type": "TYPE_FP32",
            "dims": [1, hidden],
            "initial_state": [zeros],
        }
        for i, o in LSTM_STATES.items()
    ]
    return {
        "max_batch_size": 32,
        "sequence_batching": {
            "max_sequence_idle_microseconds": idle_us,
            "oldest": {"max_candidate_sequences": max_sequences, **oldest},
            "state": states,
        },
    }


def _publish(root: Path, name: str, onnx_file: Path, config: dict[str, Any]) -> None:
    folder = root / "models" / name / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(onnx_file.read_bytes())
    (root / "models" / name / "config.json").write_text(json.dumps(config))


async def measure(
    address: str,
    model: str,
    texts: list[list[int]],
    expected: list[np.ndarray],
    concurrency: int,
    seconds: float,
) -> dict[str, Any]:
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(address)
    latencies: list[int] = []
    steps = 0
    stop = time.monotonic() + seconds
    next_text = iter(range(len(texts)))

    async def reader(lane: int) -> None:
        nonlocal steps
        for t in next_text:  # shared: each text is read once, by whichever lane is free
            tokens = texts[t]
            for i, token in enumerate(tokens):
                piece = tc.InferInput("tokens", [1, 1], "INT64")
                piece.set_data_from_numpy(np.array([[token]], np.int64))
                started = time.perf_counter_ns()
                answer = await client.infer(
                    model,
                    [piece],
                    sequence_id=f"{lane}-{t}",
                    sequence_start=i == 0,
                    sequence_end=i == len(tokens) - 1,
                )
                latencies.append(time.perf_counter_ns() - started)
                steps += 1
            np.testing.assert_allclose(answer.as_numpy("logits"), expected[t], atol=1e-4, rtol=1e-3)
            if time.monotonic() > stop:
                return

    began = time.perf_counter()
    try:
        await asyncio.gather(*(reader(n) for n in range(concurrency)))
    finally:
        await client.close()
    elapsed = time.perf_counter() - began
    return {"model": model, "concurrency": concurrency, "steps": steps, "steps_per_s": steps / elapsed} | (
        latency_summary(latencies)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sequences", description=__doc__)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 16, 64], help="live sequences at once"
    )
    parser.add_argument("--tokens", type=int, default=16, help="tokens per text (steps per sequence)")
    parser.add_argument("--texts", type=int, default=256, help="most texts per point")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=6.0, help="longest time per point")
    args = parser.parse_args(argv)

    import torch

    rng = np.random.default_rng(0)
    texts = [list(map(int, rng.integers(0, VOCAB, args.tokens))) for _ in range(args.texts)]
    with tempfile.TemporaryDirectory(prefix="ferry-seq-") as tmp:
        root = Path(tmp) / "store"
        onnx_file = Path(tmp) / "step.onnx"
        text = export_lstm_step(onnx_file, VOCAB, CLASSES, hidden=args.hidden)
        with torch.no_grad():
            expected = [text(torch.tensor([t])).numpy() for t in texts]
        most = max(args.concurrency)
        _publish(root, "batched", onnx_file, lstm_sequence_config(args.hidden, max_sequences=most))
        alone = lstm_sequence_config(args.hidden, max_sequences=most, preferred_batch_size=[1])
        _publish(root, "alone", onnx_file, alone)
        worker = ServerProcess.ferry("worker", "worker", "--store", str(root), "--port", "0").start()
        try:
            rows = []
            for c in args.concurrency:
                point = {}
                for model in ("alone", "batched"):
                    row = asyncio.run(measure(worker.address, model, texts, expected, c, args.seconds))
                    print(json.dumps(row), flush=True)
                    point[model] = row
                rows.append(point)
        finally:
            worker.stop()
    print("\n| live sequences | one step per run | steps batched | ratio |\n|---|---|---|---|")
    for point in rows:
        a, b = point["alone"], point["batched"]
        ratio = b["steps_per_s"] / a["steps_per_s"]
        print(
            f"| {a['concurrency']} | {a['steps_per_s']:.0f} steps/s, p50 {a['p50_ms']:.2f} ms "
            f"| {b['steps_per_s']:.0f} steps/s, p50 {b['p50_ms']:.2f} ms | {ratio:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
