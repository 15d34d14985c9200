"""Triton's classification extension: an output asked for with ``class_count`` k comes back as
the top k of its scores, as BYTES strings ``"score:index"`` or ``"score:index:label"``.

A client asks with ``InferRequestedOutput(name, class_count=k)``, which is the output's
``classification`` parameter. Labels come from ``labels.txt``, one per line, in class order: the
version's own (the exporter writes it when the training data names its classes), else one
beside the model's versions. Pure: the worker calls it on the arrays it computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import InvalidArgument

PARAMETER = "classification"
LABELS_FILE = "labels.txt"


def class_counts(request: Any) -> dict[str, int]:
    """Requested output name -> k, for the outputs a request wants classified."""
    out = {}
    for o in request.outputs:
        if PARAMETER not in o.parameters:
            continue
        p = o.parameters[PARAMETER]
        kind = p.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param"):
            raise InvalidArgument(f"output {o.name!r}: class_count must be an integer, got a {kind}")
        k = int(getattr(p, kind))
        if k <= 0:
            raise InvalidArgument(f"output {o.name!r}: class_count must be at least 1, got {k}")
        out[o.name] = k
    return out


def check_count(name: str, k: int, classes: int) -> None:
    """``classes`` is the output's last dimension (-1 when the graph leaves it open)."""
    if classes > 0 and k > classes:
        raise InvalidArgument(f"output {name!r}: class_count {k} is more than its {classes} classes")


def top_k(name: str, scores: np.ndarray, k: int, labels: Sequence[str] = ()) -> np.ndarray:
    """[..., classes] scores -> [..., k] BYTES, best first; ties go to the lower index."""
    if scores.ndim == 0 or scores.dtype.kind not in "fiub":
        raise InvalidArgument(f"output {name!r} is not a tensor of scores and cannot be classified")
    classes = scores.shape[-1]
    check_count(name, k, classes)
    flat = scores.reshape(-1, classes)
    order = np.argsort(-flat.astype(np.float64), axis=1, kind="stable")[:, :k]
    out = np.empty(order.shape, dtype=np.object_)
    for r, row in enumerate(order):
        for j, index in enumerate(row):
            text = f"{float(flat[r, index]):f}:{int(index)}"
            if int(index) < len(labels):
                text += f":{labels[int(index)]}"
            out[r, j] = text.encode()
    return out.reshape((*scores.shape[:-1], k))


def read_labels(*folders: Path) -> tuple[str, ...]:
    """Class labels from the first of ``folders`` with a labels file (a version's own, then its
    model's), or none."""
    for folder in folders:
        path = folder / LABELS_FILE
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            return tuple(line.rstrip("\r") for line in text.split("\n") if line.strip())
    return ()


def write_labels(folder: Path, names: Sequence[str]) -> Path:
    """Write ``labels.txt`` (one name per line, in class order) into ``folder``.

    A line break inside a name would shift every later class by one, so breaks become spaces;
    an empty name becomes its index.
    """
    lines = [" ".join(str(n).split("\n")).replace("\r", " ").strip() or str(i) for i, n in enumerate(names)]
    path = folder / LABELS_FILE
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path
