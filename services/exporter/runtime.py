"""Running both sides of the gate: torch eager for the reference, ONNX Runtime for the candidate.

Sessions use one CPU thread: the gate compares numbers, and latency figures stay
comparable between exports on a shared machine.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import FailedPrecondition

# torch.onnx.export keeps module-level state (opset, "in export" flag); one export at a time.
_TORCH_EXPORT_LOCK = threading.Lock()


def torch_outputs(module: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """The reference: torch eager, fp32, in chunks of ``batch`` rows."""
    import torch

    with torch.no_grad():
        parts = [module(torch.from_numpy(x[i : i + batch])) for i in range(0, len(x), batch)]
    return np.concatenate([p.detach().cpu().numpy() for p in parts]).astype(np.float32)


def torch_to_onnx(
    module: Any, example: np.ndarray, path: Path, opset: int, names: tuple[str, str], axes: dict[int, str]
) -> None:
    """``torch.onnx.export`` with the given dynamic input axes and a dynamic batch on the output;
    a model the converter refuses is the caller's FAILED_PRECONDITION, with the converter's reason."""
    import torch

    inp, out = names
    try:
        with _TORCH_EXPORT_LOCK, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.from_numpy(example),),
                str(path),
                input_names=[inp],
                output_names=[out],
                dynamic_axes={inp: axes, out: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as err:  # the converter's own error types; its reason goes back to the caller
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:600]
        raise FailedPrecondition(f"cannot convert the model to ONNX: {reason}") from err


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
