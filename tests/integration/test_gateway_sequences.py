"""Sequences through the gateway, with two real workers and tritonclient: each sequence sticks to one
worker (read back from each worker's own statistics), none is answered from the cache or shared,
and a sequence whose worker dies fails with UNAVAILABLE naming it instead of moving elsewhere.

The model is an ordinary one (the worker ignores sequence controls for it, as Triton does), so
what is checked here is the gateway's routing, not the state itself.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry._proto.ferry.v1 import admin_pb2, admin_pb2_grpc
from gateway.sequences import rendezvous
from tests.integration.test_gateway import start_gateway, start_workers, stats, wait_until
from tests.support.deps import require_module
from tests.support.models import export_mlp, publish
from tests.support.procs import ServiceProcess, free_port

tc = require_module("tritonclient.grpc")
th = require_module("tritonclient.http")
TIMEOUT_S = 30.0
X = np.random.default_rng(5).standard_normal((1, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    publish(root, "mlp", 1, export_mlp(tmp_path_factory.mktemp("onnx") / "mlp.onnx"), {"max_batch_size": 64})
    return root


@dataclass
class Pair:
    workers: list[ServiceProcess]
    gateway: ServiceProcess
    http_port: int


def up(store: Path) -> Pair:
    """Two workers and a gateway (in-process result cache on, REST on), once both serve mlp."""
    workers = start_workers(store, 2)
    http_port = free_port()
    try:
        gateway = start_gateway(workers, "--eject-base-s", "0.5", "--http-port", str(http_port))
    except Exception:
        for w in workers:
            w.stop()
        raise
    admin = admin_pb2_grpc.GatewayAdminStub(grpc.insecure_channel(gateway.address))

    def both_ready() -> bool:
        listed = admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=5).workers
        return len(listed) == 2 and all(
            w.serving and any(m.model == "mlp" and m.state == "READY" for m in w.models) for w in listed
        )

    try:
        wait_until(both_ready, 60, "both workers serving mlp through the gateway")
    except Exception:
        down(Pair(workers, gateway, http_port))
        raise
    return Pair(workers, gateway, http_port)


def down(pair: Pair) -> None:
    pair.gateway.stop()
    for w in pair.workers:
        w.stop()


@pytest.fixture(scope="module")
def pair(store: Path) -> Iterator[Pair]:
    started = up(store)
    try:
        yield started
    finally:
        down(started)


@pytest.fixture
def own_pair(store: Path) -> Iterator[Pair]:
    """A pair of the test's own: it kills one of the workers."""
    started = up(store)
    try:
        yield started
    finally:
        down(started)


def counts(workers: Sequence[ServiceProcess]) -> list[int]:
    """Rows each worker has run for mlp (its own ModelStatistics)."""
    return [stats(w.address, "mlp").inference_count for w in workers]


def delta(before: list[int], after: list[int]) -> list[int]:
    return [b - a for a, b in zip(before, after, strict=True)]


def step(client: Any, seq: int | str, start: bool = False, end: bool = False) -> Any:
    inp = tc.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    return client.infer(
        "mlp", [inp], sequence_id=seq, sequence_start=start, sequence_end=end, client_timeout=TIMEOUT_S
    )


def run_sequence(client: Any, seq: int | str, middle: int = 3) -> None:
    step(client, seq, start=True)
    for _ in range(middle):
        step(client, seq)
    step(client, seq, end=True)


def cache_stats(gateway: ServiceProcess) -> admin_pb2.CacheStatsResponse:
    with grpc.insecure_channel(gateway.address) as ch:
        return admin_pb2_grpc.GatewayAdminStub(ch).CacheStats(admin_pb2.CacheStatsRequest(), timeout=10)


def hit(result: Any) -> bool:
    params = result.get_response().parameters
    return "ferry_cache_hit" in params and params["ferry_cache_hit"].bool_param


# -- stickiness -------------------------------------------------------------------------------------
def test_every_request_of_a_sequence_reaches_one_worker(pair: Pair) -> None:
    workers, gateway = pair.workers, pair.gateway
    client = tc.InferenceServerClient(gateway.address)
    addresses = [w.address for w in workers]
    homes: dict[int | str, str] = {}
    for seq in [*range(1, 13), "s1", "s2", "s3", "s4"]:
        before = counts(workers)
        run_sequence(client, seq)
        moved = delta(before, counts(workers))
        assert sorted(moved) == [0, 5], f"sequence {seq!r} spread over workers: {moved}"
        homes[seq] = addresses[moved.index(5)]
        # the rendezvous choice over the workers: what any replica with these workers picks
        key = ("mlp", "str" if isinstance(seq, str) else "int", seq)
        assert homes[seq] == rendezvous(key, addresses)
    assert set(homes.values()) == set(addresses), "every sequence went to one worker"


