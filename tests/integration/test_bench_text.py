"""A tiny bounded ``benchmarks.text`` run: real worker and gateway, raw text against token ids."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.support.procs import REPO

pytestmark = pytest.mark.solo  # its own servers: the file-order pass only


def test_the_text_bench_measures_both_inputs_at_both_hops() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.text", "--seconds", "1", "--requests", "120", "--runs", "5",
         "--concurrency", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    served = {(r["hop"], r["input"]): r for r in rows if "hop" in r}
    assert set(served) == {(h, i) for h in ("worker", "gateway") for i in ("token ids", "raw text")}
    for row in served.values():
        assert 0 < row["requests"] <= 120 and row["req_per_s"] > 0
    local = [r["in_process"] for r in rows if "in_process" in r]
    assert [r["batch"] for r in local] == [1, 32]
    assert all(r["tokenize_ms"] > 0 and r["onnx_ms"] > 0 for r in local)
    ratios = re.findall(r"\| (worker|gateway) \|.*\| ([0-9.]+)x \|", proc.stdout)
    assert [hop for hop, _ in ratios] == ["worker", "gateway"], proc.stdout
