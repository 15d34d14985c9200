"""Length-aware batching through a real worker: texts of different lengths share one run.

The model is the zoo's ``transformer_text`` (random weights), which masks its padding: a text
padded to a bucket must get the logits the same text gets alone, and requests of lengths 5, 9, 12
and 16 padded to the bucket of 16 must run as one execution.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from benchmarks.buckets import export_transformer
from tests.integration.test_gateway import stats, wait_until
from tests.support.deps import require_module
from tests.support.gate import HOLD_US
from tests.support.models import publish
from tests.support.procs import ServiceProcess

tc = require_module("tritonclient.grpc")
tc_aio = require_module("tritonclient.grpc.aio")
require_module("torch")

LENGTHS = (5, 9, 12, 16)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("store")
    onnx_file = export_transformer(tmp_path_factory.mktemp("onnx") / "tt.onnx", width=32, max_len=64)
    publish(root, "exact", 1, onnx_file, {"max_batch_size": 8, "dynamic_batching": {}})
    held = {"preferred_batch_size": [len(LENGTHS)], "max_queue_delay_microseconds": HOLD_US}
    config = {"max_batch_size": 8, "dynamic_batching": held, "sequence_buckets": [16, 64]}
    publish(root, "bucketed", 1, onnx_file, config)
    publish(root, "descending", 1, onnx_file, {"max_batch_size": 8, "sequence_buckets": [64, 16]})
    proc = ServiceProcess.serve("worker", "--store", str(root), "--port", "0").start()
    try:
        client = tc.InferenceServerClient(proc.address)
        for model in ("exact", "bucketed"):
            wait_until(lambda m=model: client.is_model_ready(m), 60, f"{model} ready")
        yield proc.address
    finally:
        proc.stop()


def text(length: int, seed: int) -> Any:
    tokens = np.random.default_rng(seed).integers(1, 1000, (1, length)).astype(np.int64)
    inp = tc.InferInput("input", [1, length], "INT64")
    inp.set_data_from_numpy(tokens)
    return inp


def test_texts_of_different_lengths_share_one_run_and_keep_their_answers(worker: str) -> None:
    client = tc.InferenceServerClient(worker)
    alone = [client.infer("exact", [text(n, n)]).as_numpy("output") for n in LENGTHS]
    before = stats(worker, "bucketed")

    async def together() -> list[np.ndarray]:
        aio = tc_aio.InferenceServerClient(worker)
        try:  # held until all four are queued: they run together only if padded to one shape
            answers = await asyncio.gather(*(aio.infer("bucketed", [text(n, n)]) for n in LENGTHS))
        finally:
            await aio.close()
        return [a.as_numpy("output") for a in answers]

    padded = asyncio.run(together())
    after = stats(worker, "bucketed")
    assert after.inference_count - before.inference_count == len(LENGTHS)
    assert after.execution_count - before.execution_count == 1
    for got, want in zip(padded, alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_a_bad_bucket_config_keeps_the_model_from_loading(worker: str) -> None:
    client = tc.InferenceServerClient(worker)
    wait_until(
        lambda: any(m.name == "descending" and m.reason for m in client.get_model_repository_index().models),
        30,
        "descending's load to fail",
    )
    entry = next(m for m in client.get_model_repository_index().models if m.name == "descending")
    assert entry.state == "UNAVAILABLE" and "sizes must be strictly ascending, got [64, 16]" in entry.reason
