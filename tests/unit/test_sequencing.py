"""Sequence batching without a server: the config policy, a request's controls, the live table."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.client.inference import set_parameter
from ferry.core.configproto import config_proto, spec_from_config_proto
from ferry.core.errors import InvalidArgument, ResourceExhausted
from ferry.core.modelconfig import ModelSpec, TensorSpec, spec_from_config, spec_to_config
from ferry.core.sequencing import SequenceControl, parse_policy, sequence_control
from services.inference.sequences import Sequences, initial_states

STATE = {"input_name": "h_in", "output_name": "h_out", "data_type": "TYPE_FP32", "dims": [2]}
GRAPH = ModelSpec(
    name="m",
    inputs=(TensorSpec("x", "FP32", (1,)), TensorSpec("h_in", "FP32", (2,))),
    outputs=(TensorSpec("y", "FP32", (1,)), TensorSpec("h_out", "FP32", (2,))),
    max_batch_size=8,
)


def config(**extra: Any) -> dict[str, Any]:
    return {"sequence_batching": {"state": [STATE], **extra}}


def test_states_leave_the_served_signature_and_the_config_round_trips() -> None:
    spec = spec_from_config(
        "m", config(oldest={"max_candidate_sequences": 5, "preferred_batch_size": [4]}), GRAPH
    )
    assert [t.name for t in spec.inputs] == ["x"] and [t.name for t in spec.outputs] == ["y"]
    assert spec.sequence is not None and spec.sequence.max_sequences == 5
    assert spec.batching is not None and spec.batching.preferred_batch_sizes == (4,)
    again = spec_from_config("m", spec_to_config(spec), GRAPH)
    assert again.sequence == spec.sequence
    via_proto = spec_from_config_proto(config_proto(spec))  # what a gateway rebuilds
    assert via_proto.sequence == spec.sequence and via_proto.inputs == spec.inputs


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"state": []}, "declare at least one state"),
        ({"state": [STATE], "control_input": [{"name": "START"}]}, "control_input is not supported"),
        ({"state": [STATE], "direct": {}, "oldest": {}}, "choose one strategy"),
        ({"state": [{**STATE, "dims": [-1]}]}, "dims must be fixed and positive"),
        ({"state": [{**STATE, "data_type": "TYPE_STRING"}]}, "a BYTES state is not supported"),
        ({"state": [{**STATE, "output_name": ""}]}, "a state needs input_name and output_name"),
        ({"state": [STATE, STATE]}, "two states share an input_name"),
        (
            {"state": [STATE], "max_sequence_idle_microseconds": 0},
            "max_sequence_idle_microseconds must be an integer in [1, 86400000000], got 0",
        ),
        ({"state": [STATE], "oldest": {"max_candidate_sequences": "many"}}, "must be an integer"),
        ({"state": [{**STATE, "initial_state": [{"data_file": "../x"}]}]}, "must be a plain file name"),
        (
            {"state": [{**STATE, "initial_state": [{"dims": [3], "zero_data": True}]}]},
            "must equal the state's",
        ),
        ({"state": [{**STATE, "initial_state": [{"name": "nothing"}]}]}, "needs zero_data or data_file"),
        ({"state": [{**STATE, "dims": [1 << 23]}]}, "over the 4194304 a state may hold"),
    ],
)
def test_bad_policies_name_the_problem(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match="sequence_batching") as info:
        parse_policy(raw, "config of model 'm'")
    assert message in info.value.message


def test_a_state_that_disagrees_with_the_graph_is_refused() -> None:
    wrong = re.escape("state tensor 'h_in' is FP32 [3] in sequence_batching")
    with pytest.raises(InvalidArgument, match=wrong):
        spec_from_config("m", {"sequence_batching": {"state": [{**STATE, "dims": [3]}]}}, GRAPH)
    with pytest.raises(InvalidArgument, match="exclude each other"):
        spec_from_config("m", {**config(), "dynamic_batching": {}}, GRAPH)


def params(**values: Any) -> dict[str, pb.InferParameter]:
    request = pb.ModelInferRequest()
    for key, value in values.items():
        set_parameter(request.parameters, key, value)
    return dict(request.parameters)


def test_controls_keep_the_id_type_and_zero_names_no_sequence() -> None:
    assert sequence_control(params(sequence_id=7, sequence_start=True)) == SequenceControl(
        ("int", 7), True, False
    )
    assert sequence_control(params(sequence_id="7", sequence_end="true")) == SequenceControl(
        ("str", "7"), False, True
    )
    assert sequence_control(params(sequence_id=0)) is None and sequence_control({}) is None
    u64 = {"sequence_id": pb.InferParameter(uint64_param=(1 << 64) - 1)}
    assert sequence_control(u64) == SequenceControl(("int", (1 << 64) - 1), False, False)
    with pytest.raises(InvalidArgument, match="need a non-zero sequence_id"):
        sequence_control(params(sequence_id="", sequence_end=True))


def test_initial_state_from_a_data_file(tmp_path: Path) -> None:
    (tmp_path / "initial_state").mkdir()
    (tmp_path / "initial_state" / "h.bin").write_bytes(np.array([1.5, -2], dtype="<f4").tobytes())
    policy = parse_policy({"state": [{**STATE, "initial_state": [{"data_file": "h.bin"}]}]}, "m")
    got = initial_states(policy, True, tmp_path, "m")
    np.testing.assert_array_equal(got["h_in"], [[1.5, -2.0]])
    (tmp_path / "initial_state" / "h.bin").write_bytes(b"\0" * 12)
    short = re.escape("initial_state/h.bin has 12 bytes, FP32 [2] needs 8")
    with pytest.raises(InvalidArgument, match=short):
        initial_states(policy, True, tmp_path, "m")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def table(clock: Clock, **extra: Any) -> Sequences:
    policy = parse_policy({"state": [STATE], **extra}, "m")
    return Sequences("m", policy, {"h_in": np.zeros((1, 2), np.float32)}, clock)


async def add(state: dict[str, np.ndarray]) -> Any:
    """A model whose state counts its steps and whose output is the state it was fed."""
    fed = state["h_in"]
    return {"y": fed.copy(), "h_out": fed + 1}, 0, {}


def run(seqs: Sequences, key: int, start: bool = False, end: bool = False) -> float:
    answer = asyncio.run(seqs.run(SequenceControl(("int", key), start, end), add))
    return float(answer[0]["y"][0, 0])


def test_state_carries_resets_on_start_and_frees_on_end() -> None:
    clock = Clock()
    seqs = table(clock)
    assert [run(seqs, 1, start=True), run(seqs, 1), run(seqs, 1)] == [0, 1, 2]
    assert run(seqs, 1, start=True) == 0, "a second start resets the state"
    assert run(seqs, 1, end=True) == 1 and len(seqs) == 0
    with pytest.raises(InvalidArgument, match="sequence 1 of model 'm' is not live"):
        run(seqs, 1)


def test_idle_sequences_expire_and_say_so() -> None:
    clock = Clock()
    seqs = table(clock, max_sequence_idle_microseconds=1_000_000)
    run(seqs, 5, start=True)
    clock.now += 0.5
    run(seqs, 6, start=True)
    clock.now += 0.6  # 5 is 1.1 s idle, 6 only 0.6 s
    assert seqs.expire(clock.now) == 1 and len(seqs) == 1
    with pytest.raises(InvalidArgument, match="sequence 5 of model 'm' expired after 1 s idle"):
        run(seqs, 5)
    assert run(seqs, 6) == 1


def test_live_sequences_are_bounded() -> None:
    clock = Clock()
    seqs = table(clock, oldest={"max_candidate_sequences": 2})
    run(seqs, 1, start=True)
    run(seqs, 2, start=True)
    with pytest.raises(ResourceExhausted, match="holds 2 live sequences"):
        run(seqs, 3, start=True)
    run(seqs, 1, end=True)
    assert run(seqs, 3, start=True) == 0


def test_a_failed_step_leaves_the_state_as_it_was() -> None:
    seqs = table(Clock())
    run(seqs, 1, start=True)

    async def broken(state: dict[str, np.ndarray]) -> Any:
        raise InvalidArgument("bad input")

    with pytest.raises(InvalidArgument, match="bad input"):
        asyncio.run(seqs.run(SequenceControl(("int", 1), False, False), broken))
    assert run(seqs, 1) == 1


def test_a_sequences_steps_run_in_arrival_order() -> None:
    seqs = table(Clock())
    seen: list[float] = []

    async def slow(state: dict[str, np.ndarray]) -> Any:
        await asyncio.sleep(0)
        seen.append(float(state["h_in"][0, 0]))
        return await add(state)

    async def main() -> None:
        first = SequenceControl(("int", 1), True, False)
        rest = SequenceControl(("int", 1), False, False)
        await asyncio.gather(seqs.run(first, slow), *(seqs.run(rest, slow) for _ in range(4)))

    asyncio.run(main())
    assert seen == [0, 1, 2, 3, 4]
