"""The trainer's Prometheus metrics: jobs by state, jobs finished, epoch durations."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from services.trainer.records import JobState

STATES = tuple(state.value for state in JobState)

_JOBS = Gauge("ferry_trainer_jobs", "Jobs this trainer knows, by state", ["state"])
_FINISHED = Counter("ferry_trainer_jobs_finished_total", "Jobs that reached an end state", ["state"])
_EPOCH = Histogram(
    "ferry_trainer_epoch_seconds",
    "Training time of one epoch (the training pass, as the job reports it)",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)


def count_jobs(states: Iterable[str]) -> None:
    """Set the per-state gauge from the states of every job."""
    counts = dict.fromkeys(STATES, 0)
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    for state, n in counts.items():
        _JOBS.labels(state).set(n)


def job_finished(state: str) -> None:
    _FINISHED.labels(state).inc()


def epoch_done(seconds: float) -> None:
    _EPOCH.observe(seconds)
