"""The parity gate on arrays alone: what passes, what fails, and what the failure says."""

from __future__ import annotations

import numpy as np
import pytest

from services.exporter.parity import Case, GateOptions, elementwise, gate

RNG = np.random.default_rng(0)
REF = RNG.standard_normal((64, 5)).astype(np.float32)


def case(candidate: np.ndarray, name: str = "batch32", labels: np.ndarray | None = None) -> Case:
    return Case(name, {"logits": REF}, {"logits": candidate}, labels)


def test_fp32_within_tolerance_passes() -> None:
    report = gate([case(REF + 5e-5)], GateOptions())
    assert report["passed"] and report["failure"] is None
    assert report["summary"]["max_abs_err"] == pytest.approx(5e-5, rel=1e-2)


def test_fp32_divergence_names_output_case_and_size() -> None:
    bad = REF.copy()
    bad[3, 2] += 0.25
    report = gate([case(REF, "batch1"), case(bad)], GateOptions())
    assert not report["passed"]
    assert report["failure"].startswith("output 'logits' diverged in case batch32: max |onnx - torch| = 0.25")
    assert "(at (3, 2)" in report["failure"] and "exceeds atol 0.0001 + rtol 0.0001" in report["failure"]
    assert report["cases"]["batch1"]["logits"]["within_tolerance"]


def test_nan_and_shape_mismatch_fail() -> None:
    nan = REF.copy()
    nan[0, 0] = np.nan
    assert not gate([case(nan)], GateOptions())["passed"]
    report = gate([case(REF[:, :4])], GateOptions())
    assert "shape [64, 4] instead of [64, 5]" in report["failure"]


def test_reduced_precision_gates_on_top1_agreement() -> None:
    noisy = REF + 0.01
    assert gate([case(noisy)], GateOptions(precision="int8"))["passed"]
    flipped = REF.copy()
    rows = np.arange(4)
    flipped[rows, REF[:4].argmin(1)] = 100.0  # 4 of 64 rows change their top-1
    report = gate([case(flipped)], GateOptions(precision="int8"))
    assert not report["passed"]
    assert (
        report["failure"]
        == "output 'logits' diverged: top-1 agreement 93.75% is below 99.00% over 64 samples"
    )


def test_reduced_precision_metric_drop_against_labels() -> None:
    labels = REF.argmax(1)
    flipped = REF.copy()
    flipped[0, REF[0].argmin()] = 100.0  # one wrong answer in 64: 1.5625 points
    opts = GateOptions(precision="fp16", min_top1_agreement=0.9, max_metric_drop=1.0)
    report = gate([case(flipped, labels=labels)], opts)
    assert not report["passed"]
    assert "accuracy dropped 1.562 points (100.000 -> 98.438)" in report["failure"]
    assert report["pooled"]["logits"]["metric_against"] == "labels"


def test_regression_uses_r2() -> None:
    target = REF + RNG.standard_normal(REF.shape).astype(np.float32) * 0.1
    report = gate([case(REF + 0.001, labels=target)], GateOptions(precision="int8", task="regression"))
    assert report["passed"] and report["pooled"]["logits"]["metric"] == "r2"
    assert "top1_agreement" not in report["pooled"]["logits"]


def test_no_cases_is_a_failure() -> None:
    assert gate([], GateOptions())["failure"] == "no parity cases were run"


def test_elementwise_reports_the_worst_element() -> None:
    err = elementwise(np.array([[1.0, 2.0]]), np.array([[1.0, 2.5]]), 1e-4, 1e-4)
    assert err["max_abs_err"] == 0.5 and err["worst_index"] == [0, 1] and not err["within_tolerance"]
