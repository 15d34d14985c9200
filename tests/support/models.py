"""Tiny real models exported by the tests themselves with torch.onnx.export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def export_mlp(path: Path, in_features: int = 8, classes: int = 3, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(in_features, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes)
    ).eval()
    return _export(model, torch.randn(2, in_features), path)


def export_cnn(path: Path, channels: int = 3, size: int = 8, classes: int = 4, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, classes),
    ).eval()
    return _export(model, torch.randn(2, channels, size, size), path)


def _export(model: object, example: object, path: Path) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        dynamo=False,
    )
    return path


def publish(store_root: Path, model: str, version: int, onnx_file: Path, config: dict | None = None) -> Path:
    """Place an ONNX file as ``models/<model>/<version>/model.onnx`` (tests write the store directly)."""
    folder = store_root / "models" / model / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(onnx_file.read_bytes())
    if config is not None:
        (store_root / "models" / model / "config.json").write_text(json.dumps(config))
    return folder


def ort_run(onnx_file: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def export_slow(path: Path, width: int = 256, rows: int = 512, depth: int = 24) -> Path:
    """A model that takes a noticeable time per row (a chain of matmuls), for queue and drain tests."""
    import torch

    class Slow(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(width, width) / width**0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.unsqueeze(1).expand(-1, rows, -1)
            for _ in range(depth):
                h = torch.tanh(h @ self.w)
            return h.mean(1)

    return _export(Slow().eval(), torch.randn(2, width), path)


def export_string_models(folder: Path) -> dict[str, Path]:
    """Two ONNX graphs with STRING tensors, built with onnx.helper (torch has no strings):
    ``parse``: text [batch, 1] STRING -> Cast to INT64 -> + 1 -> number [batch, 1] INT64, the
    Triton example's shape (a warm-up on empty strings fails its Cast);
    ``echo``: text [batch, 2] STRING -> Identity -> same STRING [batch, 2]."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    parse = helper.make_graph(
        [
            helper.make_node("Cast", ["text"], ["n"], to=TensorProto.INT64),
            helper.make_node("Add", ["n", "one"], ["number"]),
        ],
        "parse",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 1])],
        [helper.make_tensor_value_info("number", TensorProto.INT64, ["batch", 1])],
        initializer=[one],
    )
    echo = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])],
        "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 2])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["batch", 2])],
    )
    out = {}
    for graph in (parse, echo):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        out[graph.name] = folder / f"{graph.name}.onnx"
        onnx.save(model, str(out[graph.name]))
    return out


def export_add_sub(path: Path, width: int = 16, datatype: str = "INT32") -> Path:
    """Triton's ``simple`` model (INPUT0, INPUT1 -> OUTPUT0 = sum, OUTPUT1 = difference); the
    benchmark builds the same graph, so it lives there (benchmarks never import tests)."""
    from benchmarks.shm import export_add_sub as build

    return build(path, width, datatype)


def export_bert_shaped(path: Path) -> Path:
    """A graph with a BERT's three inputs (``input_ids``, ``attention_mask``, ``token_type_ids``,
    INT64 ``[batch, sequence]``) that shows what it was fed: ``counts`` [batch, 3] FP32 holds each
    row's sum of mask, of ids under the mask, and of token types."""
    import onnx
    from onnx import TensorProto, helper

    names = ("input_ids", "attention_mask", "token_type_ids")
    nodes = [
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["kept"]),
        *(
            helper.make_node("Cast", [n], [f"{n}_f"], to=TensorProto.FLOAT)
            for n in ("attention_mask", "kept")
        ),
        helper.make_node("Cast", ["token_type_ids"], ["types_f"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["attention_mask_f", "kept_f", "types_f"], ["stacked"], axis=1),
        helper.make_node("Reshape", ["stacked", "shape"], ["rows"]),
        helper.make_node("ReduceSum", ["rows", "axes"], ["counts"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "bert_shaped",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in names],
        [helper.make_tensor_value_info("counts", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            helper.make_tensor("shape", TensorProto.INT64, [3], [0, 3, -1]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path
