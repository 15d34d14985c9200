"""``ferry infer``: send inputs from a file to a gateway or worker and print the outputs.

Inputs come from ``.npy`` (the model's single input), ``.npz`` (arrays named after
the inputs) or ``.json`` (``{"input": [[...]]}``, cast to the model's datatype).
``.npy``/``.npz`` arrays go as they are, so a wrong shape or dtype gets the
server's own message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ferry.cli.connect import add_connection_flags, resolve
from ferry.core.errors import InvalidArgument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="run one inference request from a .npy/.npz/.json file")
    p.add_argument("model", help="model name")
    p.add_argument("inputs", type=Path, help="a .npy, .npz or .json file")
    p.add_argument("--version", default="", help="model version (default: the latest ready)")
    add_connection_flags(p, "gateway")
    p.add_argument(
        "--top-k", type=int, default=0, help="print the k most likely classes per row instead of raw outputs"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up")
    p.set_defaults(handler=_infer)


def read_inputs(path: Path, input_names: list[str], datatypes: dict[str, str]) -> dict[str, np.ndarray]:
    from ferry.core.codec import numpy_dtype

    if not path.is_file():
        raise InvalidArgument(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if len(input_names) != 1:
            raise InvalidArgument(f"the model has inputs {input_names}; give them in a .npz or .json file")
        return {input_names[0]: np.load(path, allow_pickle=False)}
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if len(arrays) == 1 and len(input_names) == 1:
            return {input_names[0]: next(iter(arrays.values()))}
        return arrays
    if suffix == ".json":
        values = json.loads(path.read_text())
        if isinstance(values, list) and len(input_names) == 1:
            values = {input_names[0]: values}
        if not isinstance(values, dict):
            raise InvalidArgument(f"{path}: expected an object mapping input names to nested lists")
        return {k: np.asarray(v, dtype=numpy_dtype(datatypes.get(k, "FP32"))) for k, v in values.items()}
    raise InvalidArgument(f"{path}: unsupported input file type {suffix!r} (use .npy, .npz or .json)")


def top_k(scores: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """The k best classes of each row with softmax probabilities."""
    scores = scores.reshape(len(scores), -1).astype(np.float64)
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs = exp / exp.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[(int(c), float(probs[r, c])) for c in row] for r, row in enumerate(order)]


def _infer(args: argparse.Namespace) -> int:
    from ferry.client.inference import SyncInferenceClient

    target = resolve(args, "gateway", key_kind="infer")
    with SyncInferenceClient(target.address, **target.options) as client:
        meta = client.model_metadata(args.model, args.version)
        names = [t.name for t in meta.inputs]
        inputs = read_inputs(args.inputs, names, {t.name: t.datatype for t in meta.inputs})
        result = client.infer(args.model, inputs, version=args.version, timeout=args.timeout)
    if args.top_k:
        first = next(iter(result.values()))
        for row, classes in enumerate(top_k(first, args.top_k)):
            print(f"row {row}: " + ", ".join(f"class {c} ({p:.3f})" for c, p in classes))
    else:
        out = {name: array.tolist() for name, array in result.items()}
        json.dump({"model": args.model, "version": result.model_version, "outputs": out}, sys.stdout)
        print()
    return 0
