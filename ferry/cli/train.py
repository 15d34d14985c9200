"""``ferry train`` (submit and follow a job), ``ferry jobs`` (list, show, watch, cancel), ``ferry upload``.

All talk to a trainer (``--address``/``--trainer``, ``--api-key``: see
``ferry.cli.connect``). ``ferry train`` and ``ferry jobs watch`` draw a live progress bar
from the WatchJob stream and exit 0 when the job SUCCEEDED, 1 otherwise; Ctrl-C
stops following, the job goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ferry.cli.connect import Target, add_connection_flags, json_arg, resolve
from ferry.core.jobstates import TERMINAL, JobState

BAR = 24


def _target(args: argparse.Namespace) -> Target:
    return resolve(args, "trainer")


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="submit a training job and follow its progress")
    model = train.add_mutually_exclusive_group()
    model.add_argument(
        "--model", help="zoo architecture: mlp, cnn, lstm_text, embedding_bag_text, transformer_text"
    )
    model.add_argument("--factory", help="or a user factory package.module:function")
    train.add_argument("--params", type=json_arg, help="model params as JSON, e.g. '{\"hidden\": [64]}'")
    data = train.add_mutually_exclusive_group()
    data.add_argument(
        "--dataset", help="digits, iris, wine, breast_cancer, synthetic_classification, ..., topics (text)"
    )
    data.add_argument("--upload", help="or the name of an uploaded dataset (ferry upload)")
    train.add_argument(
        "--dataset-params", type=json_arg, help="dataset params as JSON, e.g. '{\"flatten\": true}'"
    )
    train.add_argument("--test-fraction", type=float, help="held-out test split (default 0.2)")
    tok = train.add_argument_group("tokenizer (text datasets: topics, a JSONL or text CSV upload)")
    tok.add_argument("--tokenizer", choices=["wordpiece", "bpe"], help="tokenizer kind (default wordpiece)")
    tok.add_argument("--vocab-size", type=int, help="the tokenizer's largest vocabulary (default 8000)")
    tok.add_argument(
        "--lowercase",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lowercase texts (default on)",
    )
    train.add_argument("--spec", help="a JSON file with the whole spec; flags override its fields")
    for flag, kind, hint in (
        ("--task", str, "classification | regression"),
        ("--loss", str, "cross_entropy | mse | l1 | smooth_l1"),
        ("--optimizer", str, "sgd | adam | adamw"),
        ("--lr", float, "learning rate"),
        ("--momentum", float, "sgd momentum"),
        ("--weight-decay", float, "weight decay"),
        ("--schedule", str, "constant | step | cosine | exponential"),
        ("--step-size", int, "epochs per step (schedule step)"),
        ("--gamma", float, "decay factor (step, exponential)"),
        ("--warmup-epochs", int, "linear warmup epochs"),
        ("--epochs", int, "epochs (default 10)"),
        ("--batch-size", int, "batch size (default 64)"),
        ("--val-fraction", float, "validation share of the train split (default 0.1)"),
        ("--seed", int, "seed (default 0)"),
        ("--device", str, "auto | cpu | cuda"),
        ("--early-stopping-patience", int, "epochs without val improvement before stopping"),
        ("--early-stopping-min-delta", float, "smallest improvement that counts"),
        ("--grad-clip-norm", float, "clip gradients to this norm"),
        ("--nprocs", int, "DDP processes (default 1)"),
    ):
        train.add_argument(flag, type=kind, default=None, help=hint)
    train.add_argument("--name", default="", help="job label (prefix of its id)")
    train.add_argument("--detach", action="store_true", help="print the job id and return at once")
    train.add_argument("--json", action="store_true", help="print the final job as JSON")
    add_connection_flags(train, "trainer", "--trainer")
    train.set_defaults(handler=_train)

    jobs = sub.add_parser("jobs", help="list jobs; show, watch or cancel one")
    jobs.add_argument("action", nargs="?", default="list", choices=["list", "show", "watch", "cancel"])
    jobs.add_argument("job", nargs="?", help="job id (show, watch, cancel)")
    jobs.add_argument("--state", action="append", default=[], help="list: only jobs in this state (repeat)")
    jobs.add_argument("--json", action="store_true", help="print JSON")
    add_connection_flags(jobs, "trainer", "--trainer")
    jobs.set_defaults(handler=_jobs)

    upload = sub.add_parser(
        "upload",
        help="upload a dataset (.npz with x and y, .csv with the label last or a text and a label "
        "column, .jsonl with text and label keys)",
    )
    upload.add_argument("file", help="the .npz, .csv or .jsonl file")
    upload.add_argument("--name", default=None, help="dataset name (default: the file's stem)")
    upload.add_argument(
        "--format", default="", choices=["", "npz", "csv", "jsonl"], help="default: from the suffix"
    )
    upload.add_argument("--overwrite", action="store_true", help="replace a dataset of that name")
    add_connection_flags(upload, "trainer", "--trainer")
    upload.set_defaults(handler=_upload)


def build_spec_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The job spec from ``--spec`` and the flags (flags win)."""
    spec: dict[str, Any] = json.loads(Path(args.spec).read_text()) if args.spec else {}
    model = dict(spec.get("model") or {})
    if args.model:
        model = {"arch": args.model, "params": model.get("params", {})}
    if args.factory:
        model = {"factory": args.factory, "params": model.get("params", {})}
    if args.params is not None:
        model["params"] = args.params
    dataset = dict(spec.get("dataset") or {})
    if args.dataset:
        dataset = {"name": args.dataset}
    if args.upload:
        dataset = {"upload": args.upload}
    if args.dataset_params is not None:
        dataset["params"] = args.dataset_params
    if args.test_fraction is not None:
        dataset["test_fraction"] = args.test_fraction
    tokenizer = dict(dataset.get("tokenizer") or {})
    for flag, key in (("tokenizer", "kind"), ("vocab_size", "vocab_size"), ("lowercase", "lowercase")):
        if getattr(args, flag) is not None:
            tokenizer[key] = getattr(args, flag)
    if tokenizer:
        dataset["tokenizer"] = tokenizer
    spec.update(model=model, dataset=dataset)
    skip = {"model", "factory", "params", "dataset", "upload", "dataset_params", "test_fraction", "spec"}
    skip |= {"tokenizer", "vocab_size", "lowercase"}
    skip |= {"name", "detach", "json", "handler", "command", "address", "api_key", "ca_file", "state_file"}
    for key, value in vars(args).items():
        if key not in skip and value is not None:
            spec[key] = value
    return spec


