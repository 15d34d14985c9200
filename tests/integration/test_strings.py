"""BYTES tensors to and from ONNX STRING models, through a real worker and a real gateway.

The models cast text to numbers (the Triton string example's shape) and echo text back; both
raw (length-prefixed) and typed ``bytes_contents`` requests go through each server, and the
gateway's cache tells two strings apart.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.integration.test_gateway import wait_until, worker_and_gateway
from tests.support.deps import require_module
from tests.support.models import export_mlp, export_string_models, publish

tc = require_module("tritonclient.grpc")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("store")
    models = export_string_models(tmp_path_factory.mktemp("onnx"))
    publish(root, "parse", 1, models["parse"])
    publish(root, "echo", 1, models["echo"])
    publish(root, "strict-parse", 1, models["parse"], {"parameters": {"warmup_must_pass": "true"}})
    publish(root, "mlp", 1, export_mlp(tmp_path_factory.mktemp("mlp") / "mlp.onnx"))
    # warm-up samples from config.json: given text the Cast can parse, so it must pass
    text = {"data_type": "TYPE_STRING", "dims": [1], "input_data_file": "text.bin"}
    sample = {"name": "given", "batch_size": 4, "count": 3, "inputs": {"text": text}}
    strict = {"warmup_must_pass": "true"}
    publish(root, "warm-parse", 1, models["parse"], {"model_warmup": [sample], "parameters": strict})
    (root / "models" / "warm-parse" / "warmup").mkdir()
    (root / "models" / "warm-parse" / "warmup" / "text.bin").write_bytes(struct.pack("<I", 2) + b"41")
    wrong = {"name": "wrong", "batch_size": 1, "inputs": {"words": text}}
    publish(root, "bad-warm", 1, models["parse"], {"model_warmup": [wrong]})
    with worker_and_gateway(root, ("parse", "echo", "mlp", "warm-parse")) as (addresses, procs):
        yield {"addresses": addresses, "procs": procs}


HOPS = ["worker", "gateway"]


def _text(values: list[list[bytes]]) -> Any:
    array = np.array(values, dtype=object)
    inp = tc.InferInput("text", list(array.shape), "BYTES")
    inp.set_data_from_numpy(array)
    return inp


@pytest.mark.parametrize("hop", HOPS)
def test_bytes_become_strings_and_strings_come_back_as_bytes(servers: dict[str, Any], hop: str) -> None:
    client = tc.InferenceServerClient(servers["addresses"][hop])
    numbers = client.infer("parse", [_text([[b"12"], [b"-7"]])]).as_numpy("number")
    assert numbers.tolist() == [[13], [-6]]
    words = [["héllo".encode(), b"plain"], ["日本".encode(), b""]]
    same = client.infer("echo", [_text(words)]).as_numpy("same")
    assert same.tolist() == words  # UTF-8 in, UTF-8 out, empty strings kept


def _typed_request(model: str, values: list[bytes], shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=shape)
    tensor.contents.bytes_contents.extend(values)
    return request


@pytest.mark.parametrize("hop", HOPS)
def test_typed_bytes_contents_work_too(servers: dict[str, Any], hop: str) -> None:
    with grpc.insecure_channel(servers["addresses"][hop]) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        reply = stub.ModelInfer(_typed_request("parse", [b"41", b"1"], [2, 1]), timeout=30)
    assert np.frombuffer(reply.raw_output_contents[0], "<i8").tolist() == [42, 2]


def _status(stub: Any, request: pb.ModelInferRequest) -> tuple[str, str]:
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    return "OK", ""


@pytest.mark.parametrize("hop", HOPS)
def test_bad_strings_are_invalid_argument_naming_input_and_element(servers: dict[str, Any], hop: str) -> None:
    with grpc.insecure_channel(servers["addresses"][hop]) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        code, message = _status(stub, _typed_request("parse", [b"1", b"\xff\xfe"], [2, 1]))
        assert code == "INVALID_ARGUMENT"
        assert "input 'text': element 1 is not valid UTF-8" in message
        raw = pb.ModelInferRequest(model_name="parse")
        raw.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
        raw.raw_input_contents.append(struct.pack("<I", 50) + b"short")  # the prefix runs past the end
        code, message = _status(stub, raw)
        assert code == "INVALID_ARGUMENT" and "runs past the end of the content" in message, message
        numeric = pb.ModelInferRequest(model_name="mlp")
        numeric.inputs.add(name="input", datatype="BYTES", shape=[1, 8])
        numeric.raw_input_contents.append(b"".join(struct.pack("<I", 1) + b"1" for _ in range(8)))
        code, message = _status(stub, numeric)
        assert code == "INVALID_ARGUMENT" and "datatype BYTES does not match the model's FP32" in message


def test_the_gateway_cache_tells_strings_apart(servers: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(servers["addresses"]["gateway"])

    def parse(text: bytes) -> tuple[int, bool]:
        result = client.infer("parse", [_text([[text]])])
        params = result.get_response().parameters
        hit = "ferry_cache_hit" in params and params["ferry_cache_hit"].bool_param
        return int(result.as_numpy("number")[0, 0]), hit

    assert parse(b"100") == (101, False)
    assert parse(b"100") == (101, True)
    assert parse(b"1000") == (1001, False)  # a longer string is another key, not a prefix match
    assert parse(b"10") == (11, False)


def test_a_string_model_becomes_ready_though_empty_strings_fail_its_warmup(servers: dict[str, Any]) -> None:
    """The warm-up feeds empty strings, which `parse` cannot cast: logged, and the model serves."""
    client = tc.InferenceServerClient(servers["addresses"]["worker"])
    assert client.is_model_ready("parse")
    log = "".join(servers["procs"][0].lines)
    assert "warm-up failed" in log and "parse" in log


def test_a_model_whose_warmup_must_pass_does_not_serve_when_it_fails(servers: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(servers["addresses"]["worker"])

    def entry() -> Any:
        return next((m for m in client.get_model_repository_index().models if m.name == "strict-parse"), None)

    wait_until(lambda: entry() is not None and entry().state == "UNAVAILABLE", 30, "strict-parse settles")
    assert "warm-up failed and warmup_must_pass is set" in entry().reason
    assert not client.is_model_ready("strict-parse")


def test_given_warmup_samples_run_and_a_misfit_fails_the_load(
    servers: dict[str, Any],
) -> None:
    """warm-parse must pass its warm-up, which empty strings would fail: its given text ran."""
    client = tc.InferenceServerClient(servers["addresses"]["worker"])
    assert client.is_model_ready("warm-parse")
    assert int(client.infer("warm-parse", [_text([[b"41"]])]).as_numpy("number")[0, 0]) == 42

    def entry() -> Any:
        return next((m for m in client.get_model_repository_index().models if m.name == "bad-warm"), None)

    wait_until(lambda: entry() is not None and entry().state == "UNAVAILABLE", 30, "bad-warm settles")
    assert "warm-up sample 'wrong' leaves out inputs ['text']" in entry().reason
