"""Profile the servers under load: one bench point with py-spy attached to each server process.

``python -m benchmarks.profile --scenario worker --model cnn --concurrency 32 --seconds 10``
writes ``<out>/<process>.txt`` (py-spy's collapsed stacks, ``--format raw``) and prints the
functions with the most own samples, which is where a request's CPU goes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.run import Bench, BenchConfig


def top_frames(raw: Path, limit: int = 25) -> list[tuple[str, int, float]]:
    """Own-sample counts of the leaf frames in a collapsed-stack file, with their share of all samples."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        own[stack.split(";")[-1]] += n
    return [(frame, n, n / total if total else 0.0) for frame, n in own.most_common(limit)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="worker")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--output-dir", default="bench-results/profile")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig(
        scenarios=[args.scenario],
        models=[args.model],
        concurrency=[args.concurrency],
        duration_s=args.seconds,
        output_dir=out,
    )

    async def run() -> None:
        b = Bench(cfg)
        b.prepare()
        b.servers.start()
        try:
            spies = []
            for name, pid in b.servers.pids(args.scenario).items():
                cmd = [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(args.seconds + 1)),
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--output",
                    str(out / f"{name}.txt"),
                ]
                if args.native:
                    cmd.append("--native")
                spies.append((name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
            p = await b.point(b.models[args.model], args.scenario, args.concurrency)
            print({k: p[k] for k in ("throughput", "p50_ms", "p99_ms", "mean_batch", "server_cpu_us")})
            for name, proc in spies:
                proc.wait(60)
                print(f"--- {name}: top own-time frames")
                for frame, n, share in top_frames(out / f"{name}.txt"):
                    print(f"{share * 100:5.1f}% {n:6d}  {frame}")
        finally:
            await b.close()
            b.servers.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
