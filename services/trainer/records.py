"""What the job manager (``jobs``) and the job process (``runner``) share: the job record's
shape and states, and the prefix of the event lines the runner prints.

Both import this module and neither imports the other, so the dependency runs one way.

A record is a ``JobRecord`` in memory and ``jobs/<id>.json`` on disk; ``to_json`` gives exactly
the keys and values the file holds (optional keys only once set, keys this version does not know
kept as read), and ``from_json`` reads it back, so ``from_json(r.to_json()) == r``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.core.jobstates import TERMINAL, JobState

EVENT_PREFIX = "FERRY_EVENT "

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
)


def now_ms() -> int:
    return int(time.time() * 1000)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


@dataclass
class Progress:
    """Where a job is: the epoch it has finished, and (once it reports) its live step figures.

    The step figures stay None, and out of the file, until the first progress event.
    """

    epoch: int = 0
    epochs: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # the last finished epoch's
    step: int | None = None
    steps_per_epoch: int | None = None
    loss: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    _REQUIRED = ("epoch", "epochs", "metrics")
    _OPTIONAL = ("step", "steps_per_epoch", "loss", "samples_per_second", "eta_seconds")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.extra, "epoch": self.epoch, "epochs": self.epochs}
        out["metrics"] = dict(self.metrics)
        for key in self._OPTIONAL:
            if (value := getattr(self, key)) is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Progress:
        data = _object(data, "progress")
        known = {k: data[k] for k in (*cls._REQUIRED, *cls._OPTIONAL) if k in data}
        if "metrics" in known:
            known["metrics"] = dict(_object(known["metrics"], "progress.metrics"))
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**known, extra=extra)


@dataclass
class JobRecord:
    """One job, as the manager keeps it and ``jobs/<id>.json`` stores it."""

    id: str
    name: str
    state: JobState
    spec: dict[str, Any]
    progress: Progress = field(default_factory=Progress)
    error: str = ""
    created_ms: int = 0
    started_ms: int = 0
    finished_ms: int = 0
    checkpoints: list[str] = field(default_factory=list)
    test_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # each finished epoch's metrics
    attempts: int = 0
    resumed_from: str = ""
    pid: int = 0
    owner: str | None = None  # the submitting key's name; absent from records torchrun ranks write
    world: int | None = None  # set once the job process starts
    device: str | None = None  # set once the job process starts
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, as read

    _REQUIRED = ("id", "state", "spec")
    _OPTIONAL = ("owner", "world", "device")

    @classmethod
    def new(cls, job_id: str, name: str, spec: dict[str, Any]) -> JobRecord:
        """A freshly submitted job: QUEUED, created now."""
        return cls(
            id=job_id,
            name=name,
            state=QUEUED,
            spec=spec,
            progress=Progress(epoch=0, epochs=spec["epochs"]),
            created_ms=now_ms(),
        )

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_json(self) -> dict[str, Any]:
        """The record file's object (``atomic_write_json`` sorts its keys)."""
        out: dict[str, Any] = {
            **self.extra,
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "spec": self.spec,
            "progress": self.progress.to_json(),
            "error": self.error,
            "created_ms": self.created_ms,
            "started_ms": self.started_ms,
            "finished_ms": self.finished_ms,
            "checkpoints": list(self.checkpoints),
            "test_metrics": dict(self.test_metrics),
            "history": list(self.history),
            "attempts": self.attempts,
            "resumed_from": self.resumed_from,
            "pid": self.pid,
        }
        for key in self._OPTIONAL:
            if (value := getattr(self, key)) is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobRecord:
        """A record read from its file: ``id``, ``state`` and ``spec`` are required (KeyError),
        an unknown state or a non-object is a ValueError; other keys take their defaults."""
        data = _object(data, "a job record")
        for key in cls._REQUIRED:
            if key not in data:
                raise KeyError(key)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        known["state"] = JobState(data["state"])
        known["spec"] = _object(data["spec"], "spec")
        known.setdefault("name", "")
        if "progress" in known:
            known["progress"] = Progress.from_json(known["progress"])
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)
