"""Sequence batching with implicit state, after Triton's ``sequence_batching``: the policy a model's
``config.json`` declares, and the sequence controls a request carries. Pure.

A stateful model (an LSTM consuming one token per request, say) names pairs of graph tensors: an
input the server feeds and an output it keeps. Between a sequence's requests the worker holds that
state; clients send only the ordinary inputs::

    "sequence_batching": {
      "max_sequence_idle_microseconds": 5000000,
      "oldest": {"max_candidate_sequences": 256, "preferred_batch_size": [8],
                 "max_queue_delay_microseconds": 500},
      "state": [{"input_name": "h_in", "output_name": "h_out", "data_type": "TYPE_FP32", "dims": [1, 64],
                 "initial_state": [{"name": "zeros", "data_type": "TYPE_FP32", "dims": [1, 64],
                                    "zero_data": true}]}]
    }

``max_candidate_sequences`` bounds the live sequences of a model version (a new one past it is
RESOURCE_EXHAUSTED). Different sequences' requests batch together, oldest first, with the
strategy's queue delay and preferred sizes (``direct`` is read the same way: Ferry keeps no
per-slot batch). ``dims`` leave out the batch dimension when the model batches, and are fixed.
An initial state is zeros, or a ``data_file`` in the model's ``initial_state/`` folder holding
one state in row-major order. Explicit ``control_input`` tensors are not supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ferry.core.datatypes import from_config
from ferry.core.errors import InvalidArgument
from ferry.core.params import bool_param, config_int

DEFAULT_IDLE_US = 1_000_000  # Triton's default for max_sequence_idle_microseconds
DEFAULT_MAX_SEQUENCES = 1024
MAX_SEQUENCES = 1_000_000
MAX_STATE_ELEMENTS = 1 << 22  # one sequence's state tensor (16 MiB of FP32)
MAX_ID_CHARS = 256
INITIAL_STATE_DIR = "initial_state"
ID, START, END = "sequence_id", "sequence_start", "sequence_end"
CONTROL_PARAMETERS = frozenset({ID, START, END})


@dataclass(frozen=True)
class StateSpec:
    input_name: str
    output_name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension when the model batches
    data_file: str = ""  # under initial_state/; empty means zeros


@dataclass(frozen=True)
class SequencePolicy:
    states: tuple[StateSpec, ...]
    idle_us: int = DEFAULT_IDLE_US
    max_sequences: int = DEFAULT_MAX_SEQUENCES
    strategy: str = "oldest"  # oldest | direct; both batch across sequences here
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()

    def state_inputs(self) -> set[str]:
        return {s.input_name for s in self.states}

    def state_outputs(self) -> set[str]:
        return {s.output_name for s in self.states}


@dataclass(frozen=True)
class SequenceControl:
    """A request's place in its sequence. ``key`` keeps the id's type: 7 and "7" are two sequences."""

    key: tuple[str, int | str]
    start: bool
    end: bool

    def shown(self) -> str:
        return shown_id(self.key)


def shown_id(key: tuple[str, int | str]) -> str:
    """A sequence id as messages give it: ``7``, or ``'7'`` for a string id."""
    kind, value = key
    return str(value) if kind == "int" else repr(value)


def _count(raw: Mapping[str, Any], key: str, where: str, low: int, high: int, default: int) -> int:
    return config_int(raw, key, where, low, high, default, digits=True)


def _state(raw: object, where: str) -> StateSpec:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"{where}: each state must be an object")
    names = raw.get("input_name"), raw.get("output_name")
    if not all(isinstance(n, str) and n for n in names):
        raise InvalidArgument(f"{where}: a state needs input_name and output_name")
    input_name, output_name = str(names[0]), str(names[1])
    here = f"{where} state {input_name!r}"
    datatype = from_config(str(raw.get("data_type", "")), here)
    dims = tuple(int(d) for d in raw.get("dims", ()))
    if any(d < 1 for d in dims):
        raise InvalidArgument(f"{here}: dims must be fixed and positive, got {list(dims)}")
    elements = 1
    for d in dims:
        elements *= d
    if elements > MAX_STATE_ELEMENTS:
        raise InvalidArgument(f"{here}: {elements} elements, over the {MAX_STATE_ELEMENTS} a state may hold")
    if datatype == "BYTES":
        raise InvalidArgument(f"{here}: a BYTES state is not supported")
    initial = raw.get("initial_state") or []
    if not isinstance(initial, list) or len(initial) > 1:
        raise InvalidArgument(f"{here}: initial_state takes at most one entry")
    data_file = ""
    if initial:
        first = initial[0]
        if not isinstance(first, Mapping):
            raise InvalidArgument(f"{here}: initial_state entries must be objects")
        given = tuple(int(d) for d in first.get("dims", dims))
        if given != dims:
            raise InvalidArgument(f"{here}: initial_state dims {list(given)} must equal the state's")
        if "data_file" in first:
            data_file = str(first["data_file"])
            if not data_file or "/" in data_file or "\\" in data_file or data_file.startswith("."):
                raise InvalidArgument(
                    f"{here}: data_file {data_file!r} must be a plain file name in {INITIAL_STATE_DIR}/"
                )
        elif not first.get("zero_data", False):
            raise InvalidArgument(f"{here}: initial_state needs zero_data or data_file")
    return StateSpec(input_name, output_name, datatype, dims, data_file)


def parse_policy(raw: object, where: str) -> SequencePolicy:
    """``config.json``'s ``sequence_batching``; a config mistake is INVALID_ARGUMENT naming it."""
    where = f"{where} sequence_batching"
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"{where} must be an object")
    if raw.get("control_input"):
        raise InvalidArgument(
            f"{where}: control_input is not supported; Ferry keeps a sequence's place itself "
            "(sequence_id, sequence_start, sequence_end) and feeds only the declared states"
        )
    if raw.get("iterative_sequence"):
        raise InvalidArgument(f"{where}: iterative_sequence is not supported")
    if "direct" in raw and "oldest" in raw:
        raise InvalidArgument(f"{where}: choose one strategy, direct or oldest")
    strategy = "direct" if "direct" in raw else "oldest"
    knobs = raw.get(strategy) or {}
    if not isinstance(knobs, Mapping):
        raise InvalidArgument(f"{where}: {strategy} must be an object")
    states = tuple(_state(s, where) for s in raw.get("state") or ())
    if not states:
        raise InvalidArgument(f"{where}: declare at least one state (an input fed, an output kept)")
    for attr in ("input_name", "output_name"):
        names = [getattr(s, attr) for s in states]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"{where}: two states share an {attr}")
    preferred = knobs.get("preferred_batch_size", ()) if strategy == "oldest" else ()
    return SequencePolicy(
        states=states,
        idle_us=_count(raw, "max_sequence_idle_microseconds", where, 1, 86_400_000_000, DEFAULT_IDLE_US),
        max_sequences=_count(
            knobs, "max_candidate_sequences", where, 1, MAX_SEQUENCES, DEFAULT_MAX_SEQUENCES
        ),
        strategy=strategy,
        max_queue_delay_us=_count(knobs, "max_queue_delay_microseconds", where, 0, 60_000_000, 0),
        preferred_batch_sizes=tuple(int(x) for x in preferred),
    )


