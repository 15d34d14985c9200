"""The benchmarked models, built by the benchmark itself, and the request inputs.

Two models: an MLP (64 -> 256 -> 256 -> 10) and a small CNN ([B,3,32,32] -> 10),
exported with ``torch.onnx.export(dynamo=False)`` and a dynamic batch axis, then
published into a private store as version 1. Inputs come from a fixed seed, so
the floor server, the client and the in-process reference all agree on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODELS = ("mlp", "cnn")
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"mlp": (64,), "cnn": (3, 32, 32)}
INPUT_NAME = "input"
OUTPUT_NAME = "output"
CLASSES = 10
MAX_BATCH = 64


@dataclass(frozen=True)
class BenchModel:
    name: str
    onnx_file: Path
    pool: np.ndarray  # [pool, *shape] float32 request inputs, one row each
    expected: np.ndarray  # [pool, 10] in-process ONNX Runtime outputs, batch 1 each


def _torch_model(name: str) -> object:
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES)
        ).eval()
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 64),
            nn.ReLU(),
            nn.Linear(64, CLASSES),
        ).eval()
    raise ValueError(f"unknown benchmark model {name!r}; expected one of {', '.join(MODELS)}")


def export(name: str, path: Path) -> Path:
    """Export one benchmark model to ONNX with a dynamic batch axis."""
    import torch

    model = _torch_model(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, *INPUT_SHAPES[name])
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        dynamo=False,
    )
    return path


def publish(store: Path, name: str, onnx_file: Path) -> Path:
    """Place the model as ``models/<name>/1/model.onnx`` with a config that batches up to 64 rows."""
    folder = store / "models" / name / "1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(onnx_file.read_bytes())
    config = {"max_batch_size": MAX_BATCH, "dynamic_batching": {"max_queue_delay_microseconds": 0}}
    (store / "models" / name / "config.json").write_text(json.dumps(config))
    return folder


def input_pool(name: str, size: int = 16, seed: int = 0) -> np.ndarray:
    """``size`` distinct batch-1 inputs; requests cycle through them."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((size, *INPUT_SHAPES[name]), dtype=np.float32)


def session(onnx_file: Path, threads: int = 0) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])


def reference_outputs(onnx_file: Path, pool: np.ndarray) -> np.ndarray:
    """In-process ONNX Runtime outputs, one batch-1 run per pool row: what every response must match."""
    sess = session(onnx_file)
    return np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: row[None]})[0] for row in pool])


def prepare(name: str, store: Path, pool_size: int = 16) -> BenchModel:
    """Export (once per store), publish and compute the reference answers of one model."""
    onnx_file = store / "onnx" / f"{name}.onnx"
    if not onnx_file.exists():
        export(name, onnx_file)
    publish(store, name, onnx_file)
    pool = input_pool(name, pool_size)
    return BenchModel(name, onnx_file, pool, reference_outputs(onnx_file, pool))
