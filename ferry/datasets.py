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
(token-id sequences for the text models); generated text ``topics`` (``ferry.textcorpus``);
or an uploaded ``.npz`` (arrays ``x``, ``y``) / ``.csv`` (label in the last column) under
``datasets/`` in the store. Tabular features are standardised with the train split's mean and
deviation.

Text: ``topics``, a ``.jsonl`` upload (one object a line with the text and label keys) or a
``.csv`` upload whose header names the text column (``text`` and ``label`` by default; the
entry's params ``text_column`` and ``label_column`` pick others). Labels are strings, as
written; the class names are their sorted distinct values. A text dataset keeps its texts
(``texts_train``, ``texts_test``); its ``x`` arrays are token ids only when ``load_dataset`` is
given a ``TextEncoder`` (the job's saved tokenizer: fitting is not reproducible, so nothing
here fits one), padded with 0 to each split's longest row.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ferry.core.errors import InvalidArgument

if TYPE_CHECKING:
    from ferry.core.text import TextEncoder

BUILTIN = ("digits", "iris", "wine", "breast_cancer")
SYNTHETIC = ("synthetic_classification", "synthetic_regression", "synthetic_tokens")
TEXT = ("topics",)
UPLOAD_FORMATS = ("npz", "csv", "jsonl")
TEXT_COLUMN, LABEL_COLUMN = "text", "label"


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
    # Text datasets: the raw texts of each split, row for row with y (empty for other sources).
    texts_train: list[str] = field(default_factory=list)
    texts_test: list[str] = field(default_factory=list)

    @property
    def is_text(self) -> bool:
        return bool(self.texts_train)

    @property
    def feature_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])

    @property
    def datatype(self) -> str:
        return "INT64" if self.x_train.dtype == np.int64 else "FP32"

    @property
    def input_shape(self) -> list[int]:
        """The served input shape: token sequences take any length (-1)."""
        return [-1] if self.vocab_size or self.is_text else self.feature_shape


def dataset_names() -> list[str]:
    return [*BUILTIN, *SYNTHETIC, *TEXT]


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
    elif fmt == "jsonl":
        raise InvalidArgument("a jsonl dataset is text: read it with read_text_upload")
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
            raise InvalidArgument(
                f"CSV dataset must be numeric with the label last, or text with a header row naming "
                f"columns {TEXT_COLUMN!r} and {LABEL_COLUMN!r}: {err}"
            ) from err
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


@dataclass(frozen=True)
class TextRows:
    """A text upload's rows: the texts and their labels, as written."""

    texts: list[str]
    labels: list[str]


class _Number(str):
    """A JSON number kept as written (``7``, ``7.0``): a label may be one, a text may not."""


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a spreadsheet's byte-order mark
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InvalidArgument(
            f"{what} dataset is not UTF-8: invalid byte 0x{data[err.start]:02x} on line {line}"
        ) from err


