"""Datasets rebuilt from their spec alone, shared by the trainer and the exporter.

A checkpoint's ``spec.json`` carries the ``dataset`` entry the job trained on:

    {"name": "digits", "upload": "", "params": {}, "test_fraction": 0.2, "seed": 0}

``load_dataset(entry, store=...)`` turns it back into the same arrays, train and
held-out test split included, in any process: the trainer trains on the train
split and evaluates on the test split; the exporter draws its parity samples
from the same test split without importing the trainer or torch. Everything
here is numpy and scikit-learn, and deterministic given the entry's seed.

Sources: scikit-learn's bundled ``digits`` (images ``[1, 8, 8]``, or ``[64]``
with ``{"flatten": true}``), ``iris``, ``wine``, ``breast_cancer``; generated
``synthetic_classification``, ``synthetic_regression`` and ``synthetic_tokens``
(token-id sequences for the text models); or an uploaded ``.npz`` (arrays ``x``,
``y``) / ``.csv`` (label in the last column) under ``datasets/`` in the store.
Tabular features are standardised with the train split's mean and deviation.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import InvalidArgument

BUILTIN = ("digits", "iris", "wine", "breast_cancer")
SYNTHETIC = ("synthetic_classification", "synthetic_regression", "synthetic_tokens")
UPLOAD_FORMATS = ("npz", "csv")


@dataclass
class Dataset:
    """Arrays plus what a model needs to know about them (shapes exclude the batch axis)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str  # classification | regression
    classes: int  # distinct labels; 0 for regression
    outputs: int  # model outputs: classes, or regression targets
    vocab_size: int = 0  # token datasets: ids lie in [0, vocab_size)
    # Class index -> name, when the source names its classes (a served model's labels.txt).
    class_names: list[str] = field(default_factory=list)

    @property
    def feature_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])

    @property
    def datatype(self) -> str:
        return "INT64" if self.x_train.dtype == np.int64 else "FP32"

    @property
    def input_shape(self) -> list[int]:
        """The served input shape: token sequences take any length (-1)."""
        return [-1] if self.vocab_size else self.feature_shape


def dataset_names() -> list[str]:
    return [*BUILTIN, *SYNTHETIC]


def _params(entry: dict[str, Any]) -> dict[str, Any]:
    params = entry.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"dataset params must be a JSON object, not {type(params).__name__}")
    return params


