"""Warm-up samples: parsing, fitting a sample to a model, and the arrays a run feeds."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.core.errors import InvalidArgument
from ferry.core.modelconfig import spec_from_config
from ferry.core.warmup import MAX_COUNT, check, feeds, parse_samples, zeros_sample

W = "config of model 'm'"
INPUTS = {"input": ("FP32", (4,)), "ids": ("INT64", (-1,))}


def sample(**inputs: Any) -> list[dict[str, Any]]:
    return [{"name": "s", "batch_size": 3, "count": 2, "inputs": inputs}]


def good() -> dict[str, Any]:
    return {
        "input": {"data_type": "TYPE_FP32", "dims": [4], "random_data": True},
        "ids": {"data_type": "TYPE_INT64", "dims": [5], "zero_data": True},
    }


def test_a_config_sample_reaches_the_spec_and_feeds_its_batch(tmp_path: Path) -> None:
    config = {"max_batch_size": 8, "model_warmup": sample(**good())}
    tensors = {
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [2]}],
    }
    spec = spec_from_config("m", {**tensors, **config})
    (s,) = spec.warmup
    assert (s.name, s.batch_size, s.count) == ("s", 3, 2)
    check(s, INPUTS, 8, W)
    out = feeds(s, tmp_path, W, seed=1)
    assert out["input"].shape == (3, 4) and out["input"].dtype == np.float32
    assert (out["input"] >= 0).all() and (out["input"] < 1).all() and out["input"].std() > 0
    assert np.array_equal(out["input"][0], out["input"][2])  # one row, repeated over the batch
    assert out["ids"].shape == (3, 5) and out["ids"].dtype == np.int64 and not out["ids"].any()
    assert parse_samples([{"inputs": good(), "count": 0}], W)[0].count == 1  # 0 means once, as in Triton


def test_data_files_hold_one_row(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "x.bin").write_bytes(np.arange(4, dtype="<f4").tobytes())
    (tmp_path / "warmup" / "t.bin").write_bytes(b"".join(struct.pack("<I", len(t)) + t for t in (b"12", b"")))
    (s,) = parse_samples(
        [{"batch_size": 2, "inputs": {
            "input": {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": "x.bin"},
            "text": {"data_type": "TYPE_STRING", "dims": [2], "input_data_file": "t.bin"}}}], W)  # fmt: skip
    out = feeds(s, tmp_path, W)
    assert out["input"].tolist() == [[0, 1, 2, 3]] * 2
    assert out["text"].tolist() == [["12", ""]] * 2


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"s": 1}, "model_warmup must be a list of samples"),
        ([{"batch_size": 1}], "inputs must be an object naming every model input"),
        ([{"inputs": {"input": {"data_type": "TYPE_FP32", "dims": [4]}}}], "needs exactly one of"),
        ([{"inputs": {"input": {"data_type": "FP32", "dims": [4], "zero_data": True, "random_data": True}}}],
         "needs exactly one of zero_data, random_data, input_data_file, got ['zero_data', 'random_data']"),
        ([{"inputs": {"input": {"data_type": "TYPE_FP99", "dims": [4], "zero_data": True}}}],
         "unknown datatype 'TYPE_FP99'"),
        ([{"inputs": {"input": {"data_type": "TYPE_FP32", "dims": [-1], "zero_data": True}}}],
         "dims must be concrete (>= 1), got [-1]"),
        ([{"inputs": {"input": {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": "../x.bin"}}}],
         "input_data_file must be a plain file name in the model's warmup/ folder"),
        ([{"inputs": {"input": {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": "/etc/passwd"}}}],
         "must be a plain file name"),
        ([{"count": MAX_COUNT + 1, "inputs": good()}], f"count must be an integer in [0, {MAX_COUNT}]"),
        ([{"batch_size": -1, "inputs": good()}], "batch_size must be an integer"),
    ],
)  # fmt: skip
def test_bad_samples_name_the_problem(raw: Any, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_samples(raw, W)
    assert message in err.value.message and err.value.message.startswith(W)


@pytest.mark.parametrize(
    ("inputs", "batch", "max_batch", "message"),
    [
        ({"input": good()["input"]}, 3, 8, "leaves out inputs ['ids']"),
        ({**good(), "other": good()["input"]}, 3, 8, "names inputs the model does not have: ['other']"),
        ({**good(), "ids": {"data_type": "TYPE_INT32", "dims": [5], "zero_data": True}}, 3, 8,
         "input 'ids' is INT32, the model's is INT64"),
        ({**good(), "input": {"data_type": "TYPE_FP32", "dims": [5], "zero_data": True}}, 3, 8,
         "input 'input' has dims [5], the model's are [4]"),
        (good(), 9, 8, "batch_size must lie in [1, 8] (max_batch_size), got 9"),
        (good(), 0, 8, "batch_size must lie in [1, 8]"),
        (good(), 2, 0, "the model does not batch, so batch_size must be 0, got 2"),
        ({**good(), "ids": {"data_type": "TYPE_INT64", "dims": [1 << 24], "zero_data": True}}, 3, 8,
         "input 'ids' is over 16777216 elements"),
    ],
)  # fmt: skip
def test_samples_that_do_not_fit_the_model(inputs: Any, batch: int, max_batch: int, message: str) -> None:
    (s,) = parse_samples([{"name": "s", "batch_size": batch, "inputs": inputs}], W)
    with pytest.raises(InvalidArgument) as err:
        check(s, INPUTS, max_batch, W)
    assert message in err.value.message and "warm-up sample 's'" in err.value.message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "warmup/x.bin is missing (or not a plain file)"),
        (b"\0" * 15, "warmup/x.bin has 15 bytes, FP32 [4] needs 16"),
        ("link", "is missing (or not a plain file)"),
    ],
)
def test_bad_data_files(tmp_path: Path, content: bytes | str | None, message: str) -> None:
    (tmp_path / "warmup").mkdir()
    target = tmp_path / "warmup" / "x.bin"
    if content == "link":
        (tmp_path / "secret").write_bytes(b"\0" * 16)
        target.symlink_to(tmp_path / "secret")
    elif isinstance(content, bytes):
        target.write_bytes(content)
    (s,) = parse_samples([{"batch_size": 1, "inputs": {
        "input": {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": "x.bin"}}}], W)  # fmt: skip
    with pytest.raises(InvalidArgument) as err:
        feeds(s, tmp_path, W)
    assert message in err.value.message


def test_strings_files_must_hold_exactly_the_elements(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "t.bin").write_bytes(struct.pack("<I", 9) + b"short")  # length past the end
    (s,) = parse_samples([{"batch_size": 1, "inputs": {
        "t": {"data_type": "TYPE_STRING", "dims": [1], "input_data_file": "t.bin"}}}], W)  # fmt: skip
    with pytest.raises(InvalidArgument, match="does not hold exactly 1 length-prefixed strings"):
        feeds(s, tmp_path, W)


def test_without_samples_zeros_at_batch_one_twice(tmp_path: Path) -> None:
    z = zeros_sample([("input", "FP32", (4,)), ("text", "BYTES", (-1,))], batched=True)
    assert (z.batch_size, z.count) == (1, 2)
    out = feeds(z, tmp_path, W)
    assert out["input"].tolist() == [[0.0] * 4] and out["text"].tolist() == [[""]]
    flat = feeds(zeros_sample([("input", "FP32", (4,))], batched=False), tmp_path, W)
    assert flat["input"].shape == (4,)
