"""Discovery parsing, version resolution from indexes, signatures from configs; merged answers."""

from __future__ import annotations

import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import model_config_pb2 as mc
from ferry.core.configproto import spec_from_config_proto
from ferry.core.errors import InvalidArgument, NotFound, Unavailable
from gateway.aggregate import merge_index, merge_statistics
from gateway.discovery import (
    Discovery,
    format_address,
    index_from_response,
    latest_ready,
    parse_target,
)
from gateway.settings import GatewaySettings


def test_parse_target() -> None:
    assert parse_target("workers.svc:8001") == ("workers.svc", 8001)
    assert parse_target("[::1]:9") == ("::1", 9)
    assert format_address("::1", 9) == "[::1]:9"
    for bad in ("nohost", ":80", "host:port", "host:70000"):
        with pytest.raises(InvalidArgument, match=f"worker address '{bad}' is not HOST:PORT"):
            parse_target(bad)


def test_settings_split_worker_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_GATEWAY_WORKERS", "a:1, b:2")
    assert GatewaySettings.load().workers == ["a:1", "b:2"]
    assert GatewaySettings.load(workers_dns="w.svc:8001").workers_dns == ["w.svc:8001"]


def test_discovery_needs_workers() -> None:
    with pytest.raises(InvalidArgument, match="the gateway needs --workers or --workers-dns"):
        Discovery([], [], lambda a: None)  # type: ignore[arg-type,return-value]


def index(*rows: tuple[str, str, str]) -> pb.RepositoryIndexResponse:
    resp = pb.RepositoryIndexResponse()
    for name, version, state in rows:
        resp.models.add(name=name, version=version, state=state)
    return resp


def test_index_parsing_and_latest_ready() -> None:
    parsed = index_from_response(index(("m", "1", "READY"), ("m", "2", "LOADING"), ("n", "", "UNAVAILABLE")))
    assert parsed == {"m": {"1": "READY", "2": "LOADING"}, "n": {}}
    assert latest_ready(parsed["m"]) == "1"
    assert latest_ready({"9": "READY", "10": "READY"}) == "10"
    assert latest_ready({}) is None


class FakeWorker:
    def __init__(self, serving: bool, models: dict[str, dict[str, str]]) -> None:
        self.address = str(id(self))
        self.serving = serving
        self.models = models

    def ready(self, model: str, version: str) -> bool:
        return self.serving and self.models.get(model, {}).get(version) == "READY"


def test_resolution_uses_only_healthy_workers() -> None:
    d = Discovery(["a:1"], [], lambda a: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(Unavailable, match=r"no healthy worker: 0 of 0 known workers are serving"):
        d.resolve("m")
    old = FakeWorker(True, {"m": {"1": "READY"}})
    new = FakeWorker(True, {"m": {"1": "UNLOADING", "2": "READY"}})
    sick = FakeWorker(False, {"m": {"3": "READY"}})
    d.workers = {w.address: w for w in (old, new, sick)}  # type: ignore[misc]
    assert d.resolve("m") == "2"
    assert d.resolve("m", "1") == "1"
    assert d.candidates("m", "1") == [old.address]
    assert d.versions("m") == {"1": "READY", "2": "READY"}
    with pytest.raises(NotFound, match="model 'm' version 3 is not ready on any worker"):
        d.resolve("m", "3")
    with pytest.raises(NotFound, match="model 'x' is not ready on any worker"):
        d.resolve("x")


def test_spec_from_config_proto() -> None:
    cfg = mc.ModelConfig(name="m", max_batch_size=16)
    cfg.input.add(name="input", data_type=mc.TYPE_FP32, dims=[8])
    cfg.output.add(name="output", data_type=mc.TYPE_STRING, dims=[1])
    cfg.response_cache.enable = False
    spec = spec_from_config_proto(cfg)
    assert spec.max_batch_size == 16
    assert spec.inputs[0].datatype == "FP32" and spec.inputs[0].dims == (8,)
    assert spec.outputs[0].datatype == "BYTES"
    assert spec.response_cache is False


def test_merge_index_keeps_the_best_state() -> None:
    merged = merge_index([index(("m", "1", "READY"), ("m", "2", "LOADING")), index(("m", "2", "READY"))])
    assert [(e.name, e.version, e.state) for e in merged.models] == [("m", "1", "READY"), ("m", "2", "READY")]


def test_merge_statistics_sums_workers() -> None:
    a = pb.ModelStatisticsResponse()
    s = a.model_stats.add(name="m", version="1", inference_count=3, execution_count=1, last_inference=5)
    s.inference_stats.success.count = 3
    s.batch_stats.add(batch_size=3).compute_infer.count = 1
    b = pb.ModelStatisticsResponse()
    t = b.model_stats.add(name="m", version="1", inference_count=2, execution_count=2, last_inference=9)
    t.inference_stats.success.count = 2
    t.batch_stats.add(batch_size=3).compute_infer.count = 1
    t.batch_stats.add(batch_size=1).compute_infer.count = 1
    m = merge_statistics([a, b]).model_stats[0]
    assert (m.inference_count, m.execution_count, m.last_inference) == (5, 3, 9)
    assert m.inference_stats.success.count == 5
    assert {x.batch_size: x.compute_infer.count for x in m.batch_stats} == {3: 2, 1: 1}
