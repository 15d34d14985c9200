"""A model's serving signature and policies, and the checks every request meets.

``config.json`` in the store mirrors Triton's model configuration in JSON (v2
datatype names such as ``FP32``; ``TYPE_FP32`` is accepted too). As in Triton,
when ``max_batch_size`` > 0 the ``dims`` leave out the batch dimension, and -1
means any size. Whatever ``config.json`` leaves out is derived from the ONNX
graph by the worker. This module is pure: the worker and the gateway both use it
to validate a request before any tensor is decoded or merged into a batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import model_config_pb2 as mc
from ferry.core.codec import FIXED_DTYPES, check_content_form, decode_inputs, utf8_strings
from ferry.core.datatypes import config_name, from_config
from ferry.core.errors import InvalidArgument
from ferry.core.warmup import WarmupSample, parse_samples

DEFAULT_MAX_BATCH_SIZE = 64
PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension when the model batches


@dataclass(frozen=True)
class BatchingPolicy:
    """Dynamic batching knobs; the defaults dispatch as soon as a runner is free."""

    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    default_timeout_us: int = 0  # 0: a request waits as long as its own deadline allows
    priority_levels: int = 1
    default_priority_level: int = 1


@dataclass(frozen=True)
class VersionPolicy:
    """Which published versions a worker serves: the latest N, all, or a fixed list."""

    kind: str = "latest"  # latest | all | specific
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Iterable[int]) -> list[int]:
        ordered = sorted(set(available))
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-max(self.num_versions, 1) :] if ordered else []


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    platform: str = PLATFORM
    batching: BatchingPolicy | None = field(default_factory=BatchingPolicy)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    instances: int = 1
    response_cache: bool = True
    parameters: dict[str, str] = field(default_factory=dict)
    warmup: tuple[WarmupSample, ...] = ()  # config.json's model_warmup (ferry.core.warmup)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def full_shape(self, tensor: TensorSpec) -> list[int]:
        return [-1, *tensor.dims] if self.max_batch_size > 0 else list(tensor.dims)


def _tensors(items: Sequence[dict[str, Any]], where: str) -> tuple[TensorSpec, ...]:
    out = []
    for item in items:
        name = item.get("name")
        if not name:
            raise InvalidArgument(f"{where}: a tensor has no name")
        dt = from_config(item.get("data_type", item.get("datatype", "")), f"{where} {name!r}")
        out.append(TensorSpec(name, dt, tuple(int(d) for d in item.get("dims", item.get("shape", [])))))
    return tuple(out)


def spec_from_config(name: str, config: dict[str, Any], derived: ModelSpec | None = None) -> ModelSpec:
    """Build the spec from ``config.json``, filling what it omits from ``derived`` (the graph)."""
    where = f"config of model {name!r}"
    base = derived or ModelSpec(name=name, inputs=(), outputs=())
    inputs = _tensors(config["input"], where) if config.get("input") else base.inputs
    outputs = _tensors(config["output"], where) if config.get("output") else base.outputs
    if not inputs or not outputs:
        raise InvalidArgument(f"{where}: inputs and outputs are neither configured nor derivable")
    max_batch = int(config.get("max_batch_size", base.max_batch_size))
    if max_batch < 0:
        raise InvalidArgument(f"{where}: max_batch_size must be >= 0, got {max_batch}")
    batching: BatchingPolicy | None = base.batching
    if "dynamic_batching" in config:
        db = config["dynamic_batching"]
        batching = (
            None
            if db is None
            else BatchingPolicy(
                max_queue_delay_us=int(db.get("max_queue_delay_microseconds", 0)),
                preferred_batch_sizes=tuple(int(x) for x in db.get("preferred_batch_size", ())),
                max_queue_size=int(db.get("max_queue_size", BatchingPolicy.max_queue_size)),
                default_timeout_us=int(db.get("default_timeout_microseconds", 0)),
                priority_levels=max(1, int(db.get("priority_levels", 1))),
                default_priority_level=max(1, int(db.get("default_priority_level", 1))),
            )
        )
    policy = base.version_policy
    vp = config.get("version_policy")
    if vp:
        if "all" in vp:
            policy = VersionPolicy(kind="all")
        elif "specific" in vp:
            policy = VersionPolicy(
                kind="specific", versions=tuple(int(v) for v in vp["specific"].get("versions", []))
            )
        else:
            policy = VersionPolicy(
                kind="latest", num_versions=int(vp.get("latest", {}).get("num_versions", 1))
            )
    cache = config.get("response_cache", {"enable": base.response_cache})
    return replace(
        base,
        name=name,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch,
        platform=config.get("platform", base.platform),
        batching=batching,
        version_policy=policy,
        instances=max(1, int(config.get("instance_count", base.instances))),
        response_cache=bool(cache.get("enable", True)),
        parameters={str(k): str(v) for k, v in config.get("parameters", base.parameters).items()},
        warmup=parse_samples(config["model_warmup"], where) if "model_warmup" in config else base.warmup,
    )


def version_policy_of(config: dict[str, Any] | None) -> VersionPolicy:
    """The version policy a ``config.json`` names (latest 1 when it names none)."""
    vp = (config or {}).get("version_policy") or {}
    if "all" in vp:
        return VersionPolicy(kind="all")
    if "specific" in vp:
        return VersionPolicy(
            kind="specific", versions=tuple(int(v) for v in vp["specific"].get("versions", []))
        )
    return VersionPolicy(kind="latest", num_versions=int(vp.get("latest", {}).get("num_versions", 1)))


def spec_to_config(spec: ModelSpec) -> dict[str, Any]:
    """The ``config.json`` form of a spec (what the exporter writes)."""
    config: dict[str, Any] = {
        "name": spec.name,
        "platform": spec.platform,
        "max_batch_size": spec.max_batch_size,
        "input": [{"name": t.name, "data_type": t.datatype, "dims": list(t.dims)} for t in spec.inputs],
        "output": [{"name": t.name, "data_type": t.datatype, "dims": list(t.dims)} for t in spec.outputs],
        "instance_count": spec.instances,
        "response_cache": {"enable": spec.response_cache},
    }
    if spec.batching is not None:
        b = spec.batching
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": b.max_queue_delay_us,
            "preferred_batch_size": list(b.preferred_batch_sizes),
            "max_queue_size": b.max_queue_size,
            "default_timeout_microseconds": b.default_timeout_us,
            "priority_levels": b.priority_levels,
            "default_priority_level": b.default_priority_level,
        }
    vp = spec.version_policy
    if vp.kind == "all":
        config["version_policy"] = {"all": {}}
    elif vp.kind == "specific":
        config["version_policy"] = {"specific": {"versions": list(vp.versions)}}
    else:
        config["version_policy"] = {"latest": {"num_versions": vp.num_versions}}
    if spec.parameters:
        config["parameters"] = dict(spec.parameters)
    return config


def _signature(
    spec: ModelSpec,
) -> tuple[dict[str, tuple[str, tuple[int, ...], bool, np.dtype[Any] | None]], frozenset[str]]:
    """Per spec, computed once: input name -> (datatype, dims, dims fixed?, numpy dtype or None
    for BYTES), and the output names."""
    cached = spec.__dict__.get("_signature")
    if cached is None:
        inputs = {
            t.name: (t.datatype, tuple(t.dims), -1 not in t.dims, FIXED_DTYPES.get(t.datatype))
            for t in spec.inputs
        }
        cached = (inputs, frozenset(spec.output_names()))
        object.__setattr__(spec, "_signature", cached)  # a private cache on a frozen instance
    return cached


def _valid_rows(spec: ModelSpec, request: pb.ModelInferRequest) -> int | None:
    """The rows of a request that passes every check, or None to let the full path explain."""
    inputs = request.inputs
    raw = request.raw_input_contents
    if raw and len(raw) != len(inputs):
        return None
    signature, output_names = _signature(spec)
    if len(inputs) != len(signature):
        return None
    batched = spec.max_batch_size > 0
    rows = -1
    names = set()
    for tensor in inputs:
        expected = signature.get(tensor.name)
        if expected is None or tensor.datatype != expected[0]:
            return None
        names.add(tensor.name)
        shape = tuple(tensor.shape)
        dims = expected[1]
        if batched:
            if len(shape) != len(dims) + 1:
                return None
            batch = shape[0]
            if batch <= 0 or batch > spec.max_batch_size or rows not in (-1, batch):
                return None
            rows = batch
            shape = shape[1:]
        if expected[2]:
            if shape != dims:
                return None
        elif len(shape) != len(dims) or any(
            got < 0 or (want != -1 and got != want) for got, want in zip(shape, dims, strict=True)
        ):
            return None
    if len(names) != len(signature):
        return None
    for out in request.outputs:
        if out.name not in output_names:
            return None
    return max(rows, 1)


def _accepted(spec: ModelSpec, request: pb.ModelInferRequest) -> tuple[int, dict[str, np.ndarray]] | None:
    """``accept_request`` for a raw request that passes every check, in one pass; None: the full
    path decides (and names the problem)."""
    inputs = request.inputs
    raw = request.raw_input_contents
    if not raw or len(raw) != len(inputs):
        return None
    signature, output_names = _signature(spec)
    if len(inputs) != len(signature):
        return None
    max_batch = spec.max_batch_size
    rows = -1
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(inputs):
        name = tensor.name
        expected = signature.get(name)
        if expected is None or name in arrays:
            return None
        datatype, dims, fixed, dtype = expected
        if dtype is None or tensor.datatype != datatype or tensor.HasField("contents"):
            return None
        shape = tuple(tensor.shape)
        inner = shape
        if max_batch > 0:
            if len(shape) != len(dims) + 1:
                return None
            batch = shape[0]
            if batch <= 0 or batch > max_batch or rows not in (-1, batch):
                return None
            rows = batch
            inner = shape[1:]
        if fixed:
            if inner != dims:
                return None
        elif len(inner) != len(dims) or any(
            got < 0 or (want != -1 and got != want) for got, want in zip(inner, dims, strict=True)
        ):
            return None
        data = raw[i]
        if len(data) != math.prod(shape) * dtype.itemsize:
            return None
        arrays[name] = np.ndarray(shape, dtype, data)  # a read-only view, no copy
    for out in request.outputs:
        if out.name not in output_names:
            return None
    return max(rows, 1), arrays


def accept_request(spec: ModelSpec, request: pb.ModelInferRequest) -> tuple[int, dict[str, np.ndarray]]:
    """``validate_request`` and ``decode_inputs`` together: the request's rows and its inputs as
    arrays, or ``InvalidArgument`` naming the first problem. A valid raw request, the hot path,
    is checked and decoded in one pass over its inputs."""
    fast = _accepted(spec, request)
    if fast is not None:
        return fast
    rows = validate_request(spec, request)
    arrays = decode_inputs(request)
    for t in spec.inputs:
        if t.datatype == "BYTES" and t.name in arrays:
            arrays[t.name] = utf8_strings(t.name, arrays[t.name])
    return rows, arrays


def validate_request(spec: ModelSpec, request: pb.ModelInferRequest) -> int:
    """Check a request's inputs and requested outputs against the signature; returns its rows.

    Only metadata is read (names, datatypes, shapes), so this runs before any
    tensor is decoded. Byte sizes are checked by the codec when decoding. A valid
    request takes a fast path; anything it does not accept goes through the full
    checks below, which raise the error naming the problem.
    """
    rows = _valid_rows(spec, request)
    if rows is not None:
        return rows
    check_content_form(request)
    seen: set[str] = set()
    rows = -1
    for tensor in request.inputs:
        expected = spec.input(tensor.name)
        if expected is None:
            known = ", ".join(t.name for t in spec.inputs)
            raise InvalidArgument(f"model {spec.name!r} has no input {tensor.name!r} (inputs: {known})")
        if tensor.name in seen:
            raise InvalidArgument(f"input {tensor.name!r} appears more than once")
        seen.add(tensor.name)
        if tensor.datatype != expected.datatype:
            raise InvalidArgument(
                f"input {tensor.name!r}: datatype {tensor.datatype or '(empty)'} does not match the model's "
                f"{expected.datatype}"
            )
        shape = list(tensor.shape)
        full = spec.full_shape(expected)
        if len(shape) != len(full):
            raise InvalidArgument(
                f"input {tensor.name!r}: shape {shape} has rank {len(shape)} but the model expects {full}"
            )
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"input {tensor.name!r}: shape {shape} has a negative dimension")
        for got, want in zip(shape[1:] if spec.max_batch_size > 0 else shape, expected.dims, strict=True):
            if want != -1 and got != want:
                raise InvalidArgument(
                    f"input {tensor.name!r}: shape {shape} does not match the model's {full}"
                )
        if spec.max_batch_size > 0:
            batch = shape[0]
            if batch == 0:
                raise InvalidArgument(f"input {tensor.name!r}: empty batch (first dimension is 0)")
            if batch > spec.max_batch_size:
                raise InvalidArgument(
                    f"input {tensor.name!r}: batch size {batch} exceeds the model's max_batch_size "
                    f"{spec.max_batch_size}"
                )
            if rows not in (-1, batch):
                raise InvalidArgument(
                    f"inputs disagree on the batch size ({rows} vs {batch} for {tensor.name!r})"
                )
            rows = batch
    missing = [t.name for t in spec.inputs if t.name not in seen]
    if missing:
        raise InvalidArgument(f"model {spec.name!r}: missing input(s) {', '.join(repr(m) for m in missing)}")
    names = set(spec.output_names())
    for out in request.outputs:
        if out.name not in names:
            raise InvalidArgument(
                f"model {spec.name!r} has no output {out.name!r} (outputs: {', '.join(spec.output_names())})"
            )
    return max(rows, 1)


def metadata_proto(spec: ModelSpec, versions: Sequence[int]) -> pb.ModelMetadataResponse:
    resp = pb.ModelMetadataResponse(
        name=spec.name, platform=spec.platform, versions=[str(v) for v in versions]
    )
    for src, dst in ((spec.inputs, resp.inputs), (spec.outputs, resp.outputs)):
        for t in src:
            dst.add(name=t.name, datatype=t.datatype, shape=spec.full_shape(t))
    return resp


def _proto_datatype(datatype: str) -> int:
    return mc.DataType.Value(config_name(datatype))


def config_proto(spec: ModelSpec) -> mc.ModelConfig:
    cfg = mc.ModelConfig(
        name=spec.name, platform=spec.platform, backend="onnxruntime", max_batch_size=spec.max_batch_size
    )
    for t in spec.inputs:
        cfg.input.add(name=t.name, data_type=_proto_datatype(t.datatype), dims=list(t.dims))
    for t in spec.outputs:
        cfg.output.add(name=t.name, data_type=_proto_datatype(t.datatype), dims=list(t.dims))
    if spec.batching is not None:
        b = spec.batching
        db = cfg.dynamic_batching
        db.preferred_batch_size.extend(b.preferred_batch_sizes)
        db.max_queue_delay_microseconds = b.max_queue_delay_us
        db.priority_levels = b.priority_levels if b.priority_levels > 1 else 0
        db.default_priority_level = b.default_priority_level if b.priority_levels > 1 else 0
        db.default_queue_policy.max_queue_size = b.max_queue_size
        db.default_queue_policy.default_timeout_microseconds = b.default_timeout_us
    vp = spec.version_policy
    if vp.kind == "all":
        cfg.version_policy.all.SetInParent()
    elif vp.kind == "specific":
        cfg.version_policy.specific.versions.extend(vp.versions)
    else:
        cfg.version_policy.latest.num_versions = vp.num_versions
    cfg.instance_group.add(name=spec.name, kind=mc.ModelInstanceGroup.KIND_AUTO, count=spec.instances)
    cfg.response_cache.enable = spec.response_cache
    cfg.model_transaction_policy.decoupled = False
    for k, v in spec.parameters.items():
        cfg.parameters[k].string_value = v
    return cfg
