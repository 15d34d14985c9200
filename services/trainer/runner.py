"""The training loop, run in a child process: ``python -m services.trainer.runner``.

The trainer server never trains. For each job it starts this module in a new
process session; the job reads its spec from the job record, trains, writes a
checkpoint each epoch, and reports on stdout, one ``FERRY_EVENT {json}`` line per
event (started, progress, epoch, done, failed). The server is the only writer
of the job record. With ``nprocs > 1`` the runner spawns one process per rank
(torch.multiprocessing, DistributedDataParallel, gloo on CPU and NCCL on CUDA);
rank 0 reports and writes checkpoints.

The process dies with the trainer (``PR_SET_PDEATHSIG``), so a killed trainer
leaves no orphan that would race a resumed run. Cancelling is a SIGTERM to the
process group: the last complete checkpoint stays, half-written ones are in
``.staging-*`` folders the server removes.

Determinism: the model is built after ``manual_seed(seed)``, and every epoch
reseeds its shuffle and dropout from (seed, epoch), so the same seed in one
process gives the same weights, and a run resumed from an epoch checkpoint
repeats the epochs it lost exactly. A text job tokenizes with the tokenizer rank 0 fitted once
and saved as ``checkpoints/<job>/tokenizer.json`` (``checkpoints.prepare_tokenizer``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferry.core.lifetime import die_with_parent
from ferry.core.netutil import free_port
from ferry.core.store import CheckpointFiles
from services.trainer.records import EVENT_PREFIX, FAILED, RUNNING, SUCCEEDED, JobRecord, now_ms


class JobFailed(Exception):
    """A failure the user can act on (NaN loss...); its message becomes the job's error."""


LAST_EVENTS: dict[str, dict[str, Any]] = {}  # this process's last event of each kind (torchrun mode)


def emit(kind: str, **fields: Any) -> None:
    LAST_EVENTS[kind] = fields
    print(EVENT_PREFIX + json.dumps({"type": kind, **fields}), flush=True)


