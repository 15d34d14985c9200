"""Held-out samples for the parity gate and calibration samples for static int8.

The job's own dataset comes first: ``ferry.datasets.load_dataset`` rebuilds it
from the checkpoint's dataset entry (same entry, same split), the gate runs on its
held-out test split and static quantisation calibrates on its train split, so
the gate measures the model on the inputs it will see. A text job's texts are tokenized with
the checkpoint's own ``tokenizer.json`` (never a refit: fitting is not reproducible, and a refit
would number the tokens differently from the weights). When the dataset cannot be
rebuilt (an upload deleted since, an unknown entry), inputs of the right shape
and dtype are drawn at random (token ids within the vocabulary for text models),
and the report says which was used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("ferry.exporter")

DEFAULT_SEQ_LEN = 16


@dataclass
class Samples:
    """Inputs (batch first), labels when the dataset has them, and where they came from.

    ``alt_inputs`` holds samples at a second sequence length for models whose input
    has a variable dimension, so parity is checked at two lengths.
    """

    inputs: np.ndarray
    labels: np.ndarray | None
    source: str
    alt_inputs: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def _dtype(spec: dict[str, Any]) -> type[np.generic]:
    return np.int64 if spec["input"].get("datatype", "FP32") == "INT64" else np.float32


def _random(
    spec: dict[str, Any], n: int, seq_len: int, rng: np.random.Generator, vocab: int | None
) -> np.ndarray:
    shape = [n, *(seq_len if d == -1 else d for d in spec["input"]["shape"])]
    if _dtype(spec) is np.int64:
        return rng.integers(0, max(vocab or 2, 2), size=shape, dtype=np.int64)
    return rng.standard_normal(shape).astype(np.float32)


def _fits(spec: dict[str, Any], x: np.ndarray) -> np.ndarray | None:
    """``x`` shaped as the model input wants it, or None when it cannot be."""
    dims = spec["input"]["shape"]
    if x.ndim == len(dims) + 1 and all(d in (-1, s) for d, s in zip(dims, x.shape[1:], strict=True)):
        return x.astype(_dtype(spec))
    if -1 not in dims and x[0].size == int(np.prod(dims)):
        return x.reshape(x.shape[0], *dims).astype(_dtype(spec))
    return None


def _dataset_split(
    spec: dict[str, Any], split: str, store_root: Path | None, tokenizer: Path | None
) -> tuple[np.ndarray, np.ndarray] | None:
    entry = spec.get("dataset")
    if not isinstance(entry, dict) or not entry:
        return None
    try:
        from ferry.datasets import load_dataset
    except ImportError:
        return None
    try:
        encoder = None
        if tokenizer is not None:
            from ferry.core.text import TextEncoder, read_tokenizer

            encoder = TextEncoder(read_tokenizer(tokenizer), int(spec["tokenizer"]["max_length"]))
        data = load_dataset(entry, store=store_root, encoder=encoder)
        x, y = (data.x_test, data.y_test) if split == "test" else (data.x_train, data.y_train)
    except Exception as err:  # a dataset that cannot be rebuilt falls back to random inputs
        log.warning("dataset unavailable, using random inputs", extra={"reason": str(err)})
        return None
    shaped = _fits(spec, np.asarray(x)) if len(x) else None
    return None if shaped is None else (shaped, np.asarray(y))


def held_out(
    spec: dict[str, Any],
    n: int,
    seed: int = 0,
    vocab: int | None = None,
    store_root: Path | None = None,
    split: str = "test",
    tokenizer: Path | None = None,
) -> Samples:
    """Up to ``n`` samples of the job's ``split`` (test: held out; train: calibration);
    ``tokenizer`` is a text job's ``tokenizer.json``."""
    rng = np.random.default_rng(seed)
    found = _dataset_split(spec, split, store_root, tokenizer)
    if found is not None:
        x, y = found
        if len(x) < n:  # repeat a small split rather than gate on a handful of rows
            reps = -(-n // len(x))
            x, y = np.concatenate([x] * reps), np.concatenate([y] * reps)
        samples = Samples(np.ascontiguousarray(x[:n]), y[:n], f"dataset:{split}")
    else:
        samples = Samples(_random(spec, n, DEFAULT_SEQ_LEN, rng, vocab), None, "random")
    dims = spec["input"]["shape"]
    if -1 in dims:
        axis = 1 + dims.index(-1)
        length = samples.inputs.shape[axis]
        alt = length // 2 if length >= 4 else length * 2 + 1
        if samples.source != "random" and alt < length:
            samples.alt_inputs = np.ascontiguousarray(np.take(samples.inputs, range(alt), axis=axis))
        else:
            samples.alt_inputs = _random(spec, len(samples), alt, rng, vocab)
    return samples
