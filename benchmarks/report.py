"""Write a run's results: ``results.json``, ``results.md`` (tables with ratios) and ``results.png``."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.stats import (
    SCENARIO_TITLES,
    SCENARIOS,
    combine_rounds,
    evaluate_targets,
    markdown_table,
    targets_table,
    transport_ratios,
    transport_table,
)


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_all(
    out_dir: Path,
    points: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    soak: Mapping[str, Any] | None,
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = evaluate_targets(points)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    doc = {
        "meta": dict(meta),
        "points": list(points),
        "targets": targets,
        "transports": transport_ratios(combine_rounds(points)),
        "soak": soak,
    }
    paths["json"].write_text(json.dumps(_clean(doc), indent=2))
    # the table and the plot show one row per point: with several rounds, the median round
    table = combine_rounds(points)
    paths["markdown"].write_text(markdown(table, meta, targets, soak))
    if points:
        paths["png"] = plot(out_dir / "results.png", table)
    return paths


def markdown(
    points: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    targets: Sequence[Mapping[str, Any]],
    soak: Mapping[str, Any] | None,
) -> str:
    parts = [
        "# ferry bench\n",
        f"{meta.get('started', '')} on {meta.get('machine', platform.platform())}, "
        f"{meta.get('cpus', '?')} CPUs; {meta.get('warmup_s')} s warm-up + "
        f"{meta.get('duration_s')} s per point, "
        f"batch-1 requests, {meta.get('worker_procs', 1)} worker process(es). "
        "Ratios compare throughput with the transport floor measured at the same model and concurrency "
        "in this run.\n",
    ]
    rounds = int(meta.get("rounds", 1) or 1)
    if rounds > 1:
        parts.append(
            f"{rounds} rounds, interleaved: each row is the round whose ratio to that round's floor is the "
            "median, `x floor` that median (every round's ratio in results.json); errors and checked "
            "answers count all rounds.\n"
        )
    if points:
        parts += ["## Results\n", markdown_table(points), "## Targets\n", targets_table(targets)]
        transports = transport_ratios(points)
        if transports:
            parts += [
                "## HTTP against gRPC through the gateway\n",
                "Each HTTP point over the gRPC point (`gateway, cache off`) measured beside it.\n",
                transport_table(transports),
            ]
    if soak:
        growth = ", ".join(f"{k} {v * 100:+.1f}%" for k, v in soak.get("growth", {}).items())
        parts += [
            "## Soak\n",
            f"{soak['point']['requests']} requests in {soak['point']['seconds']:.0f} s at c="
            f"{soak['point']['concurrency']} ({soak['point']['scenario']}); RSS growth first->last sample: "
            f"{growth}\n",
        ]
    return "\n".join(parts)


def plot(path: Path, points: Sequence[Mapping[str, Any]]) -> Path:
    """Throughput vs concurrency and p99 vs concurrency, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({p["model"] for p in points})
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        for scenario in [s for s in SCENARIOS if any(p["scenario"] == s for p in points)]:
            series = sorted(
                (p for p in points if p["model"] == model and p["scenario"] == scenario),
                key=lambda p: p["concurrency"],
            )
            if not series:
                continue
            xs = [p["concurrency"] for p in series]
            label = SCENARIO_TITLES.get(scenario, scenario)
            axes[0][col].plot(xs, [p["throughput"] for p in series], marker="o", label=label)
            axes[1][col].plot(xs, [p["p99_ms"] for p in series], marker="o", label=label)
        for row, ylabel in ((0, "requests / s"), (1, "p99 latency (ms)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model}: {'throughput' if row == 0 else 'p99 latency'}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
