"""What the job manager (``jobs``) and the job process (``runner``) share: the job record's
shape and states, and the prefix of the event lines the runner prints.

Both import this module and neither imports the other, so the dependency runs one way.
"""

from __future__ import annotations

import time
from typing import Any

EVENT_PREFIX = "FERRY_EVENT "

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


def now_ms() -> int:
    return int(time.time() * 1000)


def new_record(job_id: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job_id,
        "name": name,
        "state": QUEUED,
        "spec": spec,
        "progress": {"epoch": 0, "epochs": spec["epochs"], "metrics": {}},
        "error": "",
        "created_ms": now_ms(),
        "started_ms": 0,
        "finished_ms": 0,
        "checkpoints": [],
        "test_metrics": {},
        "history": [],
        "attempts": 0,
        "resumed_from": "",
        "pid": 0,
    }
