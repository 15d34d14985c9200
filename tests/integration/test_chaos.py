"""The chaos soak of ``benchmarks/chaos.py``, bounded to 24 s: three real workers, a gateway, a private
redis-server; under 16 lanes of load (2 s deadline) a worker is SIGKILLed and replaced on its port,
one is SIGSTOPped, Redis is killed and restarted, and version 2 of the model rolls out.

Every answer must be its version's (checked against in-process ONNX Runtime), every event must have
been applied and the fleet be whole again after it, the roll must complete, and failed requests stay
within ``FAILED_BOUND``. The report's table is printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from benchmarks import chaos
from ferry._proto.inference import grpc_service_pb2 as pb
from tests.support.deps import require_binary

pytestmark = pytest.mark.solo  # slow; its own servers: the file-order pass only

SEED = 20261203  # a fixed schedule, so a failure replays: python -m benchmarks.chaos --seed 20261203 ...
# Failed requests allowed: none. Measured on the 2-vCPU development machine (docs/benchmarks.md, "Chaos
# soak"): 0 failed in each of five runs of this length (29,000-35,000 requests each) and in two full
# 2-minute runs (158,837 and 136,672 requests), with the slowest answer at 105-275 ms against the 2 s
# deadline. A killed worker's calls fail over (UNAVAILABLE is retried on another worker), a frozen
# one's are retried past the per-try budget, a dead Redis is a cache miss, and a version unloaded
# under a call is re-resolved, so any failure is a regression to look at, not noise.
FAILED_BOUND = 0
ARGS = [
    "--seconds", "24", "--seed", str(SEED), "--warmup-s", "2", "--tail-s", "3", "--gap-s", "1,2",
    "--freeze-s", "1,2.5", "--redis-down-s", "0.2,1", "--roll-at", "0.35", "--pool", "4096",
    "--recover-timeout-s", "20", "--roll-deadline-s", "20",
]  # fmt: skip


def test_a_short_chaos_soak_answers_right_through_kills_freezes_redis_restarts_and_a_roll(
    tmp_path: Path,
) -> None:
    require_binary("redis-server")
    args = chaos.parse_args([*ARGS, "--store", str(tmp_path / "store")])
    report = asyncio.run(chaos.soak(args))
    print("\n" + chaos.table(report))

    assert report["wrong"] == 0, report["wrong_samples"]
    events = report["events"]
    assert {e["kind"] for e in events} == {"kill", "freeze", "redis", "roll"}, events
    assert report["every_event_applied"], events
    assert report["every_event_recovered"], events
    assert report["fleet_whole_at_end"]
    assert report["roll"]["completed"], report["roll"]
    assert report["answers_by_version"].get("1", 0) > 0 and report["answers_by_version"].get("2", 0) > 0
    assert 0 < report["hits"] < report["ok"]  # some hits, some misses
    assert report["failed"] <= FAILED_BOUND, (report["failed_by_status"], report["failure_samples"])
    assert report["ok"] >= 2000
    assert chaos.verdict(report) == 0


def test_the_soak_check_tells_a_mixed_answer_from_a_right_one(tmp_path: Path) -> None:
    """The wrong-answer count is not vacuous: an answer naming version 2 with version 1's output, or a
    version nobody published, is wrong; each version's own output is right."""
    pool = np.random.default_rng(0).standard_normal((4, chaos.FEATURES), dtype=np.float32)
    answers = chaos.Answers()
    outputs = {}
    for version in (1, 2):
        onnx_file = chaos.export_mlp(tmp_path / f"v{version}.onnx", seed=version - 1)
        outputs[version] = chaos.reference(onnx_file, pool)
        answers.add(version, outputs[version])

    def response(version: str, row: np.ndarray) -> pb.ModelInferResponse:
        resp = pb.ModelInferResponse(model_name="mlp", model_version=version)
        resp.outputs.add(name="output", datatype="FP32", shape=[1, chaos.CLASSES])
        resp.raw_output_contents.append(row[None].tobytes())
        return resp

    assert answers.problem(3, response("1", outputs[1][3])) is None
    assert answers.problem(3, response("2", outputs[2][3])) is None
    mixed = answers.problem(3, response("2", outputs[1][3]))
    assert mixed is not None and "version 1's answer" in mixed
    assert answers.problem(3, response("1", outputs[1][2])) is not None  # another input's answer
    assert "no published version" in (answers.problem(0, response("3", outputs[2][0])) or "")
