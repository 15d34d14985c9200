"""Running both sides of the gate: torch eager for the reference, ONNX Runtime for the candidate.

Sessions use one CPU thread: the gate compares numbers, and latency figures stay
comparable between exports on a shared machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


def torch_outputs(module: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """The reference: torch eager, fp32, in chunks of ``batch`` rows."""
    import torch

    with torch.no_grad():
        parts = [module(torch.from_numpy(x[i : i + batch])) for i in range(0, len(x), batch)]
    return np.concatenate([p.detach().cpu().numpy() for p in parts]).astype(np.float32)


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_outputs(session: Any, name: str, x: np.ndarray, batch: int) -> np.ndarray:
    parts = [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(parts).astype(np.float32)


def measure_latency(session: Any, name: str, x: np.ndarray, runs: int) -> dict[str, float]:
    """Median ORT latency (ms, one intra-op thread) at batch 1 and batch 32."""
    figures = {}
    for batch in (1, 32):
        rows = np.concatenate([x] * (-(-batch // len(x))))[:batch]
        session.run(None, {name: rows})
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(None, {name: rows})
            times.append((time.perf_counter() - t0) * 1000)
        figures[f"batch_{batch}_ms"] = round(float(np.median(times)), 4)
    return figures