def test_identical_sequence_requests_all_run(pair: Pair) -> None:
    workers, gateway = pair.workers, pair.gateway
    client = tc.InferenceServerClient(gateway.address)
    inp = tc.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    client.infer("mlp", [inp], client_timeout=TIMEOUT_S)
    assert hit(client.infer("mlp", [inp], client_timeout=TIMEOUT_S)), "the cache is on: a plain repeat hits"

    cache_before = cache_stats(gateway)
    stats_before = stats(gateway.address, "mlp", "1").inference_stats
    before = counts(workers)
    answers = [step(client, 100, start=True), step(client, 100), step(client, 100)]
    # the same step of the same sequence, twice at once: neither shared nor merged
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        clients = [tc.InferenceServerClient(gateway.address) for _ in range(2)]
        answers += list(pool.map(lambda c: step(c, 100), clients))
    answers.append(step(client, 100, end=True))
    assert sum(delta(before, counts(workers))) == 6, "every sequence request ran on a worker"
    assert not any(hit(a) for a in answers)
    cache_after = cache_stats(gateway)
    assert cache_after.hits - cache_before.hits == 0
    assert cache_after.stores - cache_before.stores == 0
    assert cache_after.single_flight_shared - cache_before.single_flight_shared == 0
    stats_after = stats(gateway.address, "mlp", "1").inference_stats
    assert stats_after.cache_hit.count - stats_before.cache_hit.count == 0
    assert stats_after.cache_miss.count - stats_before.cache_miss.count == 0  # never even looked up
    want = answers[0].as_numpy("output")
    for a in answers:
        np.testing.assert_array_equal(a.as_numpy("output"), want)


