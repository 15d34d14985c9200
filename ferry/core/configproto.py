"""A model's spec in the protocol's messages, both ways: what the worker answers to
ModelMetadata and ModelConfig, and the spec the gateway rebuilds from a worker's ModelConfig."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import model_config_pb2 as mc
from ferry.core.datatypes import config_name
from ferry.core.modelconfig import ModelSpec, spec_from_config
from ferry.core.sequencing import SequencePolicy
from ferry.core.textinput import CONFIG_KEY as TEXT_KEY
from ferry.core.textinput import PROTO_PARAMETER as TEXT_PARAMETER
from ferry.core.textinput import from_proto_parameter, to_proto_parameter


def metadata_proto(spec: ModelSpec, versions: Sequence[int]) -> pb.ModelMetadataResponse:
    resp = pb.ModelMetadataResponse(
        name=spec.name, platform=spec.platform, versions=[str(v) for v in versions]
    )
    for src, dst in ((spec.served_inputs(), resp.inputs), (spec.outputs, resp.outputs)):
        for t in src:
            dst.add(name=t.name, datatype=t.datatype, shape=spec.full_shape(t))
    return resp


def _proto_datatype(datatype: str) -> int:
    return mc.DataType.Value(config_name(datatype))


def config_proto(spec: ModelSpec) -> mc.ModelConfig:
    cfg = mc.ModelConfig(
        name=spec.name, platform=spec.platform, backend="onnxruntime", max_batch_size=spec.max_batch_size
    )
    # A model that takes text takes its texts or its token ids: each input is then optional.
    alternatives = spec.text is not None
    for t in spec.served_inputs():
        cfg.input.add(
            name=t.name, data_type=_proto_datatype(t.datatype), dims=list(t.dims), optional=alternatives
        )
    for t in spec.outputs:
        cfg.output.add(name=t.name, data_type=_proto_datatype(t.datatype), dims=list(t.dims))
    if spec.sequence is not None:
        _sequence_proto(spec.sequence, cfg.sequence_batching)
    elif spec.batching is not None:
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
    if spec.text is not None:
        cfg.parameters[TEXT_PARAMETER].string_value = to_proto_parameter(spec.text)
    return cfg


def spec_from_config_proto(config: mc.ModelConfig) -> ModelSpec:
    """The serving signature a worker reported, in the form ``validate_request`` checks."""

    def tensors(items: Any) -> list[dict[str, Any]]:
        return [
            {"name": t.name, "data_type": mc.DataType.Name(t.data_type), "dims": list(t.dims)} for t in items
        ]

    text = config.parameters[TEXT_PARAMETER].string_value if TEXT_PARAMETER in config.parameters else ""
    text_entry = from_proto_parameter(text) if text else None
    text_name = (text_entry or {}).get("input")
    doc: dict[str, Any] = {
        "input": [t for t in tensors(config.input) if t["name"] != text_name],
        "output": tensors(config.output),
        "max_batch_size": config.max_batch_size,
        "response_cache": {"enable": config.response_cache.enable},
    }
    if text_entry is not None:
        doc[TEXT_KEY] = text_entry
    if config.platform:
        doc["platform"] = config.platform
    if config.WhichOneof("scheduling_choice") == "sequence_batching":
        doc["sequence_batching"] = json_format.MessageToDict(
            config.sequence_batching, preserving_proto_field_name=True
        )
    return spec_from_config(config.name, doc)


def _sequence_proto(policy: SequencePolicy, out: mc.ModelSequenceBatching) -> None:
    out.max_sequence_idle_microseconds = policy.idle_us
    if policy.strategy == "direct":
        out.direct.max_queue_delay_microseconds = policy.max_queue_delay_us
    else:
        out.oldest.max_candidate_sequences = policy.max_sequences
        out.oldest.preferred_batch_size.extend(policy.preferred_batch_sizes)
        out.oldest.max_queue_delay_microseconds = policy.max_queue_delay_us
    for s in policy.states:
        state = out.state.add(
            input_name=s.input_name,
            output_name=s.output_name,
            data_type=_proto_datatype(s.datatype),
            dims=list(s.dims),
        )
        initial = state.initial_state.add(name="initial", data_type=state.data_type, dims=list(s.dims))
        if s.data_file:
            initial.data_file = s.data_file
        else:
            initial.zero_data = True