def _csv_rows(data: bytes) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the data rows (with their line numbers) of a CSV upload."""
    text = _decode(data, "CSV")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as err:
        raise InvalidArgument(f"CSV dataset is not readable CSV on line {reader.line_num}: {err}") from err
    if not rows:
        raise InvalidArgument("CSV dataset is empty")
    return [c.strip() for c in rows[0][1]], rows[1:]


def is_text_csv(data: bytes, text_column: str = TEXT_COLUMN) -> bool:
    """Whether a CSV upload is a text one: its first row names ``text_column``."""
    first = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").removeprefix("\ufeff")
    try:
        header = next(csv.reader([first]))
    except (StopIteration, csv.Error):
        return False
    return text_column in (c.strip() for c in header)


def _text_value(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or isinstance(value, _Number):
        kind = "number" if isinstance(value, _Number) else type(value).__name__
        raise InvalidArgument(f"{where}: {key!r} must be a string, got {kind} {str(value)[:40]}")
    if not value.strip():
        raise InvalidArgument(f"{where}: {key!r} is empty")
    return value


def _label_value(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = "empty" if isinstance(value, str) else f"{type(value).__name__} {str(value)[:40]}"
        raise InvalidArgument(f"{where}: label {key!r} must be a string or a number, got {shown}")
    return value.strip() if not isinstance(value, _Number) else str(value)


def _jsonl_records(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    """The objects of a JSONL upload with their line numbers (blank lines skipped)."""
    records = []
    for number, line in enumerate(_decode(data, "JSONL").splitlines(), 1):
        if not line.strip():
            continue
        where = f"JSONL dataset line {number}"
        try:
            record = json.loads(line, parse_int=_Number, parse_float=_Number)
        except ValueError as err:
            raise InvalidArgument(f"{where} is not JSON: {err}") from err
        if not isinstance(record, dict):
            raise InvalidArgument(f"{where} must be a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def _numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def check_text_upload(data: bytes, fmt: str) -> tuple[int, int] | None:
    """Rows and classes of a text upload, as the trainer reports an upload; None for a CSV that is
    numeric (``read_upload`` reads those).

    A file with the default names (``text`` and ``label``) is checked in full. One with other
    names, which a job picks with ``text_column`` and ``label_column``, is checked for form only
    (UTF-8, one JSON object a line, or CSV rows as wide as a header row, at least 2 rows), and its
    classes are 0 until a job reads it: a CSV counts as text then when a column holds no number at
    all, so a numeric CSV with a stray typo is still refused as one."""
    if fmt == "jsonl":
        records = _jsonl_records(data)
        if all(TEXT_COLUMN in r and LABEL_COLUMN in r for _, r in records):
            rows = read_text_upload(data, fmt)
            return len(rows.texts), len(set(rows.labels))
        count = len(records)
    elif is_text_csv(data):
        rows = read_text_upload(data, fmt)
        return len(rows.texts), len(set(rows.labels))
    else:
        header, table = _csv_rows(data)
        if _numeric(header[0]) or not table:
            return None

        def texts(c: int) -> bool:
            return all(c >= len(row) or not _numeric(row[c]) for _, row in table)

        if not any(texts(c) for c in range(len(header))):
            return None
        for number, row in table:
            if len(row) != len(header):
                raise InvalidArgument(
                    f"CSV dataset line {number} has {len(row)} fields, the header {len(header)}"
                )
        count = len(table)
    if count < 2:
        raise InvalidArgument(f"{fmt.upper()} dataset has {count} row(s); it needs at least 2")
    return count, 0


def read_text_upload(
    data: bytes, fmt: str, text_column: str = TEXT_COLUMN, label_column: str = LABEL_COLUMN
) -> TextRows:
    """Parse a text upload (``jsonl``, or ``csv`` with a header row); every problem is
    INVALID_ARGUMENT naming it and its line, so a user can fix the file."""
    texts: list[str] = []
    labels: list[str] = []
    if fmt == "jsonl":
        for number, record in _jsonl_records(data):
            where = f"JSONL dataset line {number}"
            for key in (text_column, label_column):
                if key not in record:
                    raise InvalidArgument(f"{where} has no key {key!r} (it has {sorted(record)[:10]})")
            texts.append(_text_value(record[text_column], where, text_column))
            labels.append(_label_value(record[label_column], where, label_column))
    elif fmt == "csv":
        header, rows = _csv_rows(data)
        for key in (text_column, label_column):
            if key not in header:
                raise InvalidArgument(
                    f"CSV dataset line 1: the header has no column {key!r} (it has {header})"
                )
        t, lab = header.index(text_column), header.index(label_column)
        for number, row in rows:
            where = f"CSV dataset line {number}"
            if len(row) != len(header):
                raise InvalidArgument(f"{where} has {len(row)} fields, the header {len(header)}")
            texts.append(_text_value(row[t], where, text_column))
            labels.append(_label_value(row[lab], where, label_column))
    else:
        raise InvalidArgument(f"a text dataset is jsonl or csv, not {fmt!r}")
    if len(texts) < 2:
        raise InvalidArgument(f"{fmt.upper()} dataset has {len(texts)} row(s); it needs at least 2")
    if len(set(labels)) < 2:
        raise InvalidArgument(
            f"{fmt.upper()} dataset has only one class ({labels[0]!r}); a classifier needs at least 2"
        )
    return TextRows(texts, labels)


def find_upload(store_root: str | Path, name: str) -> Path:
    from ferry.core.store import validate_name

    folder = Path(store_root) / "datasets"
    validate_name(name, "dataset name")
    for fmt in UPLOAD_FORMATS:
        path = folder / f"{name}.{fmt}"
        if path.is_file():
            return path
    files = [f"{name}.{fmt}" for fmt in UPLOAD_FORMATS]
    held = f"{', '.join(files[:-1])} or {files[-1]}"
    raise InvalidArgument(f"unknown uploaded dataset {name!r}: the store holds no {held}")


def _text_columns(params: dict[str, Any]) -> tuple[str, str]:
    columns = []
    for key, default in (("text_column", TEXT_COLUMN), ("label_column", LABEL_COLUMN)):
        value = params.get(key, default)
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"dataset param {key!r} must be a non-empty string, got {value!r}")
        columns.append(value)
    return columns[0], columns[1]


def _uploaded(
    name: str, store_root: str | Path | None, task: str, params: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, str, int] | TextRows:
    if store_root is None:
        raise InvalidArgument(f"dataset upload {name!r} needs the store")
    path = find_upload(store_root, name)
    fmt, data = path.suffix[1:], path.read_bytes()
    text_column, label_column = _text_columns(params)
    if fmt == "jsonl" or (fmt == "csv" and is_text_csv(data, text_column)):
        if task not in ("", "classification"):
            raise InvalidArgument(f"text dataset upload {name!r} is a classification dataset, not {task}")
        return read_text_upload(data, fmt, text_column, label_column)
    x, y = read_upload(data, fmt)
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


def load_dataset(
    entry: dict[str, Any],
    seed: int | None = None,
    store: str | Path | None = None,
    encoder: TextEncoder | None = None,
) -> Dataset:
    """Rebuild the dataset ``entry`` describes (see the module docstring); same entry, same arrays.

    ``seed`` overrides the entry's own; ``store`` is the store root, needed for uploads;
    ``encoder`` turns a text dataset's texts into token ids (without it ``x`` has no columns).
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
    texts: list[str] = []
    if upload:
        found = _uploaded(upload, store, task, params)
        if isinstance(found, TextRows):
            texts, y, task = found.texts, np.array(found.labels, dtype=object), "classification"
            x = np.zeros((len(texts), 0), dtype=np.int64)
        else:
            x, y, task, vocab = found[0], found[1], found[2] or "classification", found[3]
        name = f"upload:{upload}"
    elif name in TEXT:
        from ferry.textcorpus import TOPICS, generate

        texts, y = generate(_int_param(params, "samples", 2000, 10, 10_000_000), seed)
        x, task, names = np.zeros((len(texts), 0), dtype=np.int64), "classification", list(TOPICS)
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
    if task == "classification" and y.dtype == object:  # text labels: sorted, as written
        labels, y = np.unique(y, return_inverse=True)
        y = y.astype(np.int64)
        classes = outputs = len(labels)
        class_names = [str(v) for v in labels.tolist()]
    elif task == "classification":
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
    texts_train = [texts[i] for i in train.tolist()] if texts else []
    texts_test = [texts[i] for i in test.tolist()] if texts else []
    if texts and encoder is not None:
        x_train = encoder.encode(texts_train, "train texts").ids
        x_test = encoder.encode(texts_test, "test texts").ids
        vocab = encoder.vocab_size
    elif x.dtype != np.int64 and name != "digits":
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
        texts_train=texts_train,
        texts_test=texts_test,
    )