def model_size(spec_json: str) -> str:
    """``model transformer_text: 412,356 parameters``: the trainer counts a zoo model's parameters
    when it checks the spec, so the size is known before the job trains; empty for a factory."""
    try:
        spec = json.loads(spec_json or "{}")
    except ValueError:
        return ""
    count = spec.get("model_parameters") if isinstance(spec, dict) else None
    if not isinstance(count, int) or count <= 0:
        return ""
    return f"model {spec.get('model', {}).get('arch', '?')}: {count:,} parameters"


def _bar(job: Any) -> str:
    p = job.progress
    done = (p.epoch - 1 + (p.step / p.steps_per_epoch if p.steps_per_epoch else 0)) / max(p.epochs, 1)
    filled = int(BAR * min(max(done, 0.0), 1.0))
    acc = p.metrics.get("val_accuracy")
    tail = f" val_acc {acc:.3f}" if acc is not None else ""
    return (
        f"\r[{'#' * filled}{'.' * (BAR - filled)}] epoch {p.epoch}/{p.epochs} "
        f"step {p.step}/{p.steps_per_epoch} "
        f"loss {p.loss:.4f}{tail} {p.samples_per_second:,.0f} samples/s ETA {p.eta_seconds:.0f}s "
    )


def follow(client: Any, job_id: str, out: Any = sys.stdout) -> Any:
    """Draw the job's progress until it ends; returns the final job."""
    from ferry.client.trainer import state_name

    job, tty = None, out.isatty()
    last_state = ""
    for event in client.watch(job_id):
        job = event.job
        state = state_name(job)
        if state != last_state and state not in TERMINAL:
            resumed = job.resumed_from and state == JobState.RUNNING
            extra = f" (resumed from {job.resumed_from})" if resumed else ""
            print(f"{'' if not tty else chr(10)}job {job.id}: {state}{extra}", file=out, flush=True)
            last_state = state
        if event.kind == "progress" and tty:
            print(_bar(job), end="", file=out, flush=True)
        elif event.kind == "epoch":
            p = job.progress
            metrics = " ".join(
                f"{k} {v:.4f}"
                for k, v in sorted(p.metrics.items())
                if k in ("val_loss", "val_accuracy", "lr")
            )
            secs = p.metrics.get("epoch_seconds", 0.0)
            print(
                f"\repoch {p.epoch}/{p.epochs}  loss {p.loss:.4f}  {metrics}  ({secs:.2f}s)".ljust(100),
                file=out,
                flush=True,
            )
    return job


