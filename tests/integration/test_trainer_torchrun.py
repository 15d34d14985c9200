"""The multi-machine path the docs give: the runner under torchrun (here 2 processes on one node),
no trainer involved, leaves a job record and checkpoints in the store like any trainer job."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support.deps import require_binary, require_module
from tests.support.procs import REPO, free_port

require_module("torch")


def test_torchrun_two_processes_write_a_job_into_the_store(tmp_path: Path) -> None:
    torchrun = require_binary("torchrun")
    spec = {
        "model": {"arch": "mlp", "params": {"hidden": [64]}},
        "dataset": {"name": "digits", "params": {"flatten": True}},
        "epochs": 3,
        "lr": 3e-3,
        "batch_size": 32,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    store = tmp_path / "store"
    argv = [torchrun, "--nnodes", "1", "--nproc-per-node", "2"]
    argv += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    argv += ["-m", "services.trainer.runner", "--store", str(store), "--job", "tr-1"]
    argv += ["--spec-file", str(tmp_path / "spec.json"), "--threads", "2"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((store / "jobs" / "tr-1.json").read_text())
    assert (record["state"], record["error"], record["world"]) == ("SUCCEEDED", "", 2)
    assert record["checkpoints"] == ["epoch-0001", "epoch-0002", "epoch-0003", "final"]
    assert record["test_metrics"]["test_accuracy"] >= 0.85
    final = json.loads((store / "checkpoints" / "tr-1" / "final" / "spec.json").read_text())
    assert final["job"] == "tr-1" and final["input"]["shape"] == [64]