def lr_at(spec: dict[str, Any], epoch: int) -> float:
    """The learning rate of a 1-based epoch: linear warmup, then the schedule."""
    base, warm = spec["lr"], spec["warmup_epochs"]
    if epoch <= warm:
        return base * epoch / (warm + 1)
    k = epoch - warm - 1  # epochs since the schedule began
    schedule = spec["schedule"]
    if schedule == "step":
        return base * spec["gamma"] ** (k // spec["step_size"])
    if schedule == "exponential":
        return base * spec["gamma"] ** k
    if schedule == "cosine":
        span = max(1, spec["epochs"] - warm)
        return base * 0.5 * (1 + math.cos(math.pi * k / span))
    return base


def _make_optimizer(spec: dict[str, Any], params: Any) -> Any:
    import torch

    if spec["optimizer"] == "sgd":
        return torch.optim.SGD(
            params, lr=spec["lr"], momentum=spec["momentum"], weight_decay=spec["weight_decay"]
        )
    cls = torch.optim.Adam if spec["optimizer"] == "adam" else torch.optim.AdamW
    return cls(params, lr=spec["lr"], weight_decay=spec["weight_decay"])


def _loss_fn(spec: dict[str, Any]) -> Any:
    from torch import nn

    return {
        "cross_entropy": nn.CrossEntropyLoss,
        "mse": nn.MSELoss,
        "l1": nn.L1Loss,
        "smooth_l1": nn.SmoothL1Loss,
    }[spec["loss"]]()


def evaluate(model: Any, loss_fn: Any, x: Any, y: Any, classify: bool, batch: int = 1024) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over ``x``; empty input gives no metrics."""
    import torch

    if len(x) == 0:
        return {}
    model.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i : i + batch])
            total += float(loss_fn(out, y[i : i + batch])) * len(out)
            if classify:
                correct += int((out.argmax(1) == y[i : i + batch]).sum())
    metrics = {"loss": total / len(x)}
    if classify:
        metrics["accuracy"] = correct / len(x)
    return metrics


def train(rank: int, world: int, ctx: dict[str, Any]) -> None:
    """Run the job's epochs as ``rank`` of ``world`` processes."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from ferry.datasets import load_dataset
    from ferry.zoo import build_model
    from services.trainer import checkpoints as ckpt

    spec, job_dir = ctx["spec"], Path(ctx["job_dir"])
    torch.set_num_threads(max(1, ctx["threads"] // world))
    # auto: CUDA when every local rank can have a GPU of its own (NCCL refuses to share one)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    use_cuda = spec["device"] == "cuda" or (
        spec["device"] == "auto" and torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    )
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local % torch.cuda.device_count()}" if use_cuda else "cpu")
    if world > 1:
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            init_method=ctx.get("init") or f"tcp://127.0.0.1:{ctx['port']}",
            rank=rank,
            world_size=world,
        )
    seed = spec["seed"]
    encoder = None
    if spec.get("tokenizer"):  # a text job: rank 0 fits (or finds) the one tokenizer, all load it
        from ferry.core.text import TextEncoder, read_tokenizer

        if rank == 0:
            ckpt.prepare_tokenizer(job_dir, spec, ctx["store"])
        if world > 1:
            dist.barrier()
        tokenizer = read_tokenizer(job_dir / CheckpointFiles.TOKENIZER)
        encoder = TextEncoder(tokenizer, int(spec["tokenizer"]["max_length"]))
    data = load_dataset(spec["dataset"], store=ctx["store"], encoder=encoder)
    classify = data.task == "classification"
    order = np.random.default_rng(seed + 1).permutation(len(data.x_train))
    n_val = round(len(order) * spec["val_fraction"])

    def tensor(a: Any) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    xv, yv = tensor(data.x_train[order[:n_val]]), tensor(data.y_train[order[:n_val]])
    xt, yt = tensor(data.x_train[order[n_val:]]), tensor(data.y_train[order[n_val:]])
    torch.manual_seed(seed)
    model = build_model(spec["model"], ctx.get("allowed_factories", ()))
    if "factory" in spec["model"]:  # someone's code: checked here, in the job's process, never at submit
        from services.trainer.spec import check_fit

        check_fit(model, data, spec["model"]["factory"])
    model = model.to(device)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = _make_optimizer(spec, model.parameters())
    loss_fn = _loss_fn(spec)
    loop: dict[str, Any] = {"epoch": 0, "best": math.inf, "best_epoch": 0, "bad_epochs": 0, "history": []}
    if ctx.get("resume"):
        loop = ckpt.load_resume(job_dir / ctx["resume"], model, optimizer)
    lead = rank == 0
    if lead:
        emit("started", pid=os.getpid(), world=world, device=str(device), resumed_from=ctx.get("resume", ""))
    bs, epochs = spec["batch_size"], spec["epochs"]
    per_rank = len(xt) // world
    steps = math.ceil(per_rank / bs)
    stopped_early = loop.get("stopped_early", False)
    for epoch in range(loop["epoch"] + 1, epochs + 1):
        if stopped_early:
            break
        torch.manual_seed(seed * 100_003 + epoch)
        lr = lr_at(spec, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        perm = perm[: per_rank * world][rank::world].to(device)
        net.train()
        running, correct, seen, start, last = 0.0, 0, 0, time.monotonic(), 0.0
        for step in range(1, steps + 1):
            idx = perm[(step - 1) * bs : step * bs]
            xb, yb = xt[idx], yt[idx]
            optimizer.zero_grad(set_to_none=True)
            out = net(xb)
            loss = loss_fn(out, yb)
            value = float(loss)
            if not math.isfinite(value):
                raise JobFailed(f"loss became {value} (not finite) at epoch {epoch}, step {step}")
            loss.backward()
            if spec["grad_clip_norm"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip_norm"])
            optimizer.step()
            running += value * len(idx)
            seen += len(idx)
            if classify:
                correct += int((out.argmax(1) == yb).sum())
            now = time.monotonic()
            if lead and (now - last >= 0.5 or step == steps):
                last = now
                per_step = (now - start) / step
                emit(
                    "progress",
                    epoch=epoch,
                    epochs=epochs,
                    step=step,
                    steps=steps,
                    loss=running / seen,
                    samples_per_second=seen * world / max(now - start, 1e-9),
                    eta_seconds=per_step * ((steps - step) + steps * (epochs - epoch)),
                )
        elapsed = time.monotonic() - start
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": running / max(seen, 1),
            "epoch_seconds": elapsed,
            "samples_per_second": seen * world / max(elapsed, 1e-9),
        }
        if classify:
            metrics["train_accuracy"] = correct / max(seen, 1)
        metrics.update({f"val_{k}": v for k, v in evaluate(model, loss_fn, xv, yv, classify).items()})
        watched = metrics.get("val_loss", metrics["train_loss"])
        if watched < loop["best"] - spec["early_stopping_min_delta"]:
            loop.update(best=watched, best_epoch=epoch, bad_epochs=0)
        else:
            loop["bad_epochs"] += 1
        patience = spec["early_stopping_patience"]
        stopped_early = bool(patience and loop["bad_epochs"] >= patience)
        loop["history"].append(metrics)
        loop.update(epoch=epoch, stopped_early=stopped_early)
        if lead:
            tag = ckpt.epoch_tag(epoch)
            ckpt.save_checkpoint(job_dir, tag, model, spec, {"epoch": metrics}, optimizer, loop)
            emit("epoch", metrics=metrics, checkpoint=tag)
        if world > 1:
            dist.barrier()  # the other ranks wait for rank 0's checkpoint
    if stopped_early and loop["best_epoch"]:
        model.load_state_dict(ckpt.load_weights(job_dir / ckpt.epoch_tag(loop["best_epoch"])))
    test = evaluate(model, loss_fn, tensor(data.x_test), tensor(data.y_test), classify)
    if lead:
        summary = {
            "test": test,
            "history": loop["history"],
            "best_epoch": loop["best_epoch"],
            "stopped_early": stopped_early,
            "epochs_run": loop["epoch"],
        }
        ckpt.save_checkpoint(job_dir, ckpt.FINAL, model, spec, summary)
        emit("done", test=test, stopped_early=stopped_early, checkpoint=ckpt.FINAL)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _rank_main(rank: int, world: int, ctx: dict[str, Any]) -> None:
    die_with_parent(ctx["runner_pid"])
    _guarded(rank, world, ctx)


def _guarded(rank: int, world: int, ctx: dict[str, Any]) -> None:
    try:
        train(rank, world, ctx)
    except JobFailed as err:
        emit("failed", error=str(err), rank=rank)
        raise SystemExit(3) from err
    except Exception as err:
        traceback.print_exc()
        emit("failed", error=f"{type(err).__name__}: {err}", rank=rank)
        raise SystemExit(1) from err


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one Ferry training job (started by the trainer).")
    parser.add_argument("--store", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--resume", default="")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--parent", type=int, default=0)
    parser.add_argument("--spec-file", default="", help="run this JSON spec without a trainer (torchrun)")
    parser.add_argument(
        "--allowed-factories", default="", help="module prefixes a factory model may come from (A,B)"
    )
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    from ferry.core.store import Store

    store = Store(args.store)
    ctx: dict[str, Any] = {
        "store": str(store.root),
        "job_dir": str(store.checkpoints_dir / args.job),
        "resume": args.resume,
        "threads": args.threads or os.cpu_count() or 1,
        "runner_pid": os.getpid(),
        "allowed_factories": [p for p in args.allowed_factories.split(",") if p],
    }
    if args.spec_file:
        return _run_under_torchrun(store, args.job, Path(args.spec_file), ctx)
    record = json.loads(store.job_file(args.job).read_text())
    ctx["spec"] = {**record["spec"], "job": args.job}
    world = int(ctx["spec"]["nprocs"])
    try:
        if world == 1:
            _guarded(0, 1, ctx)
        else:
            import torch.multiprocessing as mp

            ctx["port"] = free_port()
            mp.spawn(_rank_main, args=(world, ctx), nprocs=world, join=True)
    except SystemExit as err:
        return int(err.code or 1)
    except Exception as err:  # a rank died: its own "failed" event, if any, came first
        emit("failed", error=f"a training process failed: {str(err).strip().splitlines()[-1]}")
        return 1
    return 0


def _run_under_torchrun(store: Any, job_id: str, spec_file: Path, ctx: dict[str, Any]) -> int:
    """One rank of a job launched by torchrun (or alone): no trainer, rank 0 keeps the job record."""
    from ferry.core.store import atomic_write_json, validate_name
    from services.trainer import checkpoints as ckpt
    from services.trainer.spec import Limits, normalize_spec

    validate_name(job_id, "job id")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    raw = json.loads(spec_file.read_text())
    spec = normalize_spec(
        {**raw, "nprocs": 1}, store.root, Limits(allowed_factories=ctx["allowed_factories"])
    )
    spec["nprocs"] = world
    ctx.update(spec={**spec, "job": job_id}, init="env://" if world > 1 else "")
    record = JobRecord.new(job_id, job_id, spec)
    if rank == 0:
        record.state, record.started_ms, record.attempts = RUNNING, now_ms(), 1
        record.pid, record.world = os.getpid(), world
        atomic_write_json(store.job_file(job_id), record.to_json())
    code = 0
    try:
        _guarded(rank, world, ctx)
    except SystemExit as err:
        code = int(err.code or 1)
    if rank == 0:
        job_dir = Path(ctx["job_dir"])
        final = job_dir / ckpt.FINAL / CheckpointFiles.METRICS
        done = code == 0 and final.is_file()
        summary = json.loads(final.read_text()) if done else {}
        record.state = SUCCEEDED if done else FAILED
        record.error = "" if done else LAST_EVENTS.get("failed", {}).get("error", f"exited with code {code}")
        record.finished_ms, record.pid = now_ms(), 0
        record.checkpoints = ckpt.list_tags(job_dir)
        record.history = summary.get("history", [])
        record.test_metrics = {f"test_{k}": v for k, v in summary.get("test", {}).items()}
        atomic_write_json(store.job_file(job_id), record.to_json())
    return code


if __name__ == "__main__":
    sys.exit(main())
