"""Length-aware batching without a server: the config, the bucket a length takes, the padding."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from ferry.core.buckets import Bucketing, bucket_for, default_sizes, pad_to_bucket, parse_buckets
from ferry.core.errors import InvalidArgument
from ferry.core.modelconfig import ModelSpec, TensorSpec, spec_from_config, spec_to_config

TOKENS = [("input_ids", "INT64", (-1,)), ("mask", "INT64", (-1,))]
LOGITS = [("logits", "FP32", (4,))]


def parse(raw: Any, inputs: Any = TOKENS, outputs: Any = LOGITS, batched: bool = True) -> Bucketing:
    return parse_buckets(raw, inputs, outputs, batched, "config of model 'm'")


def test_the_forms_of_the_setting() -> None:
    assert parse([16, 64]) == Bucketing((16, 64), ("input_ids", "mask"), 0)
    assert parse({"sizes": [8], "pad_value": 1}).pad_value == 1
    assert parse({"max_length": 100}).sizes == (8, 16, 32, 64, 100) == default_sizes(100)
    assert default_sizes(8) == (8,) and default_sizes(3) == (3,)


@pytest.mark.parametrize(
    ("raw", "kwargs", "message"),
    [
        ([], {}, "give 1 to 64 sizes, or max_length"),
        ([16, 8], {}, "sizes must be strictly ascending, got [16, 8]"),
        ([0, 8], {}, "sizes must be positive integers"),
        ([True], {}, "sizes must be positive integers"),
        ({"max_length": 0}, {}, "max_length must be an integer in [1, 1048576]"),
        ({"sizes": [8], "pad_value": "zero"}, {}, "pad_value must be a number"),
        ([8], {"batched": False}, "the model does not batch"),
        ([8], {"inputs": [("x", "FP32", (4,))]}, "no input has a free sequence dim"),
        ([8], {"inputs": [("text", "BYTES", (-1,))]}, "BYTES inputs ['text'] cannot be padded"),
        ([8], {"outputs": [("tags", "INT64", (-1,))]}, "outputs ['tags'] have a free dim"),
    ],
)
def test_bad_settings_name_the_problem(raw: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)) as info:
        parse(raw, **kwargs)
    assert "sequence_buckets" in info.value.message


def test_a_length_takes_the_smallest_bucket_that_holds_it() -> None:
    assert [bucket_for(n, (8, 16)) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, None]


def test_padding_goes_at_the_end_of_every_bucketed_input() -> None:
    b = Bucketing((8, 16), ("input_ids", "mask"), 0)
    ids = np.arange(1, 6, dtype=np.int64)[None, :]
    out = pad_to_bucket({"input_ids": ids, "mask": np.ones_like(ids), "extra": np.ones((1, 3))}, b)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert out["mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]] and out["extra"].shape == (1, 3)
    past = np.ones((1, 20), dtype=np.int64)
    assert pad_to_bucket({"input_ids": past, "mask": past}, b)["input_ids"].shape == (1, 20)
    ragged = {"input_ids": ids, "mask": np.ones((1, 4), dtype=np.int64)}
    assert pad_to_bucket(ragged, b)["input_ids"].shape == (1, 5), "inputs that disagree are left alone"


def test_the_config_round_trips_and_excludes_sequence_batching() -> None:
    graph = ModelSpec(
        "m",
        (TensorSpec("input_ids", "INT64", (-1,)),),
        (TensorSpec("logits", "FP32", (4,)),),
        max_batch_size=8,
    )
    spec = spec_from_config("m", {"sequence_buckets": [16, 32]}, graph)
    assert spec.buckets == Bucketing((16, 32), ("input_ids",), 0)
    assert spec_from_config("m", spec_to_config(spec), graph).buckets == spec.buckets
    state = {"input_name": "h", "output_name": "h2", "data_type": "FP32", "dims": [2]}
    both = {"sequence_buckets": [16], "sequence_batching": {"state": [state]}}
    with pytest.raises(InvalidArgument, match="sequence_buckets and sequence_batching exclude each other"):
        spec_from_config("m", both, graph)
