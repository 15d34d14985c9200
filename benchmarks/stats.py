"""The pure half of the benchmark: percentiles, response checks, ratios, targets, the table.

Nothing here touches a network or a clock, so it is unit-tested directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FLOOR = "floor"
# Scenario names in report order.
SCENARIOS = (
    "ort",
    "floor",
    "naive",
    "worker",
    "gateway-nocache",
    "gateway-http-json",
    "gateway-http-binary",
    "gateway-hits",
    "gateway-hits-redis",
)
GRPC_BASELINE = "gateway-nocache"  # what the HTTP scenarios are compared with
HTTP_SCENARIOS = ("gateway-http-json", "gateway-http-binary")
SCENARIO_TITLES = {
    "ort": "in-process ORT (limit)",
    "floor": "transport floor",
    "naive": "naive server (ORT per request)",
    "worker": "worker direct",
    "gateway-nocache": "gateway, cache off",
    "gateway-http-json": "gateway, cache off, HTTP JSON",
    "gateway-http-binary": "gateway, cache off, HTTP binary",
    "gateway-hits": "gateway, all hits",
    "gateway-hits-redis": "gateway, all hits, Redis",
}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks; NaN if empty."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(latencies_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds."""
    ms = [v / 1e6 for v in latencies_ns]
    if not ms:
        return {k: math.nan for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")}
    ordered = sorted(ms)
    return {
        "p50_ms": percentile(ordered, 50),
        "p90_ms": percentile(ordered, 90),
        "p99_ms": percentile(ordered, 99),
        "max_ms": ordered[-1],
        "mean_ms": sum(ordered) / len(ordered),
    }


def check_output(
    raw: bytes,
    shape: Sequence[int],
    datatype: str,
    expected: np.ndarray,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> str | None:
    """Why one raw FP32 output does not match the reference, or None when it does.

    Equal bytes pass at once; otherwise values must agree within tolerance (a
    batched run may round differently from a batch-1 run).
    """
    if datatype != "FP32":
        return f"datatype {datatype}, expected FP32"
    if tuple(shape) != expected.shape:
        return f"shape {list(shape)}, expected {list(expected.shape)}"
    if raw == expected.tobytes():
        return None
    if len(raw) != expected.nbytes:
        return f"{len(raw)} bytes, expected {expected.nbytes}"
    got = np.frombuffer(raw, dtype="<f4").reshape(expected.shape)
    if not np.allclose(got, expected, rtol=rtol, atol=atol):
        worst = float(np.max(np.abs(got - expected)))
        return f"values differ from in-process ONNX Runtime (max abs diff {worst:.3g})"
    return None


def mean_batch(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Mean executed batch size from ModelStatistics (inference_count, execution_count) deltas."""
    inferences, executions = after[0] - before[0], after[1] - before[1]
    return inferences / executions if executions > 0 else math.nan


def cpu_us_per_request(cpu_before_s: float, cpu_after_s: float, requests: int) -> float:
    return (cpu_after_s - cpu_before_s) * 1e6 / requests if requests > 0 else math.nan


@dataclass(frozen=True)
class Target:
    """One issue target: ``metric`` of (model, scenario, concurrency) against a bound."""

    label: str
    model: str
    scenario: str
    concurrency: int
    kind: str  # ratio | batch | p99_ratio | p50_plus_ms
    bound: float
    versus: str = FLOOR  # the scenario measured beside it that the ratio or the p50 is taken against


TARGETS = (
    Target("worker direct CNN c=32 throughput", "cnn", "worker", 32, "ratio", 0.90),
    Target("worker direct MLP c=32 throughput", "mlp", "worker", 32, "ratio", 0.90),
    Target("worker direct CNN c=32 against naive", "cnn", "worker", 32, "ratio", 1.10, "naive"),
    Target("worker direct CNN c=32 mean batch", "cnn", "worker", 32, "batch", 8),
    Target("worker direct CNN c=32 p99", "cnn", "worker", 32, "p99_ratio", 2.0),
    Target("gateway cache off CNN c=32", "cnn", "gateway-nocache", 32, "ratio", 0.80),
    Target("gateway cache off MLP c=32", "mlp", "gateway-nocache", 32, "ratio", 0.85),
    Target("gateway all hits CNN c=32", "cnn", "gateway-hits", 32, "ratio", 0.90),
    Target("gateway all hits MLP c=32", "mlp", "gateway-hits", 32, "ratio", 0.90),
    Target(
        "Redis all hits CNN c=32 against LRU", "cnn", "gateway-hits-redis", 32, "ratio", 0.95, "gateway-hits"
    ),
    Target(
        "Redis all hits MLP c=32 against LRU", "mlp", "gateway-hits-redis", 32, "ratio", 0.95, "gateway-hits"
    ),
    Target("worker direct CNN c=1 p50", "cnn", "worker", 1, "p50_plus_ms", 0.3),
    Target("worker direct MLP c=1 p50", "mlp", "worker", 1, "p50_plus_ms", 0.3),
    Target("gateway CNN c=1 p50", "cnn", "gateway-nocache", 1, "p50_plus_ms", 1.0),
    Target("gateway MLP c=1 p50", "mlp", "gateway-nocache", 1, "p50_plus_ms", 1.0),
)


def _index(points: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, int], Mapping[str, Any]]:
    return {(p["model"], p["scenario"], int(p["concurrency"])): p for p in points}


def with_ratios(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each point plus ``ratio``: its throughput over the floor's at the same model and concurrency."""
    idx = _index(points)
    out = []
    for p in points:
        if "ratio" in p:  # a point combined from rounds carries its median ratio
            out.append(dict(p))
            continue
        floor = idx.get((p["model"], FLOOR, int(p["concurrency"])))
        ratio = math.nan
        if floor and floor.get("throughput", 0) > 0:
            ratio = p["throughput"] / floor["throughput"]
        out.append({**p, "ratio": ratio})
    return out


def _rounds(points: Iterable[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    for p in points:
        by_round.setdefault(int(p.get("round", 1)), []).append(p)
    return dict(sorted(by_round.items()))


def _median_index(values: Sequence[float]) -> int:
    """Index of the median value (the lower middle one for an even count); NaN sorts last."""
    order = sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), values[i]))
    return order[(len(order) - 1) // 2]


def combine_rounds(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, scenario, concurrency) out of several rounds of the same points.

    Each round's ratio is taken against the floor of *that* round (measured seconds apart), and the
    row is the round whose ratio is the median, with ``ratio`` and every round's ratio in
    ``round_ratios``; errors, wrong answers and checked requests are summed over all rounds, so a
    failure in any round shows. With a single round the points come back as they are.
    """
    rounds = _rounds(points)
    if len(rounds) <= 1:
        return [dict(p) for p in points]
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for pts in rounds.values():
        for p in with_ratios(pts):
            groups.setdefault((p["model"], p["scenario"], int(p["concurrency"])), []).append(p)
    out = []
    for group in groups.values():
        key = [p["throughput"] if p["scenario"] == FLOOR else p["ratio"] for p in group]
        chosen = dict(group[_median_index(key)])
        chosen["round_ratios"] = [p["ratio"] for p in group]
        for name in ("errors", "wrong", "checked", "requests"):
            chosen[name] = sum(int(p.get(name, 0)) for p in group)
        out.append(chosen)
    return out


def evaluate_targets(
    points: Sequence[Mapping[str, Any]], targets: Sequence[Target] = TARGETS
) -> list[dict[str, Any]]:
    """Every target with its measured value and whether it holds (None when not measured).

    With several rounds each round is judged against its own floor; ``measured`` is the median
    over rounds (``values`` has each round's), and a wrong answer in any round fails the target.
    """
    per_round = [_evaluate_round(pts, targets) for pts in _rounds(points).values()]
    if not per_round:
        per_round = [_evaluate_round([], targets)]
    rows = []
    for every in zip(*per_round, strict=True):
        mine = [r for r in every if r["ok"] is not None] or list(every)  # the rounds that measured it
        values = [r["measured"] for r in mine]
        row = dict(mine[_median_index(values)])
        row["values"] = values
        if row["ok"] is not None:
            row["ok"] = bool(row["ok"]) and all(r["clean"] for r in mine)
        del row["clean"]
        rows.append(row)
    return rows


def _evaluate_round(points: Sequence[Mapping[str, Any]], targets: Sequence[Target]) -> list[dict[str, Any]]:
    idx = _index(points)
    rows = []
    for t in targets:
        p = idx.get((t.model, t.scenario, t.concurrency))
        floor = idx.get((t.model, t.versus, t.concurrency))
        value, ok, want, clean = math.nan, None, "", True
        if p is not None and (floor is not None or t.kind == "batch"):
            if t.kind == "ratio":
                value = p["throughput"] / floor["throughput"] if floor["throughput"] else math.nan
                want = f">= {t.bound:.2f}x {t.versus}"
                ok = value >= t.bound
            elif t.kind == "batch":
                value = p.get("mean_batch", math.nan)
                want = f">= {t.bound:g}"
                ok = value >= t.bound
            elif t.kind == "p99_ratio":
                value = p["p99_ms"] / floor["p99_ms"] if floor["p99_ms"] else math.nan
                want = f"<= {t.bound:g}x floor p99"
                ok = value <= t.bound
            elif t.kind == "p50_plus_ms":
                value = p["p50_ms"] - floor["p50_ms"]
                want = f"<= floor + {t.bound:g} ms"
                ok = value <= t.bound
            clean = p.get("errors", 0) == 0 and p.get("wrong", 0) == 0
            ok = bool(ok) and clean
        rows.append(
            {"target": t.label, "want": want, "measured": value, "ok": ok, "kind": t.kind, "clean": clean}
        )
    return rows


def _f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(points: Sequence[Mapping[str, Any]]) -> str:
    """The results table (one row per point) with throughput ratios to the floor."""
    rows = with_ratios(points)
    order = {s: i for i, s in enumerate(SCENARIOS)}
    rows.sort(key=lambda p: (p["model"], int(p["concurrency"]), order.get(p["scenario"], 99), p["scenario"]))
    head = (
        "| model | c | scenario | req/s | x floor | p50 ms | p90 ms | p99 ms | max ms | errors | checked "
        "| mean batch | client µs/req | server µs/req |"
    )
    lines = [head, "|" + "---|" * 14]
    for p in rows:
        checked = f"{p.get('checked', 0)}/{p.get('requests', 0)}"
        if p.get("wrong"):
            checked += f" ({p['wrong']} wrong)"
        lines.append(
            f"| {p['model']} | {p['concurrency']} | {SCENARIO_TITLES.get(p['scenario'], p['scenario'])} "
            f"| {_f(float(p['throughput']), 0)} | {_f(p['ratio'])} | {_f(p['p50_ms'])} | {_f(p['p90_ms'])} "
            f"| {_f(p['p99_ms'])} | {_f(p['max_ms'])} | {p.get('errors', 0)} | {checked} "
            f"| {_f(p.get('mean_batch'), 1)} | {_f(p.get('client_cpu_us'), 0)} "
            f"| {_f(p.get('server_cpu_us'), 0)} |"
        )
    return "\n".join(lines) + "\n"


def targets_table(evaluated: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| target | want | measured | holds |", "|---|---|---|---|"]
    for r in evaluated:
        unit = {"ratio": "x", "p99_ratio": "x", "p50_plus_ms": " ms over floor", "batch": ""}[r["kind"]]
        measured = "-" if math.isnan(r["measured"]) else f"{r['measured']:.2f}{unit}"
        values = [v for v in r.get("values", []) if not math.isnan(v)]
        if len(values) > 1:
            measured += f" (median of {len(values)} rounds: {min(values):.2f} to {max(values):.2f})"
        holds = "not measured" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        lines.append(f"| {r['target']} | {r['want']} | {measured} | {holds} |")
    return "\n".join(lines) + "\n"


def all_checked(points: Sequence[Mapping[str, Any]]) -> bool:
    """Every request of every point answered, checked, and correct."""
    return all(
        p.get("errors", 0) == 0 and p.get("wrong", 0) == 0 and p.get("checked", 0) == p.get("requests", -1)
        for p in points
    )


def transport_ratios(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """HTTP against gRPC through the gateway, at each model and concurrency of this run: each HTTP
    scenario's throughput and p50 over those of ``gateway-nocache`` measured beside it."""
    idx = _index(points)
    out: list[dict[str, Any]] = []
    for (model, scenario, c), p in sorted(idx.items()):
        base = idx.get((model, GRPC_BASELINE, c))
        if scenario not in HTTP_SCENARIOS or base is None or not base["throughput"]:
            continue
        out.append(
            {
                "model": model,
                "scenario": scenario,
                "concurrency": c,
                "throughput_ratio": p["throughput"] / base["throughput"],
                "p50_ratio": p["p50_ms"] / base["p50_ms"] if base["p50_ms"] else math.nan,
                "p50_ms": p["p50_ms"],
                "grpc_p50_ms": base["p50_ms"],
            }
        )
    return out


def transport_table(ratios: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| model | c | HTTP scenario | req/s vs gRPC | p50 vs gRPC | p50 ms (HTTP / gRPC) |",
        "|---|---|---|---|---|---|",
    ]
    for r in ratios:
        lines.append(
            f"| {r['model']} | {r['concurrency']} | {SCENARIO_TITLES.get(r['scenario'], r['scenario'])} "
            f"| {_f(r['throughput_ratio'])}x | {_f(r['p50_ratio'])}x "
            f"| {_f(r['p50_ms'])} / {_f(r['grpc_p50_ms'])} |"
        )
    return "\n".join(lines) + "\n"