def policy_to_config(policy: SequencePolicy) -> dict[str, Any]:
    """The ``config.json`` form, as ``parse_policy`` reads it."""
    knobs: dict[str, Any] = {"max_queue_delay_microseconds": policy.max_queue_delay_us}
    if policy.strategy == "oldest":
        knobs["max_candidate_sequences"] = policy.max_sequences
        knobs["preferred_batch_size"] = list(policy.preferred_batch_sizes)
    states = []
    for s in policy.states:
        initial: dict[str, Any] = {"name": "initial", "data_type": s.datatype, "dims": list(s.dims)}
        initial.update({"data_file": s.data_file} if s.data_file else {"zero_data": True})
        states.append(
            {
                "input_name": s.input_name,
                "output_name": s.output_name,
                "data_type": s.datatype,
                "dims": list(s.dims),
                "initial_state": [initial],
            }
        )
    return {"max_sequence_idle_microseconds": policy.idle_us, policy.strategy: knobs, "state": states}


def sequence_control(params: Mapping[str, Any]) -> SequenceControl | None:
    """The request's sequence controls, or None when it names no sequence. An id of 0 or "" names
    none, as in Triton; start or end without an id is a mistake."""
    start, end = bool_param(params, START), bool_param(params, END)
    key: tuple[str, int | str] | None = None
    if ID in params:
        p = params[ID]
        kind = p.WhichOneof("parameter_choice")
        if kind in ("int64_param", "uint64_param"):
            number = int(getattr(p, kind))
            if number < 0:
                raise InvalidArgument(f"parameter {ID!r} must be a positive integer or a string: {number}")
            key = ("int", number) if number else None
        elif kind == "string_param":
            if len(p.string_param) > MAX_ID_CHARS:
                raise InvalidArgument(f"parameter {ID!r} is over {MAX_ID_CHARS} characters")
            key = ("str", p.string_param) if p.string_param else None
        else:
            raise InvalidArgument(f"parameter {ID!r} must be an integer or a string")
    if key is None:
        if start or end:
            raise InvalidArgument(f"{START} and {END} need a non-zero {ID}")
        return None
    return SequenceControl(key, start, end)
