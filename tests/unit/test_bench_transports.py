"""HTTP against gRPC in the benchmark: the ratios, and the REST client's request and answer codec
checked against the server's own (ferry.core.rest), without a server."""

from __future__ import annotations

import numpy as np

from benchmarks.rest_client import decode_response, encode_request
from benchmarks.stats import transport_ratios, transport_table
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.client.inference import build_request
from ferry.core import codec, rest
from tests.unit.test_bench_stats import point


def test_each_http_point_is_compared_with_the_grpc_point_beside_it() -> None:
    points = [
        point("gateway-nocache", 1000.0, c=1, p50_ms=1.0),
        point("gateway-http-json", 400.0, c=1, p50_ms=2.5),
        point("gateway-http-binary", 800.0, c=1, p50_ms=1.25),
        point("gateway-http-binary", 900.0, c=8),  # no gRPC point at c=8: no ratio
        point("worker", 5000.0, c=1),
    ]
    ratios = {(r["scenario"], r["concurrency"]): r for r in transport_ratios(points)}
    assert set(ratios) == {("gateway-http-json", 1), ("gateway-http-binary", 1)}
    assert ratios[("gateway-http-json", 1)]["throughput_ratio"] == 0.4
    assert ratios[("gateway-http-binary", 1)]["p50_ratio"] == 1.25
    table = transport_table(list(ratios.values()))
    assert "| cnn | 1 | gateway, cache off, HTTP JSON | 0.40x | 2.50x | 2.50 / 1.00 |" in table


def _request() -> pb.ModelInferRequest:
    x = np.arange(16, dtype=np.float32).reshape(2, 8) / 7
    return build_request("mlp", {"input": x}, parameters={"ferry_cache": False}, request_id="7")


def test_the_client_bodies_are_what_the_server_reads() -> None:
    original = _request()
    for binary in (False, True):
        body, headers = encode_request(original, binary)
        parsed, form = rest.infer_request(body, headers.get(rest.HEADER_LENGTH), "mlp", "")
        assert form.binary_default is binary
        assert parsed.id == "7" and parsed.parameters["ferry_cache"].bool_param is False
        np.testing.assert_array_equal(
            codec.decode_inputs(parsed)["input"], codec.decode_inputs(original)["input"]
        )


def test_the_client_reads_what_the_server_answers() -> None:
    response = pb.ModelInferResponse(model_name="mlp", model_version="1", id="7")
    y = np.array([[0.5, -1.25, 3.0]], np.float32)
    codec.add_output(response, "output", y)
    response.parameters["ferry_cache_hit"].bool_param = True
    for binary in (False, True):
        body, length = rest.infer_response(response, rest.OutputForm(binary_default=binary))
        back = decode_response(body, None if length is None else str(length))
        assert back.id == "7" and back.parameters["ferry_cache_hit"].bool_param
        assert codec.decode_outputs(back)["output"].tobytes() == y.tobytes()