def _summary(job: Any, as_json: bool) -> int:
    from google.protobuf import json_format

    from ferry.client.trainer import state_name

    if as_json:
        print(json_format.MessageToJson(job, preserving_proto_field_name=True))
    else:
        state = state_name(job)
        print(f"job {job.id}: {state}" + (f": {job.error}" if job.error else ""))
        if job.test_metrics:
            print("test: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(job.test_metrics.items())))
        if job.checkpoints:
            print(f"checkpoints: {', '.join(job.checkpoints)}")
    return 0 if state_name(job) == JobState.SUCCEEDED else 1


def _train(args: argparse.Namespace) -> int:
    from ferry.client.trainer import SyncTrainerClient

    spec = build_spec_dict(args)
    target = _target(args)
    with SyncTrainerClient(target.address, **target.options) as client:
        job = client.submit(spec, name=args.name)
        print(f"submitted job {job.id}", flush=True)
        size = model_size(job.spec_json)
        if size:
            print(size, flush=True)
        if args.detach:
            return 0
        try:
            job = follow(client, job.id)
        except KeyboardInterrupt:
            print(f"\nstopped following; the job goes on (ferry jobs cancel {job.id} to stop it)")
            return 130
        return _summary(job, args.json)


def _jobs(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from ferry.client.trainer import SyncTrainerClient, state_name

    target = _target(args)
    with SyncTrainerClient(target.address, **target.options) as client:
        if args.action == "list":
            jobs, token = [], ""
            while True:
                page = client.list(states=args.state, page_token=token)
                jobs += list(page.jobs)
                token = page.next_page_token
                if not token:
                    break
            if args.json:
                print(
                    json.dumps([json_format.MessageToDict(j, preserving_proto_field_name=True) for j in jobs])
                )
                return 0
            print(f"{'job':<32} {'state':<10} {'epoch':>9} {'test_accuracy':>13}  created")
            for j in jobs:
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_ms / 1000))
                acc = j.test_metrics.get("test_accuracy")
                acc_text = f"{acc:.4f}" if acc is not None else "-"
                epoch = f"{j.progress.epoch}/{j.progress.epochs}"
                print(f"{j.id:<32} {state_name(j):<10} {epoch:>9} {acc_text:>13}  {created}")
            return 0
        if not args.job:
            print(f"error: ferry jobs {args.action} needs a job id", file=sys.stderr)
            return 2
        if args.action == "show":
            return (
                _summary(client.get(args.job), True) if args.json else _summary(client.get(args.job), False)
            )
        if args.action == "cancel":
            _summary(client.cancel(args.job), args.json)
            return 0
        try:
            return _summary(follow(client, args.job), args.json)
        except KeyboardInterrupt:
            return 130


def _upload(args: argparse.Namespace) -> int:
    from ferry.client.trainer import SyncTrainerClient

    path = Path(args.file)
    name = args.name or path.stem
    target = _target(args)
    with SyncTrainerClient(target.address, **target.options) as client:
        answer = client.upload_dataset(name, path, args.format, overwrite=args.overwrite)
    print(
        f"uploaded dataset {answer.name}: {answer.size_bytes} bytes, x {list(answer.x_shape)}, "
        f"{answer.classes} classes, sha256 {answer.sha256}"
    )
    text = len(answer.x_shape) == 1  # a text dataset: [rows]
    model = "transformer_text --tokenizer wordpiece" if text else "mlp"
    if text and not answer.classes:  # columns other than text and label: the job names them
        model += """ --dataset-params '{"text_column": "...", "label_column": "..."}'"""
    print(f"train on it with: ferry train --upload {answer.name} --model {model}")
    return 0
