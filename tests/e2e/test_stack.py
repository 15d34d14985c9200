"""The whole stack through the CLI: up, status, infer, stop, and the README's main flow."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil

from ferry.stack import port_is_free
from tests.e2e.conftest import (
    FERRY,
    RunningStack,
    descendants,
    ferry,
    running_stack,
    stack_flags,
    start_up,
    wait_for_line,
)


def test_status_shows_every_service_serving(stack: RunningStack) -> None:
    result = ferry("status", *stack.stack_args())
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("gateway", "trainer", "exporter", "worker-1", "worker-2"):
        assert re.search(rf"^{name}\s+127\.0\.0\.1:\d+\s+SERVING$", result.stdout, re.M), result.stdout
    # the gateway's KServe v2 REST port beside its gRPC port, on a port of its own
    assert re.search(r"^gateway-http\s+http://127\.0\.0\.1:\d+\s+SERVING$", result.stdout, re.M), (
        result.stdout
    )
    services = json.loads(Path(stack.state_file).read_text())["services"]
    assert services["gateway-http"] != f"http://{services['gateway']}"
    # redis-server is a dev dependency: the stack must have started its private one, not fallen back
    assert re.search(r"^redis\s+redis://127\.0\.0\.1:\d+/0\s+SERVING$", result.stdout, re.M), result.stdout
    assert "result cache: private redis-server at redis://127.0.0.1:" in "".join(stack.lines)


def test_infer_prints_top_classes(stack: RunningStack, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    result = ferry("infer", "cnn", str(tmp_path / "x.npy"), "--top-k", "3", *stack.stack_args())
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("row ")]
    assert len(rows) == 2 and rows[0].count("class ") == 3


def test_the_gateway_answers_kserve_v2_rest_on_its_http_port(stack: RunningStack) -> None:
    """`ferry up` opens the gateway's REST port: a tritonclient.http infer through it."""
    import tritonclient.http as th

    url = json.loads(Path(stack.state_file).read_text())["services"]["gateway-http"]
    client = th.InferenceServerClient(url.removeprefix("http://"))
    x = th.InferInput("input", [1, 1, 8, 8], "FP32")
    x.set_data_from_numpy(np.ones((1, 1, 8, 8), np.float32))
    assert client.infer("cnn", [x]).as_numpy("output").shape == (1, 10)


def test_infer_json_outputs(stack: RunningStack, tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"input": np.ones((1, 1, 8, 8)).tolist()}))
    result = ferry("infer", "cnn", str(tmp_path / "x.json"), *stack.stack_args())
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["version"] == "1" and np.asarray(answer["outputs"]["output"]).shape == (1, 10)


def test_infer_wrong_shape_or_dtype_exits_non_zero(stack: RunningStack, tmp_path: Path) -> None:
    np.save(tmp_path / "shape.npy", np.zeros((1, 1, 9, 9), np.float32))
    result = ferry("infer", "cnn", str(tmp_path / "shape.npy"), *stack.stack_args())
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "does not match the model's [-1, 1, 8, 8]" in result.stderr
    np.save(tmp_path / "dtype.npy", np.zeros((1, 1, 8, 8), np.float64))
    result = ferry("infer", "cnn", str(tmp_path / "dtype.npy"), *stack.stack_args())
    assert result.returncode == 1 and "datatype FP64 does not match the model's FP32" in result.stderr