def test_a_stream_keeps_each_sequence_on_its_worker(pair: Pair) -> None:
    """The requests of a stream run concurrently at the gateway; a sequence's still reach one worker."""
    workers, gateway = pair.workers, pair.gateway
    client = tc.InferenceServerClient(gateway.address)
    results: list[tuple[Any, Any]] = []
    done = concurrent.futures.Future[None]()
    seqs = [201, 202, 203, 204]
    total = len(seqs) * 4

    def callback(result: Any, error: Any) -> None:
        results.append((result, error))
        if len(results) == total and not done.done():
            done.set_result(None)

    before = counts(workers)
    client.start_stream(callback=callback, stream_timeout=TIMEOUT_S)
    try:
        inp = tc.InferInput("input", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        for n in range(4):  # interleaved: every sequence's step n, then step n + 1
            for seq in seqs:
                client.async_stream_infer(
                    "mlp", [inp], request_id=f"{seq}-{n}", sequence_id=seq, sequence_start=n == 0,
                    sequence_end=n == 3,
                )  # fmt: skip
        done.result(timeout=TIMEOUT_S)
    finally:
        client.stop_stream()
    assert [e for _, e in results if e is not None] == []
    moved = delta(before, counts(workers))
    addresses = [w.address for w in workers]
    want = [0, 0]
    for seq in seqs:
        want[addresses.index(rendezvous(("mlp", "int", seq), addresses) or "")] += 4
    assert moved == want


def test_a_sequence_goes_on_over_rest_where_it_started_over_grpc(pair: Pair) -> None:
    """Both ports share one data plane: one pin, one worker, whichever way a request comes."""
    workers = pair.workers
    rest = th.InferenceServerClient(f"127.0.0.1:{pair.http_port}")
    before = counts(workers)
    step(tc.InferenceServerClient(pair.gateway.address), 301, start=True)
    for end in (False, False, True):
        inp = th.InferInput("input", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        result = rest.infer("mlp", [inp], sequence_id=301, sequence_end=end)
        assert "ferry_cache_hit" not in (result.get_response().get("parameters") or {})
    moved = delta(before, counts(workers))
    addresses = [w.address for w in workers]
    assert moved[addresses.index(rendezvous(("mlp", "int", 301), addresses) or "")] == 4
    assert sum(moved) == 4


# -- a dead worker ------------------------------------------------------------------------------------
def test_a_sequence_whose_worker_died_fails_and_a_new_start_goes_elsewhere(
    own_pair: Pair,
) -> None:
    workers, gateway = own_pair.workers, own_pair.gateway
    client = tc.InferenceServerClient(gateway.address)
    before = counts(workers)
    step(client, 7, start=True)
    step(client, 7)
    moved = delta(before, counts(workers))
    assert sorted(moved) == [0, 2]
    victim, survivor = (workers[0], workers[1]) if moved[0] == 2 else (workers[1], workers[0])

    assert victim.proc is not None
    victim.proc.kill()
    victim.proc.wait(10)
    for _ in range(2):  # the next continuation, and the one after: the state is gone for good
        with pytest.raises(tc.InferenceServerException) as err:
            step(client, 7)
        assert err.value.status() == "StatusCode.UNAVAILABLE"
        assert (
            f"sequence 7 of model 'mlp' lived on worker {victim.address}, which is gone; its state is lost; "
            "start the sequence again with sequence_start"
        ) in err.value.message()
        with pytest.raises(tc.InferenceServerException, match="which is gone"):
            step(client, 7, end=True)

    left = stats(survivor.address, "mlp").inference_count
    step(client, 7, start=True)  # picks afresh, among the workers still there
    step(client, 7)
    step(client, 7, end=True)
    assert stats(survivor.address, "mlp").inference_count - left == 3
    # other sequences never noticed: a new one starts and runs on the survivor
    run_sequence(client, 8, middle=1)
    assert stats(survivor.address, "mlp").inference_count - left == 6


# -- a model that really keeps state (the worker's sequence batching) --------------------------------
VOCAB, HIDDEN = 50, 16
TEXTS: dict[int | str, list[int]] = {
    31: [3, 17, 8, 42, 5],
    32: [9, 8, 7, 6, 5],
    "31": [5, 5, 6, 6, 7],
    "reader": [1, 2, 3, 4, 5],
}


@pytest.fixture(scope="module")
def stateful(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two workers serving the zoo's LSTM a piece at a time, its (h, c) kept as implicit state."""
    support = pytest.importorskip("benchmarks.sequences", reason="no sequence batching on the worker")
    if not hasattr(support, "export_lstm_step"):
        pytest.skip("no sequence batching on the worker")
    require_module("torch")
    root = tmp_path_factory.mktemp("store")
    onnx_file = tmp_path_factory.mktemp("onnx") / "lstm_step.onnx"
    text = support.export_lstm_step(onnx_file, VOCAB, hidden=HIDDEN)
    publish(root, "lstm", 1, onnx_file, support.lstm_sequence_config(HIDDEN, idle_us=60_000_000))
    workers = start_workers(root, 2)
    gateway = None
    try:
        gateway = start_gateway(workers)
        client = tc.InferenceServerClient(gateway.address)
        admin = admin_pb2_grpc.GatewayAdminStub(grpc.insecure_channel(gateway.address))

        def both_ready() -> bool:
            listed = admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=5).workers
            return len(listed) == 2 and all(
                w.serving and any(m.model == "lstm" and m.state == "READY" for m in w.models) for w in listed
            )

        wait_until(both_ready, 60, "both workers serving lstm through the gateway")
        yield {"workers": workers, "gateway": gateway, "client": client, "text": text}
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers:
            w.stop()


def reference(text: Any, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.asarray(text(torch.tensor([tokens], dtype=torch.int64)).numpy())


def piece(token: int) -> Any:
    inp = tc.InferInput("tokens", [1, 1], "INT64")
    inp.set_data_from_numpy(np.array([[token]], dtype=np.int64))
    return inp


def lstm_counts(workers: Sequence[ServiceProcess]) -> list[int]:
    return [stats(w.address, "lstm").inference_count for w in workers]


def test_stateful_sequences_through_the_gateway_end_where_the_whole_text_does(
    stateful: dict[str, Any],
) -> None:
    client, workers = stateful["client"], stateful["workers"]
    before = lstm_counts(workers)
    for i in range(5):  # interleaved, token by token, each sequence on its own worker
        for sid, tokens in TEXTS.items():
            got = client.infer(
                "lstm", [piece(tokens[i])], sequence_id=sid, sequence_start=i == 0, sequence_end=i == 4,
                client_timeout=TIMEOUT_S,
            ).as_numpy("logits")  # fmt: skip
            want = reference(stateful["text"], tokens[: i + 1])
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    addresses = [w.address for w in workers]
    want = [0, 0]
    for sid in TEXTS:
        kind = "str" if isinstance(sid, str) else "int"
        want[addresses.index(rendezvous(("lstm", kind, sid), addresses) or "")] += 5
    assert delta(before, lstm_counts(workers)) == want


def test_stateful_sequences_on_a_stream_run_in_order(stateful: dict[str, Any]) -> None:
    """Every piece is sent before any answer comes: the gateway runs each sequence's in order."""
    client = tc.InferenceServerClient(stateful["gateway"].address)
    answers: dict[str, Any] = {}
    errors: list[Any] = []
    done = concurrent.futures.Future[None]()
    total = sum(len(t) for t in TEXTS.values())

    def callback(result: Any, error: Any) -> None:
        if error is not None:
            errors.append(error)
        else:
            answers[result.get_response().id] = result.as_numpy("logits")
        if len(answers) + len(errors) == total and not done.done():
            done.set_result(None)

    client.start_stream(callback=callback, stream_timeout=TIMEOUT_S)
    try:
        for n, (sid, tokens) in enumerate(TEXTS.items()):
            for i, token in enumerate(tokens):
                client.async_stream_infer(
                    "lstm", [piece(token)], request_id=f"{n}-{i}", sequence_id=sid, sequence_start=i == 0,
                    sequence_end=i == len(tokens) - 1,
                )  # fmt: skip
        done.result(timeout=TIMEOUT_S)
    finally:
        client.stop_stream()
    assert errors == []
    for n, tokens in enumerate(TEXTS.values()):
        for i in range(len(tokens)):
            want = reference(stateful["text"], tokens[: i + 1])
            np.testing.assert_allclose(answers[f"{n}-{i}"], want, atol=1e-5, rtol=1e-4)
