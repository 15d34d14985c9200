"""The pure parts of the benchmark: percentiles, response checks, ratios, targets, tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.stats import (
    all_checked,
    check_output,
    combine_rounds,
    cpu_us_per_request,
    evaluate_targets,
    latency_summary,
    markdown_table,
    mean_batch,
    percentile,
    targets_table,
    with_ratios,
)


def point(scenario: str, throughput: float, model: str = "cnn", c: int = 32, **kw: object) -> dict:
    base = {
        "model": model,
        "scenario": scenario,
        "concurrency": c,
        "throughput": throughput,
        "requests": 100,
        "checked": 100,
        "wrong": 0,
        "errors": 0,
        "p50_ms": 1.0,
        "p90_ms": 2.0,
        "p99_ms": 3.0,
        "max_ms": 4.0,
        "mean_batch": math.nan,
    }
    return {**base, **kw}


class TestPercentile:
    def test_interpolates_between_ranks(self) -> None:
        assert percentile([1, 2, 3, 4], 50) == 2.5
        assert percentile([10, 20], 90) == pytest.approx(19.0)

    def test_ends_are_min_and_max(self) -> None:
        values = [5.0, 1.0, 3.0]
        assert percentile(values, 0) == 1.0
        assert percentile(values, 100) == 5.0

    def test_single_and_empty(self) -> None:
        assert percentile([7.0], 99) == 7.0
        assert math.isnan(percentile([], 50))

    def test_out_of_range(self) -> None:
        with pytest.raises(ValueError, match=r"percentile 101 is outside 0\.\.100"):
            percentile([1.0], 101)

    def test_p99_of_a_hundred_values(self) -> None:
        values = list(range(1, 101))
        assert percentile(values, 99) == pytest.approx(99.01)

    def test_summary_in_ms(self) -> None:
        s = latency_summary([1_000_000, 2_000_000, 3_000_000])
        assert s["p50_ms"] == 2.0 and s["max_ms"] == 3.0 and s["mean_ms"] == 2.0
        assert math.isnan(latency_summary([])["p99_ms"])


class TestCheckOutput:
    expected = np.arange(10, dtype=np.float32).reshape(1, 10)

    def test_same_bytes_pass(self) -> None:
        assert check_output(self.expected.tobytes(), [1, 10], "FP32", self.expected) is None

    def test_rounding_within_tolerance_passes(self) -> None:
        got = self.expected + np.float32(1e-7)
        assert check_output(got.tobytes(), [1, 10], "FP32", self.expected) is None

    def test_wrong_values(self) -> None:
        got = self.expected.copy()
        got[0, 3] += 1
        assert check_output(got.tobytes(), [1, 10], "FP32", self.expected) == (
            "values differ from in-process ONNX Runtime (max abs diff 1)"
        )

    def test_wrong_shape_datatype_size(self) -> None:
        raw = self.expected.tobytes()
        assert check_output(raw, [10], "FP32", self.expected) == "shape [10], expected [1, 10]"
        assert check_output(raw, [1, 10], "FP64", self.expected) == "datatype FP64, expected FP32"
        assert check_output(raw[:8], [1, 10], "FP32", self.expected) == "8 bytes, expected 40"


class TestCounters:
    def test_mean_batch_from_statistics_deltas(self) -> None:
        assert mean_batch((100, 50), (420, 90)) == 8.0
        assert math.isnan(mean_batch((5, 5), (5, 5)))

    def test_cpu_per_request(self) -> None:
        assert cpu_us_per_request(1.0, 1.5, 1000) == pytest.approx(500.0)
        assert math.isnan(cpu_us_per_request(1.0, 2.0, 0))


class TestRatios:
    def test_ratio_to_floor_at_same_model_and_concurrency(self) -> None:
        points = [
            point("floor", 1000),
            point("worker", 900),
            point("floor", 500, c=1),
            point("worker", 450, c=1),
            point("worker", 10, model="mlp"),
        ]
        ratios = {(p["model"], p["scenario"], p["concurrency"]): p["ratio"] for p in with_ratios(points)}
        assert ratios[("cnn", "worker", 32)] == pytest.approx(0.9)
        assert ratios[("cnn", "worker", 1)] == pytest.approx(0.9)
        assert ratios[("cnn", "floor", 32)] == 1.0
        assert math.isnan(ratios[("mlp", "worker", 32)])

    def test_table_lists_every_point_with_its_ratio(self) -> None:
        table = markdown_table([point("floor", 1000), point("worker", 950, mean_batch=9.5)])
        lines = table.strip().splitlines()
        assert len(lines) == 4
        assert lines[2].startswith("| cnn | 32 | transport floor | 1000 | 1.00 |")
        assert lines[3].startswith("| cnn | 32 | worker direct | 950 | 0.95 |")
        assert "| 9.5 |" in lines[3]

    def test_table_marks_wrong_answers(self) -> None:
        table = markdown_table([point("floor", 1000), point("worker", 950, wrong=3)])
        assert "100/100 (3 wrong)" in table


class TestTargets:
    def measured(self, **worker: object) -> list[dict]:
        return [
            point("floor", 1000, p99_ms=10.0),
            point("worker", 950, **{"mean_batch": 12.0, "p99_ms": 15.0, **worker}),
            point("floor", 1000, c=1, p50_ms=0.5),
            point("worker", 800, c=1, p50_ms=0.7),
        ]

    def rows(self, points: list[dict]) -> dict[str, dict]:
        return {r["target"]: r for r in evaluate_targets(points)}

    def test_held_targets(self) -> None:
        rows = self.rows(self.measured())
        assert rows["worker direct CNN c=32 throughput"]["ok"] is True
        assert rows["worker direct CNN c=32 throughput"]["measured"] == pytest.approx(0.95)
        assert rows["worker direct CNN c=32 mean batch"]["ok"] is True
        assert rows["worker direct CNN c=32 p99"]["measured"] == pytest.approx(1.5)
        assert rows["worker direct CNN c=1 p50"]["measured"] == pytest.approx(0.2)
        assert rows["worker direct CNN c=1 p50"]["ok"] is True

    def test_a_target_against_another_scenario_than_the_floor(self) -> None:
        points = [
            point("floor", 3000),
            point("naive", 1000),
            point("worker", 1200),
            point("gateway-hits", 2000),
            point("gateway-hits-redis", 1850),
        ]
        rows = self.rows(points)
        naive = rows["worker direct CNN c=32 against naive"]
        assert (
            naive["measured"] == pytest.approx(1.2)
            and naive["ok"] is True
            and naive["want"] == ">= 1.10x naive"
        )
        redis = rows["Redis all hits CNN c=32 against LRU"]
        assert redis["measured"] == pytest.approx(0.925) and redis["ok"] is False
        assert rows["Redis all hits MLP c=32 against LRU"]["ok"] is None  # not measured

    def test_missed_targets(self) -> None:
        points = self.measured(mean_batch=4.0, p99_ms=25.0)
        points[1]["throughput"] = 800
        rows = self.rows(points)
        assert rows["worker direct CNN c=32 throughput"]["ok"] is False
        assert rows["worker direct CNN c=32 mean batch"]["ok"] is False
        assert rows["worker direct CNN c=32 p99"]["ok"] is False

    def test_wrong_answers_fail_a_target(self) -> None:
        rows = self.rows(self.measured(wrong=1))
        assert rows["worker direct CNN c=32 throughput"]["ok"] is False

    def test_unmeasured_targets_say_so(self) -> None:
        rows = self.rows(self.measured())
        assert rows["gateway cache off CNN c=32"]["ok"] is None
        assert "| gateway cache off CNN c=32 |  | - | not measured |" in targets_table(
            evaluate_targets(self.measured())
        )

    def test_all_checked(self) -> None:
        assert all_checked(self.measured())
        assert not all_checked([point("worker", 1, checked=99)])
        assert not all_checked([point("worker", 1, errors=1)])


class TestRounds:
    def three_rounds(self) -> list[dict]:
        # the machine slows down in round 2: the floor and the worker drop together
        return [
            point("floor", 1000, round=1),
            point("worker", 700, round=1, p50_ms=1.7),
            point("floor", 500, round=2),
            point("worker", 450, round=2, p50_ms=1.2),
            point("floor", 900, round=3),
            point("worker", 720, round=3, p50_ms=1.5),
        ]

    def test_each_round_is_judged_against_its_own_floor(self) -> None:
        rows = {p["scenario"]: p for p in combine_rounds(self.three_rounds())}
        worker = rows["worker"]
        assert worker["round_ratios"] == pytest.approx([0.7, 0.9, 0.8])
        assert worker["ratio"] == pytest.approx(0.8)  # the median, not 1870 / 2400
        assert worker["round"] == 3 and worker["throughput"] == 720  # the median round's figures
        assert worker["requests"] == 300 and worker["checked"] == 300
        assert rows["floor"]["throughput"] == 900  # the floor's median round
        table = markdown_table(combine_rounds(self.three_rounds()))
        assert "| cnn | 32 | worker direct | 720 | 0.80 |" in table

    def test_a_wrong_answer_in_any_round_shows(self) -> None:
        points = self.three_rounds()
        points[3]["wrong"] = 2
        worker = next(p for p in combine_rounds(points) if p["scenario"] == "worker")
        assert worker["wrong"] == 2 and worker["round"] == 3
        assert "(2 wrong)" in markdown_table(combine_rounds(points))
        rows = {r["target"]: r for r in evaluate_targets(points)}
        assert rows["worker direct CNN c=32 throughput"]["ok"] is False

    def test_targets_take_the_median_over_rounds(self) -> None:
        points = self.three_rounds()
        points += [point("floor", 1000, c=1, round=r, p50_ms=1.0) for r in (1, 2, 3)]
        points += [
            point("worker", 900, c=1, round=r, p50_ms=p50) for r, p50 in ((1, 1.1), (2, 1.9), (3, 1.25))
        ]
        rows = {r["target"]: r for r in evaluate_targets(points)}
        ratio = rows["worker direct CNN c=32 throughput"]
        assert ratio["measured"] == pytest.approx(0.8) and ratio["ok"] is False
        assert ratio["values"] == pytest.approx([0.7, 0.9, 0.8])
        p50 = rows["worker direct CNN c=1 p50"]
        assert p50["measured"] == pytest.approx(0.25) and p50["ok"] is True
        table = targets_table(evaluate_targets(points))
        assert "| 0.80x (median of 3 rounds: 0.70 to 0.90) | NO |" in table

    def test_one_round_is_left_as_it_is(self) -> None:
        points = [point("floor", 1000), point("worker", 900)]
        assert combine_rounds(points) == points
        assert "median" not in targets_table(evaluate_targets(points))


class TestSoak:
    def test_rss_growth_first_to_last_sample(self) -> None:
        from benchmarks.run import rss_growth

        samples = [
            {"t_s": 10, "rss": {"worker": 100, "gateway": 50}},
            {"t_s": 20, "rss": {"worker": 130, "gateway": 40}},
            {"t_s": 30, "rss": {"worker": 105, "gateway": 55}},
        ]
        growth = rss_growth(samples)
        assert growth["worker"] == pytest.approx(0.05)
        assert growth["gateway"] == pytest.approx(0.10)
        assert rss_growth(samples[:1]) == {}
