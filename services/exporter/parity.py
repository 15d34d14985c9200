"""The parity gate: does the ONNX file compute what the PyTorch module computes?

Pure numpy, so it is unit-tested on arrays alone. Each *case* compares the
reference (torch eager, fp32) with the candidate (ONNX Runtime) on one batch
layout (batch 1, the larger batch, and for variable-length inputs both again at
a second length). The verdict:

- ``fp32``: every element within ``atol + rtol * |reference|`` (``np.allclose``).
- ``fp16`` / ``int8``: pooled over all cases, top-1 agreement >= ``min_top1_agreement``
  and the task metric (accuracy, or R^2 for regression; against the labels when the
  samples have them, else against torch's own answers) drops by at most
  ``max_metric_drop`` points.

A failed verdict names the output, the case and the size of the divergence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

EXACT = "fp32"


@dataclass(frozen=True)
class GateOptions:
    precision: str = EXACT
    atol: float = 1e-4
    rtol: float = 1e-4
    min_top1_agreement: float = 0.99
    max_metric_drop: float = 1.0
    task: str = "classification"


@dataclass
class Case:
    """One comparison: a name (``batch1``, ``batch32@len7``), outputs by name, optional labels."""

    name: str
    reference: dict[str, np.ndarray]
    candidate: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def elementwise(reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """Error figures of one output, and where the worst violation of ``atol + rtol*|ref|`` sits."""
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(candidate, dtype=np.float64)
    if ref.shape != got.shape:
        return {
            "shape_mismatch": True,
            "reference_shape": list(ref.shape),
            "candidate_shape": list(got.shape),
        }
    if ref.size == 0:
        return {"max_abs_err": 0.0, "max_rel_err": 0.0, "within_tolerance": True}
    diff = np.abs(ref - got)
    diff = np.where(np.isnan(diff), np.inf, diff)
    excess = diff - (atol + rtol * np.abs(ref))
    worst = np.unravel_index(int(np.argmax(excess)), ref.shape)
    return {
        "max_abs_err": _round(float(diff.max())),
        "mean_abs_err": _round(float(diff.mean())),
        "max_rel_err": _round(float((diff / np.maximum(np.abs(ref), 1e-12)).max())),
        "within_tolerance": bool(excess.max() <= 0),
        "worst_index": [int(i) for i in worst],
        "worst_reference": _round(float(ref[worst])),
        "worst_candidate": _round(float(got[worst])),
    }


def _metric(task: str, outputs: np.ndarray, target: np.ndarray) -> float:
    """Accuracy (classification) or R^2 (regression), in points (x100)."""
    if task == "regression":
        target = target.reshape(outputs.shape).astype(np.float64)
        residual = float(((outputs - target) ** 2).sum())
        total = float(((target - target.mean()) ** 2).sum()) or 1.0
        return 100.0 * (1.0 - residual / total)
    return 100.0 * float((outputs.argmax(axis=-1) == target.reshape(-1)).mean())


def _pooled(cases: list[Case], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    ref = np.concatenate([c.reference[name].reshape(len(c.reference[name]), -1) for c in cases])
    got = np.concatenate([c.candidate[name].reshape(len(c.candidate[name]), -1) for c in cases])
    labels = None
    if all(c.labels is not None for c in cases):
        labels = np.concatenate([np.asarray(c.labels).reshape(len(c.labels), -1) for c in cases])
    return ref.astype(np.float64), got.astype(np.float64), labels


def _approximate(cases: list[Case], name: str, opts: GateOptions) -> tuple[dict[str, Any], str | None]:
    ref, got, labels = _pooled(cases, name)
    figures: dict[str, Any] = {"samples": len(ref)}
    failure = None
    if opts.task == "classification":
        target = labels.reshape(-1) if labels is not None else ref.argmax(axis=-1)
        agreement = float((ref.argmax(axis=-1) == got.argmax(axis=-1)).mean())
        figures["top1_agreement"] = _round(agreement)
        if agreement < opts.min_top1_agreement:
            failure = (
                f"output {name!r} diverged: top-1 agreement {agreement:.2%} is below "
                f"{opts.min_top1_agreement:.2%} over {len(ref)} samples"
            )
    else:
        target = labels if labels is not None else ref
    ref_metric, got_metric = _metric(opts.task, ref, target), _metric(opts.task, got, target)
    drop = ref_metric - got_metric
    figures.update(
        metric="accuracy" if opts.task == "classification" else "r2",
        metric_against="labels" if labels is not None else "torch",
        reference_metric=_round(ref_metric),
        candidate_metric=_round(got_metric),
        metric_drop_points=_round(drop),
    )
    if failure is None and drop > opts.max_metric_drop:
        failure = (
            f"output {name!r} diverged: {figures['metric']} dropped {drop:.3f} points "
            f"({ref_metric:.3f} -> {got_metric:.3f}), more than the {opts.max_metric_drop} allowed"
        )
    return figures, failure


def gate(cases: list[Case], opts: GateOptions) -> dict[str, Any]:
    """Compare every case and decide; returns the report (``passed``, ``failure``, figures)."""
    report: dict[str, Any] = {
        "precision": opts.precision,
        "criteria": (
            {"atol": opts.atol, "rtol": opts.rtol}
            if opts.precision == EXACT
            else {"min_top1_agreement": opts.min_top1_agreement, "max_metric_drop": opts.max_metric_drop}
        ),
        "cases": {},
        "passed": True,
        "failure": None,
    }
    if not cases:
        report.update(passed=False, failure="no parity cases were run")
        return report
    failures: list[str] = []
    for case in cases:
        figures: dict[str, Any] = {"rows": len(next(iter(case.reference.values())))}
        for name, ref in case.reference.items():
            if name not in case.candidate:
                failures.append(
                    f"output {name!r} is missing from the ONNX model's outputs in case {case.name}"
                )
                continue
            err = elementwise(ref, case.candidate[name], opts.atol, opts.rtol)
            figures[name] = err
            if err.get("shape_mismatch"):
                failures.append(
                    f"output {name!r} diverged in case {case.name}: shape {err['candidate_shape']} "
                    f"instead of {err['reference_shape']}"
                )
            elif opts.precision == EXACT and not err["within_tolerance"]:
                failures.append(
                    f"output {name!r} diverged in case {case.name}: "
                    f"max |onnx - torch| = {err['max_abs_err']:.6g} "
                    f"(at {tuple(err['worst_index'])}: torch {err['worst_reference']:.6g}, onnx "
                    f"{err['worst_candidate']:.6g}) exceeds atol {opts.atol:g} + rtol {opts.rtol:g} * |torch|"
                )
        report["cases"][case.name] = figures
    if not failures and opts.precision != EXACT:
        report["pooled"] = {}
        for name in cases[0].reference:
            figures, failure = _approximate(cases, name, opts)
            report["pooled"][name] = figures
            if failure:
                failures.append(failure)
    summary: dict[str, float] = {}
    for figures in report["cases"].values():
        for value in figures.values():
            if isinstance(value, dict) and "max_abs_err" in value:
                summary["max_abs_err"] = max(summary.get("max_abs_err", 0.0), value["max_abs_err"])
                summary["max_rel_err"] = max(summary.get("max_rel_err", 0.0), value["max_rel_err"])
    report["summary"] = summary
    if failures:
        report.update(passed=False, failure="; ".join(failures[:3]))
    return report
