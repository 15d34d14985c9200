"""Per-model warm-up samples, after Triton's ``model_warmup``: what a new version runs before it serves.

A model's ``config.json`` may list samples::

    "model_warmup": [
      {"name": "full", "batch_size": 8, "count": 3,
       "inputs": {"input": {"data_type": "TYPE_FP32", "dims": [64], "random_data": true}}},
      {"name": "real", "batch_size": 1,
       "inputs": {"input": {"data_type": "TYPE_FP32", "dims": [64], "input_data_file": "x.bin"}}}
    ]

Each input is ``zero_data``, ``random_data`` or ``input_data_file``: a file in the model's
``warmup/`` folder holding one row in row-major order (raw little-endian; BYTES elements as a
4-byte little-endian length, then the bytes), repeated over the batch. ``count`` runs the sample
that many times (0 means once, as in Triton). Without samples a version runs twice on zeros
(empty strings for BYTES) at batch 1.

A sample that does not fit the model (an input it lacks or leaves out, another datatype, a dim
that disagrees, a batch over ``max_batch_size``, a file name that is a path) is a config error,
so the version fails to load with the reason; a sample that fits but fails to *run* follows the
model's ``warmup_must_pass``. Pure: the worker feeds what ``feeds`` returns to its sessions.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferry.core.codec import numpy_dtype
from ferry.core.datatypes import from_config
from ferry.core.errors import InvalidArgument
from ferry.core.params import config_int

SOURCES = ("zero_data", "random_data", "input_data_file")
WARMUP_DIR = "warmup"
MAX_COUNT = 1_000  # runs of one sample
MAX_SAMPLES = 64
MAX_ELEMENTS = 1 << 24  # per input of one sample, batch included (64 MiB of FP32)
DEFAULT_ROUNDS = 2  # runs of the zeros sample a version gets without model_warmup
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class WarmupInput:
    datatype: str
    dims: tuple[int, ...]
    source: str  # one of SOURCES
    file: str = ""


@dataclass(frozen=True)
class WarmupSample:
    name: str
    batch_size: int
    count: int
    inputs: tuple[tuple[str, WarmupInput], ...]


def _input(name: str, raw: object, where: str) -> WarmupInput:
    where = f"{where} input {name!r}"
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where} must be an object")
    given = [s for s in SOURCES if raw.get(s) not in (None, False, "")]
    if len(given) != 1:
        raise InvalidArgument(f"{where} needs exactly one of {', '.join(SOURCES)}, got {given or 'none'}")
    dims = raw.get("dims", [])
    if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise InvalidArgument(f"{where}: dims must be a list of integers, got {dims!r}")
    if any(d < 1 for d in dims):
        raise InvalidArgument(f"{where}: dims must be concrete (>= 1), got {dims}")
    file = ""
    if given[0] == "input_data_file":
        file = str(raw["input_data_file"])
        if not _FILE_NAME.match(file):
            raise InvalidArgument(
                f"{where}: input_data_file must be a plain file name in the model's {WARMUP_DIR}/ "
                f"folder (letters, digits, '_', '-', '.'), got {file!r}"
            )
    return WarmupInput(from_config(raw.get("data_type", ""), where), tuple(dims), given[0], file)


def parse_samples(raw: object, where: str) -> tuple[WarmupSample, ...]:
    """The ``model_warmup`` list of a config, checked for shape only (``check`` fits it to a model)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidArgument(f"{where}: model_warmup must be a list of samples")
    if len(raw) > MAX_SAMPLES:
        raise InvalidArgument(f"{where}: model_warmup has {len(raw)} samples, more than {MAX_SAMPLES}")
    samples = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidArgument(f"{where}: model_warmup[{i}] must be an object")
        name = str(item.get("name") or f"sample{i}")
        here = f"{where} warm-up sample {name!r}"
        inputs = item.get("inputs")
        if not isinstance(inputs, dict) or not inputs:
            raise InvalidArgument(f"{here}: inputs must be an object naming every model input")
        samples.append(
            WarmupSample(
                name,
                config_int(item, "batch_size", here, 0, 1 << 20, 0),
                max(1, config_int(item, "count", here, 0, MAX_COUNT, 0)),
                tuple((str(k), _input(str(k), v, here)) for k, v in sorted(inputs.items())),
            )
        )
    return tuple(samples)


