"""Sequence batching with implicit state, through a real worker with the unchanged tritonclient.

The model is the zoo's LSTM text classifier exported to read its text a piece at a time
(``LSTMTextStep``), its (h, c) declared as state in config.json: the worker feeds and keeps it, so
a text sent token by token over one sequence must end where the whole-text torch model does.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from benchmarks.sequences import export_lstm_step, lstm_sequence_config
from ferry._proto.inference import grpc_service_pb2 as pb
from tests.integration.test_gateway import stats, wait_until
from tests.support.deps import require_module
from tests.support.gate import HOLD_US, wait_for_metric
from tests.support.models import publish
from tests.support.procs import ServiceProcess, free_port

tc = require_module("tritonclient.grpc")
tc_aio = require_module("tritonclient.grpc.aio")
torch = require_module("torch")

VOCAB, HIDDEN = 50, 16
MODELS = ("lstm", "lstm-two", "lstm-brief", "lstm-held")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("store")
    onnx_file = tmp_path_factory.mktemp("onnx") / "lstm_step.onnx"
    text = export_lstm_step(onnx_file, VOCAB, hidden=HIDDEN)
    publish(root, "lstm", 1, onnx_file, lstm_sequence_config(HIDDEN))
    publish(root, "lstm-two", 1, onnx_file, lstm_sequence_config(HIDDEN, max_sequences=2))
    publish(root, "lstm-brief", 1, onnx_file, lstm_sequence_config(HIDDEN, idle_us=300_000))
    # steps of different sequences wait for each other: 4 queued rows run as one batch
    held = lstm_sequence_config(HIDDEN, preferred_batch_size=[4], max_queue_delay_microseconds=HOLD_US)
    publish(root, "lstm-held", 1, onnx_file, held)
    bad = lstm_sequence_config(HIDDEN)
    bad["sequence_batching"]["state"][0]["input_name"] = "hidden_in"
    publish(root, "lstm-bad", 1, onnx_file, bad)
    metrics_port, http_port = free_port(), free_port()
    worker = ServiceProcess.serve(
        "worker",
        "--store",
        str(root),
        "--port",
        "0",
        "--metrics-port",
        str(metrics_port),
        "--http-port",
        str(http_port),
    ).start()
    try:
        client = tc.InferenceServerClient(worker.address)
        for model in MODELS:
            wait_until(lambda m=model: client.is_model_ready(m), 60, f"{model} ready")
        yield {"address": worker.address, "metrics": metrics_port, "http": http_port, "text": text}
    finally:
        worker.stop()


def reference(text: Any, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return text(torch.tensor([tokens], dtype=torch.int64)).numpy()


def piece(tokens: list[int]) -> Any:
    inp = tc.InferInput("tokens", [1, len(tokens)], "INT64")
    inp.set_data_from_numpy(np.array([tokens], dtype=np.int64))
    return inp


def step(client: Any, model: str, sid: int | str, tokens: list[int], **flags: bool) -> np.ndarray:
    result = client.infer(model, [piece(tokens)], sequence_id=sid, **flags)
    return result.as_numpy("logits")


def refused(call: Any) -> Any:
    with pytest.raises(tc.InferenceServerException) as info:
        call()
    return info.value


TOKENS = [3, 17, 8, 42, 5, 29]


def test_a_text_sent_token_by_token_ends_where_the_whole_text_does(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    for i, token in enumerate(TOKENS):
        first, last = i == 0, i == len(TOKENS) - 1
        got = step(client, "lstm", 11, [token], sequence_start=first, sequence_end=last)
        np.testing.assert_allclose(got, reference(served["text"], TOKENS[: i + 1]), atol=1e-5, rtol=1e-4)


def test_interleaved_sequences_keep_their_own_state(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    texts: dict[int | str, list[int]] = {21: [1, 2, 3, 4], "21": [9, 8, 7, 6], "reader-b": [5, 5, 6, 6]}
    for i in range(4):
        for sid, tokens in texts.items():  # 21 and "21" are two sequences: ids keep their type
            got = step(client, "lstm", sid, [tokens[i]], sequence_start=i == 0, sequence_end=i == 3)
            np.testing.assert_allclose(got, reference(served["text"], tokens[: i + 1]), atol=1e-5, rtol=1e-4)


def test_a_piece_may_carry_several_tokens(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    step(client, "lstm", 31, TOKENS[:3], sequence_start=True)
    got = step(client, "lstm", 31, TOKENS[3:], sequence_end=True)
    np.testing.assert_allclose(got, reference(served["text"], TOKENS), atol=1e-5, rtol=1e-4)


def test_steps_of_different_sequences_share_one_execution(served: dict[str, Any]) -> None:
    texts = {100 + n: [n + 1, n + 7, n + 3] for n in range(4)}
    before = stats(served["address"], "lstm-held")

    async def main() -> dict[int, np.ndarray]:
        client = tc_aio.InferenceServerClient(served["address"])
        try:
            last: dict[int, np.ndarray] = {}
            for i in range(3):  # each round: the 4 sequences' step i, queued until all 4 are there
                flags = {"sequence_start": i == 0, "sequence_end": i == 2}
                answers = await asyncio.gather(
                    *(
                        client.infer("lstm-held", [piece([t[i]])], sequence_id=sid, **flags)
                        for sid, t in texts.items()
                    )
                )
                last = {sid: a.as_numpy("logits") for sid, a in zip(texts, answers, strict=True)}
            return last
        finally:
            await client.close()

    last = asyncio.run(main())
    after = stats(served["address"], "lstm-held")
    assert after.inference_count - before.inference_count == 12
    assert after.execution_count - before.execution_count == 3, "each round's 4 steps should run as one batch"
    for sid, tokens in texts.items():
        np.testing.assert_allclose(last[sid], reference(served["text"], tokens), atol=1e-5, rtol=1e-4)


def test_a_stream_keeps_its_sequence_in_order(served: dict[str, Any]) -> None:
    answers: list[Any] = []
    client = tc.InferenceServerClient(served["address"])
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    try:
        for i, token in enumerate(TOKENS):
            first, last = i == 0, i == len(TOKENS) - 1
            client.async_stream_infer(
                "lstm",
                [piece([token])],
                request_id=str(i),
                sequence_id=41,
                sequence_start=first,
                sequence_end=last,
            )
        wait_until(lambda: len(answers) == len(TOKENS), 30, "every stream answer")
    finally:
        client.stop_stream()
    by_id = {}
    for result, error in answers:
        assert error is None, error
        by_id[int(result.get_response().id)] = result.as_numpy("logits")
    for i in range(len(TOKENS)):
        np.testing.assert_allclose(by_id[i], reference(served["text"], TOKENS[: i + 1]), atol=1e-5, rtol=1e-4)


def test_rest_carries_the_sequence_controls(served: dict[str, Any]) -> None:
    def post(tokens: list[int], **params: Any) -> dict[str, Any]:
        body = {
            "parameters": {"sequence_id": 51, **params},
            "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, len(tokens)], "data": tokens}],
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{served['http']}/v2/models/lstm/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            doc: dict[str, Any] = json.load(resp)
        return doc

    post(TOKENS[:2], sequence_start=True)
    doc = post(TOKENS[2:4], sequence_end=True)
    logits = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(1, -1)
    assert [o["name"] for o in doc["outputs"]] == ["logits"], "state outputs stay in the worker"
    np.testing.assert_allclose(logits, reference(served["text"], TOKENS[:4]), atol=1e-5, rtol=1e-4)


def test_metadata_and_config_show_the_sequence_model(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    meta = client.get_model_metadata("lstm")
    assert [i.name for i in meta.inputs] == ["tokens"] and [o.name for o in meta.outputs] == ["logits"]
    config = client.get_model_config("lstm").config
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    batching = config.sequence_batching
    assert batching.max_sequence_idle_microseconds == 5_000_000
    assert batching.oldest.max_candidate_sequences == 64
    assert [(s.input_name, s.output_name, list(s.dims)) for s in batching.state] == [
        ("h_in", "h_out", [1, HIDDEN]),
        ("c_in", "c_out", [1, HIDDEN]),
    ]
    assert batching.state[0].initial_state[0].zero_data


# -- bad input -------------------------------------------------------------------------------


def test_a_continuation_of_an_unknown_sequence_is_refused(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    err = refused(lambda: step(client, "lstm", 9001, [1]))
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "sequence 9001 of model 'lstm' is not live: its first request must carry sequence_start" in str(
        err
    )


def test_an_end_on_an_unknown_sequence_is_refused(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    err = refused(lambda: step(client, "lstm", 9002, [1], sequence_end=True))
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "is not live" in str(err)


def test_a_second_start_on_a_live_sequence_resets_its_state(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    step(client, "lstm", 61, [4, 4, 4], sequence_start=True)
    got = step(client, "lstm", 61, [7], sequence_start=True, sequence_end=True)
    np.testing.assert_allclose(got, reference(served["text"], [7]), atol=1e-5, rtol=1e-4)


def test_more_live_sequences_than_allowed_is_resource_exhausted(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    step(client, "lstm-two", 1, [1], sequence_start=True)
    step(client, "lstm-two", 2, [1], sequence_start=True)
    err = refused(lambda: step(client, "lstm-two", 3, [1], sequence_start=True))
    assert err.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "model 'lstm-two' holds 2 live sequences, its limit (max_candidate_sequences)" in str(err)
    step(client, "lstm-two", 1, [2], sequence_end=True)  # one ends: room for another
    step(client, "lstm-two", 3, [1], sequence_start=True, sequence_end=True)
    step(client, "lstm-two", 2, [2], sequence_end=True)


def test_an_idle_sequence_expires_and_its_continuation_is_told_so(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    step(client, "lstm-brief", 71, [1], sequence_start=True)
    assert metric_value(served, "lstm-brief") == 1
    wait_for_metric(served["metrics"], "ferry_worker_live_sequences", 0, timeout=30, model="lstm-brief")
    err = refused(lambda: step(client, "lstm-brief", 71, [2]))
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "sequence 71 of model 'lstm-brief' expired after 0.3 s idle" in str(err)


def metric_value(served: dict[str, Any], model: str) -> float | None:
    from tests.support.gate import metric

    return metric(served["metrics"], "ferry_worker_live_sequences", model=model)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "model 'lstm' is a sequence model: each request needs a sequence_id"),
        (
            {"sequence_start": pb.InferParameter(bool_param=True)},
            "sequence_start and sequence_end need a non-zero",
        ),
        (
            {"sequence_id": pb.InferParameter(double_param=1.5)},
            "parameter 'sequence_id' must be an integer or a string",
        ),
        ({"sequence_id": pb.InferParameter(int64_param=-4)}, "must be a positive integer or a string"),
        ({"sequence_id": pb.InferParameter(string_param="x" * 300)}, "over 256 characters"),
        (
            {
                "sequence_id": pb.InferParameter(int64_param=5),
                "sequence_start": pb.InferParameter(int64_param=1),
            },
            "parameter 'sequence_start' must be a bool",
        ),
    ],
)
def test_bad_sequence_controls(served: dict[str, Any], params: dict[str, Any], message: str) -> None:
    request = pb.ModelInferRequest(model_name="lstm")
    request.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.append(np.array([[1]], dtype=np.int64).tobytes())
    for k, v in params.items():
        request.parameters[k].CopyFrom(v)
    code, text = raw_infer(served["address"], request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in text, text


def raw_infer(address: str, request: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_two_rows_in_one_sequence_request_are_refused(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    two = tc.InferInput("tokens", [2, 1], "INT64")
    two.set_data_from_numpy(np.array([[1], [2]], dtype=np.int64))
    err = refused(lambda: client.infer("lstm", [two], sequence_id=81, sequence_start=True))
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "a sequence request carries one row, got 2" in str(err)


def test_a_client_cannot_send_the_state_itself(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    h = tc.InferInput("h_in", [1, 1, HIDDEN], "FP32")
    h.set_data_from_numpy(np.ones((1, 1, HIDDEN), dtype=np.float32))
    err = refused(lambda: client.infer("lstm", [piece([1]), h], sequence_id=82, sequence_start=True))
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "h_in" in str(err)


def test_a_state_the_graph_lacks_keeps_the_model_from_loading(served: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(served["address"])
    wait_until(
        lambda: any(m.name == "lstm-bad" and m.reason for m in client.get_model_repository_index().models),
        30,
        "lstm-bad's load to fail",
    )
    entry = next(m for m in client.get_model_repository_index().models if m.name == "lstm-bad")
    assert entry.state == "UNAVAILABLE"
    assert "sequence_batching names state tensors the graph does not have: ['hidden_in']" in entry.reason
