"""``ferry bench``: measure Ferry against the transport floor on this machine.

Runs every scenario side by side (in-process ONNX Runtime, the transport floor,
worker direct, gateway with cache off, gateway with every request a cache hit)
for each model and concurrency, then writes ``results.json``, ``results.md``
(with ratios to the floor and the issue's targets) and ``results.png``. Run from
the repository root: the scenarios live in ``benchmarks/``.

The ``ferry`` CLI imports nothing from ``benchmarks``: this module's ``register`` is declared
in pyproject.toml under the ``ferry.commands`` entry-point group, which ``ferry.cli.main``
reads, so the dependency runs one way (benchmarks -> ferry).
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_SCENARIOS = "ort,floor,worker,gateway-nocache,gateway-hits"
# Asked for by name: naive is a hand-written server running ORT once per request (no batching);
# Redis starts a private redis-server (or uses --redis-url); the HTTP ones
# send the same requests as gateway-nocache over the gateway's REST port (JSON or binary tensors).
EXTRA_SCENARIOS = "naive,gateway-hits-redis,gateway-http-json,gateway-http-binary"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _names(choices: tuple[str, ...]):  # type: ignore[no-untyped-def]
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {', '.join(choices)}")
        return names

    return parse


def register(sub: argparse._SubParsersAction) -> None:
    scenarios = tuple(DEFAULT_SCENARIOS.split(","))
    choices = (*scenarios, *EXTRA_SCENARIOS.split(","))
    p = sub.add_parser("bench", help="benchmark the worker and gateway against the transport floor")
    p.add_argument(
        "--scenarios",
        type=_names(choices),
        default=list(scenarios),
        help=f"{DEFAULT_SCENARIOS} (default); also {EXTRA_SCENARIOS}",
    )
    p.add_argument("--models", type=_names(("mlp", "cnn")), default=["mlp", "cnn"], help="mlp,cnn")
    p.add_argument("--concurrency", type=_ints, default=[1, 8, 32, 64], help="e.g. 1,8,32,64")
    p.add_argument("--warmup-s", type=float, default=1.0, help="unrecorded seconds before each point")
    p.add_argument("--duration-s", type=float, default=5.0, help="recorded seconds per point")
    p.add_argument(
        "--max-requests", type=int, default=0, help="stop a point after this many answers (0: none)"
    )
    p.add_argument("--output-dir", default="bench-results", help="where results.{json,md,png} go")
    p.add_argument(
        "--redis-url",
        default=None,
        help="gateway result cache in this Redis (default: in-process; gateway-hits-redis: a private one)",
    )
    p.add_argument("--worker-procs", type=int, default=1, help="worker (and floor) processes on one port")
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for every worker, repeatable (e.g. --worker-arg=--intra-op-threads=1)",
    )
    p.add_argument("--channels", type=int, default=0, help="client channels per server (0: one per process)")
    p.add_argument(
        "--soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="instead of the table: load CNN c=32 for this long and sample server RSS",
    )
    p.add_argument("--soak-interval-s", type=float, default=10.0, help="RSS sampling period in --soak")
    p.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="measure each model and concurrency this many times, interleaved; report the median ratio",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import platform
    from pathlib import Path

    from benchmarks.report import write_all
    from benchmarks.run import BenchConfig, bench
    from benchmarks.stats import all_checked

    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    cfg = BenchConfig(
        scenarios=args.scenarios,
        models=args.models,
        concurrency=args.concurrency,
        warmup_s=args.warmup_s,
        duration_s=args.duration_s,
        max_requests=args.max_requests,
        output_dir=Path(args.output_dir),
        redis_url=args.redis_url,
        worker_procs=args.worker_procs,
        channels=args.channels,
        worker_flags=args.worker_arg,
        soak_s=args.soak,
        soak_interval_s=args.soak_interval_s,
        rounds=args.rounds,
        log=log,
    )
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    b = asyncio.run(bench(cfg))
    meta = {
        "started": started,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "warmup_s": cfg.warmup_s,
        "duration_s": cfg.duration_s,
        "max_requests": cfg.max_requests,
        "worker_procs": cfg.worker_procs,
        "rounds": cfg.rounds,
        "worker_flags": list(cfg.worker_flags),
        "scenarios": list(cfg.scenarios),
        "models": list(cfg.models),
        "concurrency": list(cfg.concurrency),
        **cfg.extra,
    }
    paths = write_all(cfg.output_dir, b.points, meta, b.soak)
    log(f"done in {cfg.extra.get('elapsed_s')} s: " + ", ".join(str(p) for p in paths.values()))
    if not args.quiet and b.points:
        print(paths["markdown"].read_text())
    checked = all_checked(b.points) and (b.soak is None or all_checked([b.soak["point"]]))
    if not checked:
        print("error: some responses failed or did not match in-process ONNX Runtime", file=sys.stderr)
        return 1
    return 0