def check(
    sample: WarmupSample, inputs: Mapping[str, tuple[str, tuple[int, ...]]], max_batch_size: int, where: str
) -> None:
    """Refuse a sample that does not fit the model: ``inputs`` maps name -> (datatype, dims
    without batch, -1 for any)."""
    here = f"{where} warm-up sample {sample.name!r}"
    given = dict(sample.inputs)
    if missing := sorted(set(inputs) - set(given)):
        raise InvalidArgument(f"{here} leaves out inputs {missing}")
    if unknown := sorted(set(given) - set(inputs)):
        raise InvalidArgument(f"{here} names inputs the model does not have: {unknown}")
    if max_batch_size > 0 and not 1 <= sample.batch_size <= max_batch_size:
        raise InvalidArgument(
            f"{here}: batch_size must lie in [1, {max_batch_size}] (max_batch_size), got {sample.batch_size}"
        )
    if max_batch_size == 0 and sample.batch_size != 0:
        raise InvalidArgument(
            f"{here}: the model does not batch, so batch_size must be 0, got {sample.batch_size}"
        )
    for name, spec in sample.inputs:
        datatype, dims = inputs[name]
        if spec.datatype != datatype:
            raise InvalidArgument(f"{here} input {name!r} is {spec.datatype}, the model's is {datatype}")
        fits = len(dims) == len(spec.dims) and all(d in (-1, g) for d, g in zip(dims, spec.dims, strict=True))
        if not fits:
            raise InvalidArgument(
                f"{here} input {name!r} has dims {list(spec.dims)}, the model's are {list(dims)}"
            )
        if max(1, sample.batch_size) * int(np.prod(spec.dims)) > MAX_ELEMENTS:
            raise InvalidArgument(f"{here} input {name!r} is over {MAX_ELEMENTS} elements")


def read_row(path: Path, datatype: str, dims: tuple[int, ...], where: str) -> np.ndarray:
    """One ``datatype`` tensor of ``dims`` from a data file that must hold exactly that (raw
    little-endian; BYTES as length-prefixed strings). Also reads sequence models' initial states."""
    shown = f"{path.parent.name}/{path.name}"
    count = int(np.prod(dims))
    if path.is_symlink() or not path.is_file():
        raise InvalidArgument(f"{where}: {shown} is missing (or not a plain file)")
    data = path.read_bytes()
    if datatype != "BYTES":
        dtype = numpy_dtype(datatype).newbyteorder("<")
        if len(data) != count * dtype.itemsize:
            raise InvalidArgument(
                f"{where}: {shown} has {len(data)} bytes, {datatype} {list(dims)} "
                f"needs {count * dtype.itemsize}"
            )
        return np.frombuffer(data, dtype=dtype).astype(numpy_dtype(datatype)).reshape(dims)
    items: list[str] = []
    at = 0
    while at + 4 <= len(data):
        (length,) = struct.unpack_from("<I", data, at)
        items.append(data[at + 4 : at + 4 + length].decode("utf-8", errors="replace"))
        at += 4 + length
    if len(items) != count or at != len(data):
        raise InvalidArgument(f"{where}: {shown} does not hold exactly {count} length-prefixed strings")
    return np.array(items, dtype=object).reshape(dims)


def _row(spec: WarmupInput, model_dir: Path, rng: np.random.Generator, where: str) -> np.ndarray:
    if spec.source == "input_data_file":
        return read_row(model_dir / WARMUP_DIR / spec.file, spec.datatype, spec.dims, where)
    if spec.datatype == "BYTES":
        if spec.source == "zero_data":
            return np.full(spec.dims, "", dtype=object)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        flat = [
            "".join(rng.choice(letters, size=int(rng.integers(1, 9)))) for _ in range(int(np.prod(spec.dims)))
        ]
        return np.array(flat, dtype=object).reshape(spec.dims)
    dtype = numpy_dtype(spec.datatype)
    if spec.source == "zero_data":
        return np.zeros(spec.dims, dtype=dtype)
    if dtype.kind == "f":
        return rng.random(spec.dims).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, spec.dims).astype(dtype)
    return rng.integers(0, 10, spec.dims).astype(dtype)  # small, so token ids stay in range


def feeds(sample: WarmupSample, model_dir: Path, where: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays one run of ``sample`` feeds: a row per input, repeated ``batch_size`` times
    (no batch axis when the model does not batch)."""
    rng = np.random.default_rng(seed)
    here = f"{where} warm-up sample {sample.name!r}"
    out = {}
    for name, spec in sample.inputs:
        row = _row(spec, model_dir, rng, f"{here} input {name!r}")
        out[name] = row if sample.batch_size == 0 else np.repeat(row[None, ...], sample.batch_size, axis=0)
    return out


def zeros_sample(inputs: Sequence[tuple[str, str, tuple[int, ...]]], batched: bool) -> WarmupSample:
    """The warm-up a version gets without ``model_warmup``: zeros (empty strings) at batch 1,
    run twice; ``inputs`` are (name, datatype, dims without batch) with -1 taken as 1."""
    return WarmupSample(
        "zeros",
        1 if batched else 0,
        DEFAULT_ROUNDS,
        tuple(
            (name, WarmupInput(datatype, tuple(1 if d < 0 else d for d in dims), "zero_data"))
            for name, datatype, dims in inputs
        ),
    )