def test_infer_unknown_model_exits_non_zero(stack: RunningStack, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    result = ferry("infer", "nope", str(tmp_path / "x.npy"), *stack.stack_args())
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr


def test_up_refuses_a_taken_port_and_leaves_nothing(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        flags = [f if f != "0" else str(port) for f in stack_flags(tmp_path)]
        proc = subprocess.Popen(
            [*FERRY, "up", "--no-demo", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    # --base-port is the gateway's HTTP port (its gRPC port is +1, Triton's layout)
    assert f"gateway-http port {port} (held by pid {os.getpid()})" in err and "already in use" in err
    assert not (tmp_path / "stack.json").exists()


def test_up_stops_every_process_on_sigterm(tmp_path: Path) -> None:
    proc = start_up(tmp_path).proc
    try:
        children = descendants(proc.pid)
        assert len(children) >= 5, [c.cmdline() for c in children]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

    def alive() -> list[psutil.Process]:
        return [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive():
        time.sleep(0.1)
    assert not alive(), f"orphans left: {[c.cmdline() for c in alive()]}"
    assert not (tmp_path / "stack.json").exists()


def test_up_killed_with_sigkill_leaves_no_orphans_and_starts_again(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG on every child: the kernel kills them with the supervisor, redis-server too."""
    proc = start_up(tmp_path).proc
    try:
        children = descendants(proc.pid)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert len(children) >= 6 and "redis-server" in names, names
        state = json.loads((tmp_path / "stack.json").read_text())
        ports = [int(a.rsplit(":", 1)[1].split("/")[0]) for a in state["services"].values()]
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()

    def alive() -> list[psutil.Process]:
        return [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and alive():
        time.sleep(0.1)
    assert not alive(), f"orphans left: {[c.cmdline() for c in alive()]}"

    def held() -> list[dict[str, object]]:
        """The stack's ports still bound, with who holds each (an orphan outside the snapshot)."""
        taken = [p for p in ports if not port_is_free("127.0.0.1", p)]
        owners = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port in taken]
        return [{"port": c.laddr.port, "pid": c.pid, "status": c.status} for c in owners] or [
            {"port": p} for p in taken
        ]

    while time.monotonic() < deadline and held():  # a dying process releases its sockets last
        time.sleep(0.1)
    assert held() == []
    assert (tmp_path / "stack.json").exists()  # a SIGKILL leaves it: the next start must cope
    again = start_up(tmp_path)
    try:
        note = f"stack.json was left by a stack that is gone (pid {proc.pid}); replacing it"
        assert any(note in line for line in again.lines), "".join(again.lines)
        assert json.loads((tmp_path / "stack.json").read_text())["pid"] == again.proc.pid
    finally:
        again.proc.terminate()
        again.proc.wait(60)


def test_up_refuses_to_start_beside_a_running_stack(tmp_path: Path) -> None:
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "stack.json").write_text(json.dumps({"pid": holder.pid, "services": {}}))
        result = ferry("up", "--no-demo", *stack_flags(tmp_path), timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert f"a stack is already running from {tmp_path / 'stack.json'} (pid {holder.pid})" in result.stderr
    assert f"stop it with `kill {holder.pid}`" in result.stderr


def test_a_crashed_worker_is_reported_and_restarted(tmp_path: Path) -> None:
    with running_stack(tmp_path) as stack:
        _crash_worker_1(stack)


def _crash_worker_1(stack: RunningStack) -> None:
    state = json.loads(Path(stack.state_file).read_text())
    port = int(state["services"]["worker-1"].rsplit(":", 1)[1])
    victim = next(
        c
        for c in descendants(stack.proc.pid)
        if any(
            conn.laddr.port == port and conn.status == psutil.CONN_LISTEN
            for conn in c.net_connections("inet")
        )
    )
    victim.kill()
    wait_for_line(stack.proc, stack.lines, "worker-1 restarted", timeout=60)
    assert any("worker-1 exited with code" in line for line in stack.lines)
    assert ferry("status", *stack.stack_args()).returncode == 0


def test_readme_main_flow(tmp_path: Path) -> None:
    """`ferry demo`: train a CNN on digits, export it, serve it, classify the test split."""
    result = ferry("demo", *stack_flags(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "published 'digits' version 1" in out
    match = re.search(r"classified (\d+) held-out digits through the gateway: accuracy ([0-9.]+)", out)
    assert match, out
    assert int(match.group(1)) == 359
    assert float(match.group(2)) >= 0.95, out
    again = ferry("demo", *stack_flags(tmp_path), timeout=300)
    assert again.returncode == 0 and "found in the store; reusing it" in again.stdout


def test_train_with_an_unknown_dataset_exits_non_zero(stack: RunningStack) -> None:
    trainer = json.loads(Path(stack.state_file).read_text())["services"]["trainer"]
    result = ferry("train", "--model", "mlp", "--dataset", "imagenet", "--trainer", trainer)
    assert result.returncode == 1
    assert "error: INVALID_ARGUMENT: unknown dataset 'imagenet'" in result.stderr


def test_the_text_demo(tmp_path: Path) -> None:
    """`ferry demo --text`: a transformer and its tokenizer trained on the topics corpus, exported,
    served, and the held-out texts classified from strings through the gateway."""
    result = ferry("demo", "--text", *stack_flags(tmp_path), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "published 'topics' version 1" in out
    match = re.search(
        r"classified (\d+) held-out texts \(sent as strings\) through the gateway: accuracy ([0-9.]+)", out
    )
    assert match, out
    assert int(match.group(1)) == 480  # 20% of the corpus's 2400 texts
    assert float(match.group(2)) >= 0.85, out
    version = tmp_path / "store" / "models" / "topics" / "1"
    assert (version / "tokenizer.json").is_file()
    labels = (version / "labels.txt").read_text().split()
    assert len(labels) >= 2
