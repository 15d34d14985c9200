"""Overlap on purpose, not by luck: a model that holds its requests, and gauges to wait on.

A *held* model's config asks the worker's batcher for a preferred batch of ``rows`` rows and a
queue delay of a minute: requests sent to it wait inside the worker until ``rows`` rows are
queued. A test fills a worker queue, a gateway's admission limit or its coalescer with held
requests, checks the state it built by polling a Prometheus gauge with a deadline, then lets go
by sending the missing rows (the *release*) straight to the worker. The minute is only the bound
that keeps a broken test from waiting forever; no test relies on it passing.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from typing import Any

HELD_ROWS = 8
HOLD_US = 60_000_000

_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def held_config(rows: int = HELD_ROWS, max_batch_size: int | None = None, **extra: Any) -> dict[str, Any]:
    """config.json of a model whose requests run only once ``rows`` rows are queued."""
    batching: dict[str, Any] = {"preferred_batch_size": [rows], "max_queue_delay_microseconds": HOLD_US}
    batching.update(extra.pop("dynamic_batching", {}))
    return {"max_batch_size": max_batch_size or rows, "dynamic_batching": batching, **extra}


def metric(port: int, name: str, **labels: str) -> float | None:
    """The value of one sample on a ``/metrics`` port (labels must match those given), or None."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m["name"] != name:
            continue
        have = dict(_LABEL.findall(m["labels"] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m["value"])
    return None


def wait_for_metric(port: int, name: str, want: float, timeout: float = 30.0, **labels: str) -> None:
    """Poll until the sample equals ``want``; fail with the last value seen after ``timeout``."""
    deadline = time.monotonic() + timeout
    seen = metric(port, name, **labels)
    while seen != want:
        assert time.monotonic() < deadline, f"{name}{labels or ''} stayed at {seen}, never {want}"
        time.sleep(0.02)
        seen = metric(port, name, **labels)


async def until_metric(port: int, name: str, want: float, timeout: float = 30.0, **labels: str) -> None:
    """``wait_for_metric`` for a test running its calls on an event loop."""
    await asyncio.to_thread(wait_for_metric, port, name, want, timeout, **labels)
