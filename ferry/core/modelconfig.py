"""A model's serving signature and policies, read from and written to ``config.json``.

``config.json`` in the store mirrors Triton's model configuration in JSON (v2
datatype names such as ``FP32``; ``TYPE_FP32`` is accepted too). As in Triton,
when ``max_batch_size`` > 0 the ``dims`` leave out the batch dimension, and -1
means any size. Whatever ``config.json`` leaves out is derived from the ONNX
graph by the worker. Pure; the checks a request meets against a spec are in
``ferry.core.requests``, and the spec's protobuf forms in ``ferry.core.configproto``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ferry.core.buckets import Bucketing, buckets_to_config, parse_buckets
from ferry.core.datatypes import from_config
from ferry.core.errors import InvalidArgument
from ferry.core.sequencing import SequencePolicy, parse_policy, policy_to_config
from ferry.core.textinput import CONFIG_KEY as TEXT_KEY
from ferry.core.textinput import TextInput, parse_text
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
    sequence: SequencePolicy | None = None  # config.json's sequence_batching (ferry.core.sequencing)
    buckets: Bucketing | None = None  # config.json's sequence_buckets (ferry.core.buckets)
    text: TextInput | None = None  # config.json's text: a raw-text input (ferry.core.textinput)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def text_tensor(self) -> TensorSpec | None:
        """The BYTES input of raw texts, one per row, when the model takes text."""
        return None if self.text is None else TensorSpec(self.text.input, "BYTES", (1,))

    def for_text(self) -> ModelSpec:
        """The signature a request of raw texts is checked against: the text input alone."""
        cached = self.__dict__.get("_for_text")
        if cached is None:
            tensor = self.text_tensor()
            assert tensor is not None
            cached = replace(self, inputs=(tensor,), text=None)
            object.__setattr__(self, "_for_text", cached)  # a private cache on a frozen instance
        return cached

    def served_inputs(self) -> tuple[TensorSpec, ...]:
        """Every input a client may send: the graph's, then the text input."""
        tensor = self.text_tensor()
        return self.inputs if tensor is None else (*self.inputs, tensor)

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
    sequence = base.sequence
    if "sequence_batching" in config:
        if "dynamic_batching" in config:
            raise InvalidArgument(f"{where}: dynamic_batching and sequence_batching exclude each other")
        sequence = parse_policy(config["sequence_batching"], where)
        inputs, outputs = _without_states(sequence, inputs, outputs, where)
        batching = (
            BatchingPolicy(
                max_queue_delay_us=sequence.max_queue_delay_us,
                preferred_batch_sizes=sequence.preferred_batch_sizes,
            )
            if max_batch > 0
            else None
        )
    buckets = base.buckets
    if "sequence_buckets" in config:
        if sequence is not None:
            raise InvalidArgument(f"{where}: sequence_buckets and sequence_batching exclude each other")
        buckets = parse_buckets(
            config["sequence_buckets"],
            [(t.name, t.datatype, t.dims) for t in inputs],
            [(t.name, t.datatype, t.dims) for t in outputs],
            max_batch > 0,
            where,
        )
    text = base.text
    if config.get(TEXT_KEY) is not None:
        if sequence is not None:
            raise InvalidArgument(f"{where}: a text input and sequence_batching exclude each other")
        text = parse_text(config[TEXT_KEY], [(t.name, t.datatype, t.dims) for t in inputs], where)
    policy = version_policy_of(config) if config.get("version_policy") else base.version_policy
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
        sequence=sequence,
        buckets=buckets,
        text=text,
    )


def _without_states(
    policy: SequencePolicy,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    where: str,
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The tensors clients see: the graph's (or the config's) less the states the server feeds and
    keeps. A state the graph lists must agree with it in datatype and dims."""
    for state in policy.states:
        for tensors, name in ((inputs, state.input_name), (outputs, state.output_name)):
            found = next((t for t in tensors if t.name == name), None)
            if found is None:
                continue
            dims_agree = len(found.dims) == len(state.dims) and all(
                g in (-1, d) for g, d in zip(found.dims, state.dims, strict=True)
            )
            if found.datatype != state.datatype or not dims_agree:
                raise InvalidArgument(
                    f"{where}: state tensor {name!r} is {state.datatype} {list(state.dims)} in "
                    f"sequence_batching but {found.datatype} {list(found.dims)} in the model"
                )
    kept_in, kept_out = policy.state_inputs(), policy.state_outputs()
    served_in = tuple(t for t in inputs if t.name not in kept_in)
    served_out = tuple(t for t in outputs if t.name not in kept_out)
    if not served_in or not served_out:
        raise InvalidArgument(f"{where}: the states leave clients no input or no output")
    return served_in, served_out


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
    if spec.sequence is not None:
        config["sequence_batching"] = policy_to_config(spec.sequence)
    elif spec.batching is not None:
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
    if spec.buckets is not None:
        config["sequence_buckets"] = buckets_to_config(spec.buckets)
    if spec.text is not None:
        config[TEXT_KEY] = spec.text.to_config()
    if spec.parameters:
        config["parameters"] = dict(spec.parameters)
    return config
