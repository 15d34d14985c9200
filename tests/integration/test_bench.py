"""A tiny bounded ``ferry bench`` run: real floor, worker and gateway processes, every answer checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import REPO

pytestmark = pytest.mark.solo  # slow; its own servers: the file-order pass only

BENCH = [sys.executable, "-m", "ferry.cli.main", "bench"]


def run_bench(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """A bounded ``ferry bench`` run that must succeed; its output and its ``results.json``."""
    short = ("--models", "mlp", "--warmup-s", "0.2", "--duration-s", "1")  # later flags win
    proc = subprocess.run(
        [*BENCH, *short, *args, "--output-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "results.json").read_text())


def test_bench_writes_json_markdown_and_png(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc, doc = run_bench(out, "--concurrency", "1,4", "--max-requests", "40")
    points = doc["points"]
    seen = {(p["scenario"], p["concurrency"]) for p in points}
    scenarios = ("ort", "floor", "worker", "gateway-nocache", "gateway-hits")
    assert seen == {(s, c) for s in scenarios for c in (1, 4)}
    for p in points:
        assert p["requests"] > 0, p
        assert p["errors"] == 0 and p["wrong"] == 0, p
        assert p["checked"] == p["requests"], p
        assert p["p50_ms"] <= p["p99_ms"] <= p["max_ms"]
    hits = [p for p in points if p["scenario"] == "gateway-hits"]
    assert all(p["hits"] == p["requests"] for p in hits)
    nocache = [p for p in points if p["scenario"] == "gateway-nocache"]
    assert all(p["hits"] == 0 and p["mean_batch"] >= 1 for p in nocache)
    md = (out / "results.md").read_text()
    assert "| mlp | 4 | worker direct |" in md and "x floor" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[10/10] mlp c=4" in proc.stdout


def test_bench_rejects_unknown_scenario(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ferry.cli.main", "bench", "--scenarios", "floor,nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown ['nope']; choose from ort, floor, worker, gateway-nocache, gateway-hits" in proc.stderr


def test_bench_rounds_report_the_median_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ("--concurrency", "1", "--scenarios", "floor,worker", "--rounds", "3", "--max-requests", "30")
    proc, doc = run_bench(out, *args)
    assert doc["meta"]["rounds"] == 3
    order = [(p["round"], p["scenario"]) for p in doc["points"]]
    assert order == [(r, s) for r in (1, 2, 3) for s in ("floor", "worker")]  # interleaved
    assert all(p["checked"] == p["requests"] > 0 for p in doc["points"])
    floors = {p["round"]: p["throughput"] for p in doc["points"] if p["scenario"] == "floor"}
    ratios = sorted(p["throughput"] / floors[p["round"]] for p in doc["points"] if p["scenario"] == "worker")
    md = (out / "results.md").read_text()
    assert "3 rounds, interleaved" in md
    row = next(line for line in md.splitlines() if line.startswith("| mlp | 1 | worker direct |"))
    assert f"| {ratios[1]:.2f} |" in row
    assert "(90/90)" not in row and "| 90/90 |" in row  # checked answers of all three rounds
    assert "median of 3 rounds" in md
    last = next(line for line in proc.stdout.splitlines() if line.startswith("[ 6/6]"))
    assert "worker" in last and "round 3" in last


def test_bench_rejects_bad_rounds() -> None:
    for bad in ("0", "-1", "two"):
        proc = subprocess.run([*BENCH, "--rounds", bad], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, bad
        assert f"argument --rounds: expected a positive integer, got '{bad}'" in proc.stderr


def test_bench_measures_http_beside_grpc_and_the_naive_server(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    scenarios = "naive,gateway-nocache,gateway-http-json,gateway-http-binary"
    _, doc = run_bench(out, "--scenarios", scenarios, "--concurrency", "1,4", "--max-requests", "40")
    points = doc["points"]
    assert {(p["scenario"], p["concurrency"]) for p in points} == {
        (s, c) for s in scenarios.split(",") for c in (1, 4)
    }
    for p in points:  # every answer (naive, gRPC, HTTP) checked against in-process ONNX Runtime
        assert p["requests"] > 0 and p["errors"] == 0 and p["wrong"] == 0 and p["checked"] == p["requests"], p
    ratios = {(r["scenario"], r["concurrency"]) for r in doc["transports"]}
    assert ratios == {(s, c) for s in ("gateway-http-json", "gateway-http-binary") for c in (1, 4)}
    assert all(r["throughput_ratio"] > 0 for r in doc["transports"])
    assert "## HTTP against gRPC through the gateway" in (out / "results.md").read_text()
