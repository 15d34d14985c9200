"""Job spec validation: a bad job is refused at submit, before any process starts.

``normalize_spec`` takes the spec as the servicer decoded it (a plain dict, zero
values meaning "default"), fills the defaults, checks them against the
operator's ``Limits``, derives the model's sizes from the dataset
(``in_features``, ``in_channels``, ``vocab_size``, ``num_classes``), then builds a
zoo model and runs two samples through it (``check_fit``), so a model that does
not fit its data is rejected with both shapes in the message rather than failing
later in a child process. The result is what the job record and ``spec.json`` keep; the
record's copy also has ``model_parameters``, a zoo model's parameter count (``ferry train``
prints it at submit, before the job has trained).

A factory model is different: it is someone's code. It must lie under a module
prefix the operator allowed, and even then it is never imported here, in the
server: the job's own process builds it and runs the same ``check_fit``, so a
factory that raises, hangs or exits at import fails its job, not the trainer.

A text dataset (``topics``, a JSONL or text CSV upload) trains only ``transformer_text``: it
ignores padding, so a text gives one answer whatever batch it is served in, which an LSTM or an
embedding bag over padded ids would not. The tokenizer entry is checked, and a tokenizer is
fitted here on the train split to learn the vocabulary size the model's embedding needs; that
fitted size becomes the spec's ``tokenizer.vocab_size``, the bound of the job's own fit (fitting
is not reproducible, so the job fits once more and saves the file every later step loads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import InvalidArgument
from ferry.core.text import TextEncoder, fit_tokenizer, tokenizer_config
from ferry.datasets import Dataset, load_dataset

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "exponential")
LOSSES = {"classification": ("cross_entropy",), "regression": ("mse", "l1", "smooth_l1")}
DEVICES = ("auto", "cpu", "cuda")
TASKS = ("classification", "regression")
TEXT_ARCHS = ("lstm_text", "embedding_bag_text", "transformer_text")
RAW_TEXT_ARCH = "transformer_text"  # the one architecture that trains on raw texts


def _choice(value: str, allowed: tuple[str, ...], what: str, default: str) -> str:
    value = value or default
    if value not in allowed:
        raise InvalidArgument(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return value


def _positive(value: float, what: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"{what} must be a positive number, got {value}")


def _fraction(value: float, what: str, low_open: bool) -> None:
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        raise InvalidArgument(f"{what} must lie in {'(0' if low_open else '[0'}, 1), got {value}")


@dataclass(frozen=True)
class Limits:
    """What the operator lets one job ask for (the trainer's settings of the same names)."""

    max_nprocs: int = 8
    max_epochs: int = 100_000
    max_batch_size: int = 65536
    allowed_factories: Sequence[str] = ()


def normalize_spec(
    raw: dict[str, Any], store_root: str | Path, limits: Limits | None = None
) -> dict[str, Any]:
    """Validate ``raw`` and return the complete spec (see the module docstring)."""
    limits = limits or Limits()
    optimizer = _choice(raw.get("optimizer", ""), OPTIMIZERS, "optimizer", "adam")
    spec: dict[str, Any] = {
        "optimizer": optimizer,
        "lr": float(raw.get("lr") or (1e-2 if optimizer == "sgd" else 1e-3)),
        "momentum": float(raw.get("momentum") or 0.0),
        "weight_decay": float(raw.get("weight_decay") or 0.0),
        "schedule": _choice(raw.get("schedule", ""), SCHEDULES, "schedule", "constant"),
        "step_size": int(raw.get("step_size") or 1),
        "warmup_epochs": int(raw.get("warmup_epochs") or 0),
        "epochs": int(raw.get("epochs") or 10),
        "batch_size": int(raw.get("batch_size") or 64),
        "val_fraction": float(0.1 if raw.get("val_fraction") is None else raw["val_fraction"]),
        "seed": int(raw.get("seed") or 0),
        "device": _choice(raw.get("device", ""), DEVICES, "device", "auto"),
        "early_stopping_patience": int(raw.get("early_stopping_patience") or 0),
        "early_stopping_min_delta": float(raw.get("early_stopping_min_delta") or 0.0),
        "grad_clip_norm": float(raw.get("grad_clip_norm") or 0.0),
        "nprocs": int(raw.get("nprocs") or 1),
    }
    gamma = raw.get("gamma")
    spec["gamma"] = float(gamma if gamma is not None else (0.1 if spec["schedule"] == "step" else 0.9))
    _positive(spec["lr"], "lr")
    for key in ("momentum", "weight_decay", "early_stopping_min_delta", "grad_clip_norm"):
        if not (math.isfinite(spec[key]) and spec[key] >= 0):
            raise InvalidArgument(f"{key} must be zero or positive, got {spec[key]}")
    _positive(spec["gamma"], "gamma")
    bounds = (("epochs", limits.max_epochs), ("batch_size", limits.max_batch_size), ("step_size", 100_000))
    for key, high in bounds:
        if not 1 <= spec[key] <= high:
            raise InvalidArgument(f"{key} must be an integer in [1, {high}] on this trainer, got {spec[key]}")
    if spec["warmup_epochs"] < 0 or spec["early_stopping_patience"] < 0:
        raise InvalidArgument("warmup_epochs and early_stopping_patience must be zero or positive")
    if not 1 <= spec["nprocs"] <= limits.max_nprocs:
        raise InvalidArgument(
            f"nprocs must be in [1, {limits.max_nprocs}] on this trainer, got {spec['nprocs']}"
        )
    _fraction(spec["val_fraction"], "val_fraction", low_open=False)
    if spec["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgument("device 'cuda' asked for, but this trainer has no CUDA device")
        if spec["nprocs"] > torch.cuda.device_count():
            raise InvalidArgument(
                f"nprocs {spec['nprocs']} on device 'cuda' needs a GPU per process; this trainer has "
                f"{torch.cuda.device_count()}"
            )

    data_raw = raw.get("dataset") or {}
    task_given = raw.get("task", "")
    if task_given:
        _choice(task_given, TASKS, "task", "classification")
    test_fraction = data_raw.get("test_fraction")
    dataset_entry = {
        "name": data_raw.get("name", ""),
        "upload": data_raw.get("upload", ""),
        "params": data_raw.get("params") or {},
        "test_fraction": float(0.2 if test_fraction is None else test_fraction),
        "seed": spec["seed"],
        "task": task_given,
    }
    if not dataset_entry["name"] and not dataset_entry["upload"]:
        raise InvalidArgument("the job spec names no dataset (set dataset.name or dataset.upload)")
    _fraction(dataset_entry["test_fraction"], "test_fraction", low_open=True)
    data = load_dataset(dataset_entry, store=store_root)
    if data.is_text:
        model_raw = raw.get("model") or {}
        data, spec["tokenizer"] = _tokenized(dataset_entry, data, model_raw, data_raw, store_root)
    elif "tokenizer" in data_raw:
        raise InvalidArgument(
            f"dataset {data.name!r} is not text: a tokenizer applies only to a text dataset "
            "(topics, or a JSONL or text CSV upload)"
        )
    if task_given and task_given != data.task:
        raise InvalidArgument(f"dataset {data.name!r} is a {data.task} dataset, not {task_given}")
    dataset_entry["task"] = spec["task"] = data.task
    spec["dataset"] = dataset_entry
    spec["loss"] = _choice(
        raw.get("loss", ""), LOSSES[data.task], f"loss for {data.task}", LOSSES[data.task][0]
    )
    n_train = len(data.x_train) - round(len(data.x_train) * spec["val_fraction"])
    if n_train < spec["nprocs"]:
        raise InvalidArgument(f"dataset {data.name!r} has {n_train} training samples, fewer than nprocs")

    spec["model"], parameters = _check_model(raw.get("model") or {}, data, limits.allowed_factories)
    if parameters:  # a zoo model's size, for whoever submitted it (ferry train prints it)
        spec["model_parameters"] = parameters
    spec["input"] = {"name": "input", "datatype": data.datatype, "shape": data.input_shape}
    spec["output"] = {"name": "logits", "shape": [data.outputs]}
    spec["classes"] = data.classes
    spec["class_names"] = data.class_names
    return spec


def _tokenized(
    entry: dict[str, Any],
    data: Dataset,
    model: dict[str, Any],
    data_raw: dict[str, Any],
    store_root: str | Path,
) -> tuple[Dataset, dict[str, Any]]:
    """The text dataset as token ids, and the spec's tokenizer entry (see the module docstring)."""
    arch = model.get("arch", "") if isinstance(model, dict) else ""
    if arch != RAW_TEXT_ARCH:
        given = "a factory model" if model.get("factory") and not arch else f"model {arch!r}"
        raise InvalidArgument(
            f"dataset {data.name!r} is text, and only {RAW_TEXT_ARCH!r} trains on raw text: {given} "
            "would not give a text the same answer once it is served padded in a batch"
        )
    config = tokenizer_config(data_raw.get("tokenizer"))
    params = model.get("params") or {}
    max_len = params.get("max_len", _default_max_len()) if isinstance(params, dict) else 0
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
        raise InvalidArgument(
            f"model {arch!r} param 'max_len' must be an integer of at least 2 for a text dataset, "
            f"got {max_len!r}"
        )
    encoder = TextEncoder(fit_tokenizer(data.texts_train, config), max_len)
    tokenized = load_dataset(entry, store=store_root, encoder=encoder)
    return tokenized, {**config.to_json(), "vocab_size": encoder.vocab_size, "max_length": max_len}


def _default_max_len() -> int:
    import inspect

    from ferry.zoo import TransformerText

    return int(inspect.signature(TransformerText).parameters["max_len"].default)


def _derived(arch: str, params: dict[str, Any], data: Dataset) -> dict[str, Any]:
    """Fill the sizes the data decides, and refuse given ones that contradict it."""
    shape = data.feature_shape
    features = int(np.prod(shape))
    out = dict(params)

    def fill(key: str, value: int, explain: str) -> None:
        given = out.setdefault(key, value)
        if given != value:
            raise InvalidArgument(
                f"model {arch!r} takes {key}={given} but dataset {data.name!r} {explain} "
                f"(feature shape {shape}, output shape [{data.outputs}])"
            )

    if arch in TEXT_ARCHS:
        if data.datatype != "INT64":
            raise InvalidArgument(
                f"model {arch!r} takes token ids [sequence] but dataset {data.name!r} has float "
                f"features of shape {shape}"
            )
        vocab = out.setdefault("vocab_size", data.vocab_size)
        if not isinstance(vocab, int) or vocab < data.vocab_size:
            raise InvalidArgument(
                f"model {arch!r} takes vocab_size={vocab} but dataset {data.name!r} has token ids up to "
                f"{data.vocab_size - 1} (feature shape {shape})"
            )
    elif arch == "mlp":
        fill("in_features", features, f"has {features} features")
    elif arch == "cnn":
        if len(shape) != 3:
            raise InvalidArgument(
                f"model 'cnn' takes images [channels, height, width] but dataset {data.name!r} has "
                f"feature shape {shape}"
            )
        fill("in_channels", shape[0], f"has {shape[0]} channels")
    if arch in ("mlp", "cnn", *TEXT_ARCHS):
        fill("num_classes", data.outputs, f"needs {data.outputs} outputs")
    return out


def _check_model(
    raw: dict[str, Any], data: Dataset, allowed_factories: Sequence[str]
) -> tuple[dict[str, Any], int]:
    """The model entry and its parameter count (0 for a factory, which is never built here)."""
    from ferry.zoo import ARCHITECTURES, build_model, check_factory, count_parameters

    arch, factory = raw.get("arch", ""), raw.get("factory", "")
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"model params must be a JSON object, not {type(params).__name__}")
    if factory and arch:
        raise InvalidArgument("give the model as an arch or a factory, not both")
    if factory:
        check_factory(factory, allowed_factories)
        return {"factory": factory, "params": params}, 0  # built and checked in the job's process
    if arch not in ARCHITECTURES:
        raise InvalidArgument(f"unknown model {arch!r}; the zoo has {', '.join(sorted(ARCHITECTURES))}")
    import torch

    entry: dict[str, Any] = {"arch": arch, "params": _derived(arch, params, data)}
    torch.manual_seed(0)
    try:
        model = build_model(entry)
    except InvalidArgument:
        raise
    except Exception as err:
        raise InvalidArgument(f"model {arch!r} cannot be built from params {params}: {err}") from err
    max_len = getattr(model, "max_len", None)  # transformer_text: positions it has embeddings for
    if isinstance(max_len, int) and data.feature_shape and data.feature_shape[0] > max_len:
        raise InvalidArgument(
            f"model {arch!r} takes sequences up to max_len={max_len} but dataset {data.name!r} has "
            f"sequences of length {data.feature_shape[0]} (feature shape {data.feature_shape}); "
            "raise max_len or shorten the sequences"
        )
    check_fit(model, data, arch)
    return entry, count_parameters(model)


def check_fit(model: Any, data: Dataset, label: str) -> None:
    """Run two samples through ``model``; a model that does not fit ``data`` is refused by shape."""
    import torch

    model.eval()
    sample = torch.from_numpy(np.ascontiguousarray(data.x_train[:2]))
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as err:
        raise InvalidArgument(
            f"model {label!r} does not fit dataset {data.name!r}: input shape {list(sample.shape[1:])} "
            f"(feature shape {data.feature_shape}) fails: {err}"
        ) from err
    if not isinstance(out, torch.Tensor) or list(out.shape) != [len(sample), data.outputs]:
        got = list(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidArgument(
            f"model {label!r} outputs shape {got} but dataset {data.name!r} needs [{data.outputs}] "
            f"({data.task}, feature shape {data.feature_shape})"
        )
