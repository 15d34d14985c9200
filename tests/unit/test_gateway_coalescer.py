"""Coalescer: validation before merging, raw concatenation and row split, the batching policy."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core import codec
from ferry.core.errors import InvalidArgument
from ferry.core.modelconfig import ModelSpec, TensorSpec
from gateway.coalescer import Batcher, Pending, merge, prepare, split
from tests.unit.test_gateway_cache import aio

SPEC = ModelSpec(
    name="m",
    inputs=(TensorSpec("x", "FP32", (3,)), TensorSpec("s", "BYTES", (1,))),
    outputs=(TensorSpec("y", "FP32", (3,)), TensorSpec("t", "BYTES", (1,))),
    max_batch_size=8,
)


def request(rows: int, seed: int = 0, typed: bool = False) -> pb.ModelInferRequest:
    x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + seed
    s = np.array([[f"row{seed}-{i}".encode() * (i + 1)] for i in range(rows)], dtype=object)
    req = pb.ModelInferRequest(model_name="m", id=f"r{seed}")
    if typed:
        t = req.inputs.add(name="x", datatype="FP32", shape=[rows, 3])
        t.contents.fp32_contents.extend(x.reshape(-1).tolist())
        b = req.inputs.add(name="s", datatype="BYTES", shape=[rows, 1])
        b.contents.bytes_contents.extend(s.reshape(-1).tolist())
    else:
        codec.add_input(req, "x", x)
        codec.add_input(req, "s", s)
    return req


def echo(merged: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """What a worker running an identity model would answer: outputs = inputs, raw."""
    arrays = codec.decode_inputs(merged)
    resp = pb.ModelInferResponse(model_name="m", model_version=merged.model_version)
    codec.add_output(resp, "y", arrays["x"])
    codec.add_output(resp, "t", arrays["s"])
    return resp


@pytest.mark.parametrize("typed", [False, True])
def test_merge_then_split_gives_each_request_its_own_rows(typed: bool) -> None:
    reqs = [request(1, 0, typed), request(3, 10, typed), request(2, 20, typed)]
    items = [prepare(SPEC, r) for r in reqs]
    assert len({i.signature for i in items}) == 1
    merged = merge(items, "4")
    assert merged.model_version == "4"
    assert list(merged.inputs[0].shape) == [6, 3]
    answers = split(echo(merged), [i.rows for i in items])
    for req, answer in zip(reqs, answers, strict=True):
        got = codec.decode_outputs(answer)
        want = codec.decode_inputs(req)
        np.testing.assert_array_equal(got["y"], want["x"])
        assert got["t"].tolist() == want["s"].tolist()
        assert answer.model_version == "4"


def test_split_handles_typed_outputs() -> None:
    items = [prepare(SPEC, request(2, 0)), prepare(SPEC, request(1, 5))]
    resp = echo(merge(items, "1"))
    typed = pb.ModelInferResponse(model_name="m", model_version="1")
    for n, t in enumerate(resp.outputs):
        arr = codec.array_from_raw(t.name, t.datatype, t.shape, resp.raw_output_contents[n])
        out = typed.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        codec.set_typed_contents(out.contents, arr)
    a, b = split(typed, [2, 1])
    assert list(a.outputs[0].contents.fp32_contents) == [0, 1, 2, 3, 4, 5]
    assert list(b.outputs[0].contents.fp32_contents) == [5, 6, 7]
    assert list(b.outputs[1].contents.bytes_contents) == [b"row5-0"]


def test_bad_requests_fail_alone_with_the_workers_messages() -> None:
    wrong_dtype = request(1)
    wrong_dtype.inputs[0].datatype = "FP64"
    with pytest.raises(InvalidArgument, match=r"input 'x': datatype FP64 does not match the model's FP32"):
        prepare(SPEC, wrong_dtype)
    short = request(2)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    with pytest.raises(InvalidArgument, match=r"tensor 'x': raw content is 20 bytes but shape \[2, 3\]"):
        prepare(SPEC, short)
    with pytest.raises(InvalidArgument, match="exceeds the model's max_batch_size 8"):
        prepare(SPEC, request(9))


def test_requests_that_differ_in_outputs_or_parameters_do_not_merge() -> None:
    a = request(1)
    b = request(1)
    b.outputs.add(name="y")
    c = request(1)
    c.parameters["temperature"].double_param = 0.5
    d = request(1)
    d.parameters["ferry_cache"].bool_param = False  # neutral: still merges with a
    sigs = [prepare(SPEC, r).signature for r in (a, b, c, d)]
    assert len({sigs[0], sigs[1], sigs[2]}) == 3
    assert sigs[0] == sigs[3]


def test_models_without_a_batch_axis_never_merge() -> None:
    spec = ModelSpec(name="m", inputs=(TensorSpec("x", "FP32", (2, 3)),), outputs=(), max_batch_size=0)
    req = pb.ModelInferRequest(model_name="m")
    codec.add_input(req, "x", np.zeros((2, 3), np.float32))
    assert prepare(spec, req).signature is None


@aio
async def test_batcher_forms_a_full_batch_from_one_pass_and_queues_the_rest() -> None:
    seen: list[int] = []
    release = asyncio.Event()

    async def dispatch(key: Hashable, batch: list[Pending]) -> None:
        seen.append(sum(p.item.rows for p in batch))
        await release.wait()
        for p in batch:
            p.future.set_result(p.item.rows)

    batcher = Batcher(dispatch, max_rows=4)
    items = [prepare(SPEC, request(1, n)) for n in range(9)]
    calls = [asyncio.ensure_future(batcher.submit("k", it, concurrency=1)) for it in items]
    await asyncio.sleep(0.01)
    assert seen == [4]  # submitted in one pass: the first batch leaves full; one in flight at a time
    release.set()
    assert await asyncio.gather(*calls) == [1] * 9
    assert seen == [4, 4, 1]
    assert batcher.queued() == 0


@aio
async def test_batcher_sends_a_lone_request_once_the_loop_is_idle() -> None:
    seen: list[int] = []

    async def dispatch(key: Hashable, batch: list[Pending]) -> None:
        seen.append(len(batch))
        for p in batch:
            p.future.set_result(p.item.rows)

    batcher = Batcher(dispatch, max_rows=64)
    call = asyncio.ensure_future(batcher.submit("k", prepare(SPEC, request(1)), concurrency=2))
    await asyncio.sleep(0.005)  # nothing else runs meanwhile: the loop is idle, so it leaves at once
    assert seen == [1]
    assert await call == 1


@aio
async def test_batcher_failure_reaches_every_member_and_skips_gone_callers() -> None:
    async def dispatch(key: Hashable, batch: list[Pending]) -> None:
        await asyncio.sleep(0.01)
        raise InvalidArgument("nope")

    batcher = Batcher(dispatch, max_rows=8)
    first = asyncio.ensure_future(batcher.submit("k", prepare(SPEC, request(1)), 1))
    gone = asyncio.ensure_future(batcher.submit("k", prepare(SPEC, request(1)), 1))
    second = asyncio.ensure_future(batcher.submit("k", prepare(SPEC, request(1)), 1))
    await asyncio.sleep(0)
    gone.cancel()
    for call in (first, second):
        with pytest.raises(InvalidArgument, match="nope"):
            await call


@aio
async def test_batches_never_exceed_the_models_max_batch_size() -> None:
    seen: list[int] = []
    release = asyncio.Event()

    async def dispatch(key: Hashable, batch: list[Pending]) -> None:
        seen.append(sum(p.item.rows for p in batch))
        await release.wait()
        for p in batch:
            p.future.set_result(None)

    batcher = Batcher(dispatch, max_rows=64)
    items = [prepare(SPEC, request(2, n)) for n in range(7)]
    calls = [asyncio.ensure_future(batcher.submit("k", it, 1, None, max_rows=5)) for it in items]
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(*calls)
    assert seen == [4, 4, 4, 2]  # 2-row requests under a 5-row cap: never 6