def _int_param(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidArgument(f"dataset param {key!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _sklearn(name: str, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A scikit-learn dataset, with its class names by target value."""
    from sklearn import datasets as skd

    if name == "digits":
        bunch = skd.load_digits()
        x = (bunch.data / 16.0).astype(np.float32)
        if not params.get("flatten"):
            x = x.reshape(-1, 1, 8, 8)
        return x, bunch.target.astype(np.int64), [str(n) for n in bunch.target_names]
    loaders: dict[str, Callable[..., Any]] = {
        "iris": skd.load_iris,
        "wine": skd.load_wine,
        "breast_cancer": skd.load_breast_cancer,
    }
    bunch = loaders[name]()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64), [str(n) for n in bunch.target_names]


def _synthetic(name: str, params: dict[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray, str, int]:
    samples = _int_param(params, "samples", 2000, 10, 10_000_000)
    if name == "synthetic_classification":
        from sklearn.datasets import make_classification

        features = _int_param(params, "features", 20, 2, 100_000)
        classes = _int_param(params, "classes", 3, 2, 10_000)
        informative = min(
            features, max(2, _int_param(params, "informative", features // 2 or 2, 1, features))
        )
        x, y = make_classification(
            n_samples=samples,
            n_features=features,
            n_informative=informative,
            n_redundant=0,
            n_classes=classes,
            n_clusters_per_class=1,
            random_state=seed,
        )
        return x.astype(np.float32), y.astype(np.int64), "classification", 0
    if name == "synthetic_regression":
        from sklearn.datasets import make_regression

        features = _int_param(params, "features", 10, 1, 100_000)
        targets = _int_param(params, "targets", 1, 1, 10_000)
        noise = float(params.get("noise", 0.1))
        x, y = make_regression(
            n_samples=samples, n_features=features, n_targets=targets, noise=noise, random_state=seed
        )
        y = y.reshape(samples, targets) / (np.std(y) or 1.0)
        return x.astype(np.float32), y.astype(np.float32), "regression", 0
    # synthetic_tokens: each class owns a band of the vocabulary; a sequence is noise
    # tokens with a share of its class's tokens mixed in, so the label is learnable.
    seq_len = _int_param(params, "seq_len", 16, 2, 100_000)
    vocab = _int_param(params, "vocab", 64, 4, 10_000_000)
    classes = _int_param(params, "classes", 4, 2, vocab - 1)
    signal = float(params.get("signal", 0.4))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, samples)
    x = rng.integers(1, vocab, (samples, seq_len))  # 0 stays free for padding
    band = (vocab - 1) // classes
    keyword = 1 + y[:, None] * band + rng.integers(0, band, (samples, seq_len))
    x = np.where(rng.random((samples, seq_len)) < signal, keyword, x)
    return x.astype(np.int64), y.astype(np.int64), "classification", vocab


def read_upload(data: bytes, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse an uploaded file: ``.npz`` with ``x`` and ``y`` (no pickles), or a numeric CSV."""
    if fmt == "npz":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                if "x" not in npz.files or "y" not in npz.files:
                    raise InvalidArgument(f"npz dataset must hold arrays 'x' and 'y', it holds {npz.files}")
                x, y = npz["x"], npz["y"]
        except InvalidArgument:
            raise
        except Exception as err:
            raise InvalidArgument(f"not a readable npz file: {err}") from err
    elif fmt == "csv":
        text = data.decode("utf-8", errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            float(lines[0].split(",")[0])
        except (ValueError, IndexError):
            lines = lines[1:]  # a header row
        try:
            table = np.loadtxt(lines, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as err:
            raise InvalidArgument(f"CSV dataset must be numeric with the label last: {err}") from err
        if table.shape[1] < 2:
            raise InvalidArgument("CSV dataset needs at least one feature column and a label column")
        x, y = table[:, :-1], table[:, -1]
        if np.all(y == np.round(y)):
            y = y.astype(np.int64)
    else:
        raise InvalidArgument(f"unknown dataset format {fmt!r}; use one of {', '.join(UPLOAD_FORMATS)}")
    if x.ndim < 2 or len(x) != len(y) or len(x) < 2:
        raise InvalidArgument(
            f"dataset x must be [samples, features...] with one label per sample: x {list(x.shape)}, "
            f"y {list(y.shape)}"
        )
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "fiu":
        raise InvalidArgument(f"dataset arrays must be numeric, got x {x.dtype} and y {y.dtype}")
    return x, y


def find_upload(store_root: str | Path, name: str) -> Path:
    from ferry.core.store import validate_name

    folder = Path(store_root) / "datasets"
    validate_name(name, "dataset name")
    for fmt in UPLOAD_FORMATS:
        path = folder / f"{name}.{fmt}"
        if path.is_file():
            return path
    raise InvalidArgument(f"unknown uploaded dataset {name!r}: the store holds no {name}.npz or {name}.csv")


def _uploaded(name: str, store_root: str | Path | None, task: str) -> tuple[np.ndarray, np.ndarray, str, int]:
    if store_root is None:
        raise InvalidArgument(f"dataset upload {name!r} needs the store")
    path = find_upload(store_root, name)
    x, y = read_upload(path.read_bytes(), path.suffix[1:])
    if x.dtype.kind in "iu":
        vocab = int(x.max()) + 1
        return x.astype(np.int64), y, task, vocab
    return x.astype(np.float32), y, task, 0


def _class_names(labels: np.ndarray, names: list[str] | None) -> list[str]:
    """Names of the classes a model predicts, by class index (the rank of the label value).

    An uploaded dataset's labels are renumbered 0..k-1 in sorted order, so its names are the
    values as written (``7``, not ``7.0``): that is how a client learns which value an index is.
    """
    if names is None:
        return [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in labels.tolist()]
    if not names:
        return []
    return [names[int(v)] for v in labels.tolist()]


def _standardise(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = x_train.mean(axis=0, keepdims=True)
    std = x_train.std(axis=0, keepdims=True)
    std = np.where(std < 1e-8, 1.0, std)
    return [((a - mean) / std).astype(np.float32) for a in (x_train, *others)]


def load_dataset(entry: dict[str, Any], seed: int | None = None, store: str | Path | None = None) -> Dataset:
    """Rebuild the dataset ``entry`` describes (see the module docstring); same entry, same arrays.

    ``seed`` overrides the entry's own; ``store`` is the store root, needed for uploads.
    """
    name = str(entry.get("name") or "")
    upload = str(entry.get("upload") or "")
    params = _params(entry)
    seed = int(entry.get("seed", 0) if seed is None else seed)
    task = str(entry.get("task") or "")  # only uploads take it; the other sources decide their own
    test_fraction = float(entry.get("test_fraction", 0.2))
    if not 0.0 < test_fraction < 1.0:
        raise InvalidArgument(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    vocab = 0
    names: list[str] | None = None  # by label value; None = the values themselves, [] = unnamed
    if upload:
        x, y, task, vocab = _uploaded(upload, store, task or "classification")
        name = f"upload:{upload}"
    elif name in BUILTIN:
        x, y, names = _sklearn(name, params)
        task = "classification"
    elif name in SYNTHETIC:
        x, y, task, vocab = _synthetic(name, params, seed)
        names = []
    else:
        raise InvalidArgument(
            f"unknown dataset {name!r}; built-in: {', '.join(dataset_names())}, or an uploaded one"
        )
    if task == "classification":
        if y.dtype.kind == "f" and not np.all(y == np.round(y)):
            raise InvalidArgument(f"dataset {name!r} has non-integer labels; use task 'regression'")
        labels, y = np.unique(y.reshape(len(y), -1)[:, 0], return_inverse=True)
        y = y.astype(np.int64)
        classes = outputs = len(labels)
        class_names = _class_names(labels, names)
    else:
        y = y.astype(np.float32).reshape(len(y), -1)
        classes, outputs, class_names = 0, y.shape[1], []
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    x_train, x_test = x[train], x[test]
    if x.dtype != np.int64 and name != "digits":
        x_train, x_test = _standardise(x_train, x_test)
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y[train],
        x_test=x_test,
        y_test=y[test],
        task=task,
        classes=classes,
        outputs=outputs,
        vocab_size=vocab,
        class_names=class_names,
    )
