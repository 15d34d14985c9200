"""Length-aware batching: requests of different sequence lengths padded to a shared bucket. Pure.

The batcher concatenates only requests whose non-batch dims agree, so a text model with a free
sequence length runs one batch per exact length, and mixed traffic hardly batches at all. A model
whose answer does not change when its inputs are padded with the pad value (a transformer that
builds its attention mask from the pad id, as the zoo's ``transformer_text`` does) can say so in
``config.json``::

    "sequence_buckets": [16, 32, 64, 128]                     # sizes; pad value 0
    "sequence_buckets": {"sizes": [16, 64], "pad_value": 0}
    "sequence_buckets": {"max_length": 128}                   # powers of two from 8, then 128

Each request's inputs with a free first dim (the sequence axis, right after the batch axis) are
then padded at the end to the smallest bucket that fits, so requests of lengths 5, 9 and 14 run as
one batch of 16. A request longer than the largest bucket runs at its own length. Padding an LSTM's
input would change its answer: the setting is the model's promise, not something Ferry can check.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferry.core.errors import InvalidArgument
from ferry.core.params import config_int

MAX_BUCKETS = 64
SMALLEST_DEFAULT = 8


@dataclass(frozen=True)
class Bucketing:
    sizes: tuple[int, ...]  # ascending
    inputs: tuple[str, ...]  # the inputs padded along their sequence axis
    pad_value: float = 0


def default_sizes(max_length: int) -> tuple[int, ...]:
    """Powers of two from 8 below ``max_length``, then ``max_length`` itself."""
    sizes = []
    size = SMALLEST_DEFAULT
    while size < max_length:
        sizes.append(size)
        size *= 2
    return (*sizes, max_length)


def parse_buckets(
    raw: object,
    inputs: Sequence[tuple[str, str, tuple[int, ...]]],
    outputs: Sequence[tuple[str, str, tuple[int, ...]]],
    batched: bool,
    where: str,
) -> Bucketing:
    """``config.json``'s ``sequence_buckets`` for a model with these (name, datatype, dims) inputs and
    outputs."""
    where = f"{where} sequence_buckets"
    pad: Any = 0
    if isinstance(raw, Mapping):
        pad = raw.get("pad_value", 0)
        if "max_length" in raw:
            sizes: object = list(default_sizes(config_int(raw, "max_length", where, 1, 1 << 20, 0)))
        else:
            sizes = raw.get("sizes")
    else:
        sizes = raw
    if not isinstance(sizes, list) or not sizes or len(sizes) > MAX_BUCKETS:
        raise InvalidArgument(f"{where}: give 1 to {MAX_BUCKETS} sizes, or max_length")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise InvalidArgument(f"{where}: sizes must be positive integers, got {sizes}")
    if sorted(set(sizes)) != sizes:
        raise InvalidArgument(f"{where}: sizes must be strictly ascending, got {sizes}")
    if isinstance(pad, bool) or not isinstance(pad, (int, float)):
        raise InvalidArgument(f"{where}: pad_value must be a number, got {pad!r}")
    if not batched:
        raise InvalidArgument(f"{where}: the model does not batch (max_batch_size 0): nothing to pad for")
    padded = tuple(name for name, _, dims in inputs if dims and dims[0] == -1)
    if not padded:
        raise InvalidArgument(f"{where}: no input has a free sequence dim (dims starting with -1) to pad")
    text = [name for name, datatype, dims in inputs if name in padded and datatype == "BYTES"]
    if text:
        raise InvalidArgument(f"{where}: BYTES inputs {text} cannot be padded with a number")
    loose = [name for name, _, dims in outputs if any(d == -1 for d in dims)]
    if loose:
        raise InvalidArgument(
            f"{where}: outputs {loose} have a free dim, so padding would change their shape; "
            "bucketing suits models whose outputs do not follow the sequence length"
        )
    return Bucketing(tuple(sizes), padded, pad)


def buckets_to_config(bucketing: Bucketing) -> dict[str, Any]:
    return {"sizes": list(bucketing.sizes), "pad_value": bucketing.pad_value}


def bucket_for(length: int, sizes: Sequence[int]) -> int | None:
    """The smallest size that holds ``length``; None past the largest."""
    at = bisect.bisect_left(sizes, length)
    return sizes[at] if at < len(sizes) else None


def pad_to_bucket(inputs: dict[str, np.ndarray], bucketing: Bucketing) -> dict[str, np.ndarray]:
    """``inputs`` with the sequence axis of the bucketed ones padded at the end to the bucket (a
    new dict; ``inputs`` itself when nothing is padded).

    All of a request's bucketed inputs share its length (token ids and their mask); a request whose
    bucketed inputs disagree, or which is longer than the largest bucket, is left as it came."""
    lengths = {v.shape[1] for n, v in inputs.items() if n in bucketing.inputs and v.ndim > 1}
    if len(lengths) != 1:
        return inputs
    (length,) = lengths
    target = bucket_for(length, bucketing.sizes)
    if target is None or target == length:
        return inputs
    out = dict(inputs)
    for name in bucketing.inputs:
        value = inputs[name]
        width = [(0, 0)] * value.ndim
        width[1] = (0, target - length)
        out[name] = np.pad(value, width, constant_values=np.array(bucketing.pad_value, dtype=value.dtype))
    return out
