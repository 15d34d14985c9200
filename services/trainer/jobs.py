"""The job manager: durable records, a bounded queue, one child process per job.

A job record (``jobs/<id>.json`` in the store) is written only here, on every
state change and epoch, and at most every few seconds for progress, so a
restarted trainer knows every job (its shape is ``records.JobRecord``). Jobs run
``services.trainer.runner`` in a new process session; its ``FERRY_EVENT`` lines on
stdout drive the record and the watchers. States::

    QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED
       \\-----------------------------------> CANCELLED

On start, a job left RUNNING by a trainer that stopped is re-queued to resume
from its last epoch checkpoint (``resume_interrupted``), or marked FAILED.
A job process that dies without reporting (SIGKILL, OOM) ends FAILED with the
signal in its error, never stuck RUNNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ferry.core import tracing
from ferry.core.cpus import cpu_limit
from ferry.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from ferry.core.store import CheckpointFiles, Store, atomic_write_json, validate_name
from services.trainer import checkpoints as ckpt
from services.trainer import metrics as prom
from services.trainer.records import (
    CANCELLED,
    EVENT_PREFIX,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    JobState,
    now_ms,
)
from services.trainer.settings import TrainerSettings
from services.trainer.spec import Limits

log = logging.getLogger("ferry.trainer.jobs")

PERSIST_EVERY_S = 2.0
MAX_HISTORY = 1000  # epoch metrics kept in the record (checkpoints keep them all)


class _Running:
    """What the manager holds about a job process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.cancelled = False
        self.started = False
        self.done = False
        self.failure = ""


class JobManager:
    """Owns every job record of a store and the processes that run them."""

    def __init__(self, store: Store, settings: TrainerSettings) -> None:
        self.store = store
        self.settings = settings
        self.jobs: dict[str, JobRecord] = {}
        self._running: dict[str, _Running] = {}
        self._slots: set[str] = set()  # jobs holding a run slot, starting or running
        self._tasks: set[asyncio.Task[None]] = set()
        self._watchers: dict[str, set[asyncio.Queue[tuple[str, JobRecord | None]]]] = {}
        self._persisted: dict[str, float] = {}
        self._stopping = False
        cpus = cpu_limit(settings.cpu_limit)  # the pod's quota, not the node's cores
        self.threads = settings.threads_per_job or max(1, cpus // settings.max_concurrent_jobs)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every record, settle the ones a previous trainer left running, start the queue.

        One trainer per store: a second one would resume the same jobs twice, so it is refused.
        """
        self._lock = open(self.store.jobs_dir / ".trainer.lock", "a+")  # noqa: SIM115  # held for life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            self._lock.close()
            raise FailedPrecondition(f"another trainer is running on the store {self.store.root}") from err
        for path in sorted(self.store.jobs_dir.glob("*.json")):
            try:
                record = JobRecord.from_json(json.loads(path.read_text()))
                self.jobs[record.id] = record
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("unreadable job record %s: %s", path, err)
        for record in self.jobs.values():
            if record.state == RUNNING:
                self._recover(record)
        self._pump()

    def _recover(self, record: JobRecord) -> None:
        job_dir = self.store.checkpoints_dir / record.id
        _kill_orphan(record)
        ckpt.remove_staging(job_dir)
        record.checkpoints = ckpt.list_tags(job_dir)
        if ckpt.FINAL in record.checkpoints:
            summary = json.loads((job_dir / ckpt.FINAL / CheckpointFiles.METRICS).read_text())
            record.test_metrics = {f"test_{k}": v for k, v in summary.get("test", {}).items()}
            self._finish(record, SUCCEEDED)
        elif self.settings.resume_interrupted:
            record.state = QUEUED
            record.resumed_from = ckpt.last_epoch_tag(job_dir)
            self._save(record)
        else:
            self._finish(
                record,
                FAILED,
                "interrupted: the trainer stopped while the job ran (resume_interrupted is off)",
            )

    async def stop(self) -> None:
        """Stop the job processes; their records stay RUNNING, to resume on the next start."""
        self._stopping = True
        for queues in self._watchers.values():
            for queue in queues:
                with contextlib.suppress(asyncio.QueueEmpty):
                    if queue.full():
                        queue.get_nowait()
                queue.put_nowait(("shutdown", None))
        for job_id, running in list(self._running.items()):
            _signal_group(running.proc, signal.SIGKILL)
            self._save(self.jobs[job_id])
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)

    # --- queries ------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        validate_name(job_id, "job id")
        record = self.jobs.get(job_id)
        if record is None:
            raise NotFound(f"no job {job_id!r} on this trainer")
        return record

    def list(self, states: list[JobState], page_size: int, page_token: str) -> tuple[list[JobRecord], str]:
        if page_size < 0:
            raise InvalidArgument(f"page_size must not be negative, got {page_size}")
        size = min(page_size or 100, 1000)
        try:
            offset = int(page_token) if page_token else 0
            if offset < 0:
                raise ValueError
        except ValueError as err:
            raise InvalidArgument(f"invalid page_token {page_token!r}") from err
        chosen = sorted(
            (r for r in self.jobs.values() if not states or r.state in states),
            key=lambda r: (r.created_ms, r.id),
        )
        page = chosen[offset : offset + size]
        more = offset + size < len(chosen)
        return page, str(offset + size) if more else ""

    async def watch(self, job_id: str) -> AsyncIterator[tuple[str, JobRecord]]:
        """The job now (a copy), then each event with a copy of the job then, until it ends."""
        record = self.get(job_id)
        queue: asyncio.Queue[tuple[str, JobRecord | None]] = asyncio.Queue(maxsize=256)
        self._watchers.setdefault(job_id, set()).add(queue)
        try:
            yield "snapshot", copy.deepcopy(record)
            if record.terminal:
                return
            while True:
                kind, snapshot = await queue.get()
                if snapshot is None:  # "shutdown"
                    raise Unavailable("the trainer is shutting down; watch the job again on its restart")
                yield kind, snapshot
                if snapshot.terminal:
                    return
        finally:
            self._watchers[job_id].discard(queue)

    # --- commands -----------------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(s.max_nprocs, s.max_epochs, s.max_batch_size, tuple(s.allowed_factories))

    def submit(self, spec: dict[str, Any], name: str, owner: str = "-") -> JobRecord:
        """Queue a job for ``owner`` (the caller's key name), up to its share of the queue."""
        prefix = validate_name(name, "job name")[:40] if name else "job"
        pending = sum(1 for r in self.jobs.values() if (r.owner or "-") == owner and not r.terminal)
        if pending >= self.settings.max_queued_jobs_per_key:
            raise ResourceExhausted(
                f"key {owner!r} already has {pending} queued or running jobs, the limit "
                f"(max_queued_jobs_per_key={self.settings.max_queued_jobs_per_key}); wait or cancel one"
            )
        job_id = f"{prefix}-{uuid.uuid4().hex[:10]}"
        record = JobRecord.new(job_id, name, spec)
        record.owner = owner
        self.jobs[job_id] = record
        self._save(record)
        self._pump()
        return record

    async def cancel(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record.terminal:
            raise FailedPrecondition(
                f"job {job_id!r} is already {record.state}; only queued or running jobs can be cancelled"
            )
        running = self._running.get(job_id)
        if running is None:
            self._finish(record, CANCELLED, "cancelled before it started")
            return record
        running.cancelled = True
        _signal_group(running.proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(running.proc.wait()), self.settings.cancel_grace_s)
        except TimeoutError:
            _signal_group(running.proc, signal.SIGKILL)
        for _ in range(100):  # the reader task settles the record once the pipe closes
            if record.terminal:
                break
            await asyncio.sleep(0.05)
        return record

    # --- running ------------------------------------------------------------------------------

    def _pump(self) -> None:
        if self._stopping:
            return
        queued = sorted((r for r in self.jobs.values() if r.state == QUEUED), key=lambda r: r.created_ms)
        for record in queued:
            if len(self._slots) >= self.settings.max_concurrent_jobs:
                break
            if record.id in self._slots:
                continue
            self._slots.add(record.id)
            task = asyncio.get_running_loop().create_task(self._run(record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, record: JobRecord) -> None:
        job_id = record.id
        try:
            with tracing.span("train", **{"ferry.job": job_id, "ferry.attempt": record.attempts + 1}):
                await self._run_process(record)
        except Exception as err:
            log.exception("job %s could not run", job_id)
            if not record.terminal and not self._stopping:
                self._finish(record, FAILED, f"the job process could not run: {err}")
        finally:
            self._running.pop(job_id, None)
            self._slots.discard(job_id)
            self._pump()

    async def _run_process(self, record: JobRecord) -> None:
        job_id = record.id
        if record.state != QUEUED:  # cancelled before its turn came
            return
        argv = [sys.executable, "-m", "services.trainer.runner", "--store", str(self.store.root)]
        argv += ["--job", job_id, "--threads", str(self.threads), "--parent", str(os.getpid())]
        argv += ["--allowed-factories", ",".join(self.settings.allowed_factories)]
        if record.resumed_from:
            argv += ["--resume", record.resumed_from]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), env.get("PYTHONPATH", "")] if p)
        with open(self.store.jobs_dir / f"{job_id}.log", "ab") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
                env=env,
                limit=16 * 1024 * 1024,  # a user factory may print long lines; events are short
            )
        running = _Running(proc)
        self._running[job_id] = running
        if record.state != QUEUED:  # cancelled while the process was starting
            _signal_group(proc, signal.SIGKILL)
            await proc.wait()
            return
        record.state, record.pid, record.error = RUNNING, proc.pid, ""
        record.attempts += 1
        record.started_ms = record.started_ms or now_ms()
        self._save(record)
        self._notify(record, "state")
        assert proc.stdout is not None
        watchdog = asyncio.get_running_loop().call_later(
            self.settings.start_timeout_s, self._start_overdue, record, running
        )
        try:
            await self._read_events(record, running, proc.stdout)
        finally:
            watchdog.cancel()
        code = await proc.wait()
        if self._stopping:
            return
        job_dir = self.store.checkpoints_dir / job_id
        ckpt.remove_staging(job_dir)
        record.checkpoints = ckpt.list_tags(job_dir)
        if running.done and code == 0:
            self._finish(record, SUCCEEDED)
        elif running.cancelled:
            self._finish(record, CANCELLED, "cancelled")
        elif running.failure:
            self._finish(record, FAILED, running.failure)
        elif code < 0:
            self._finish(record, FAILED, f"the job process was killed by {signal.Signals(-code).name}")
        else:
            self._finish(record, FAILED, f"the job process exited with code {code}{self._log_tail(job_id)}")

    async def _read_events(self, record: JobRecord, running: _Running, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            text = line.decode(errors="replace").strip()
            if text.startswith(EVENT_PREFIX):
                with contextlib.suppress(ValueError):
                    self._on_event(record, running, json.loads(text[len(EVENT_PREFIX) :]))

    def _start_overdue(self, record: JobRecord, running: _Running) -> None:
        """A job that never reports ``started`` (a factory that hangs at import, a dataset that
        never loads) is killed, so it cannot hold a run slot for ever."""
        if running.started or running.proc.returncode is not None:
            return
        running.failure = (
            f"the job did not start within start_timeout_s={self.settings.start_timeout_s:g} s "
            "(loading its data and building its model); it was killed"
        )
        _signal_group(running.proc, signal.SIGKILL)

    def _on_event(self, record: JobRecord, running: _Running, event: dict[str, Any]) -> None:
        kind = event.get("type")
        progress = record.progress
        if kind == "progress":
            progress.epoch, progress.epochs, progress.step = event["epoch"], event["epochs"], event["step"]
            progress.loss, progress.samples_per_second = event["loss"], event["samples_per_second"]
            progress.eta_seconds = event["eta_seconds"]
            progress.steps_per_epoch = event["steps"]
            if time.monotonic() - self._persisted.get(record.id, 0.0) > PERSIST_EVERY_S:
                self._save(record)
            self._notify(record, "progress")
        elif kind == "epoch":
            metrics = event["metrics"]
            record.history = [*record.history, metrics][-MAX_HISTORY:]
            prom.epoch_done(float(metrics.get("epoch_seconds", 0.0)))
            record.checkpoints = ckpt.list_tags(self.store.checkpoints_dir / record.id)
            progress.epoch = metrics["epoch"]
            progress.metrics = {k: float(v) for k, v in metrics.items() if k != "epoch"}
            self._save(record)
            self._notify(record, "epoch")
        elif kind == "started":
            running.started = True
            record.world, record.device = event.get("world", 1), event.get("device", "")
            self._save(record)
        elif kind == "done":
            running.done = True
            record.test_metrics = {f"test_{k}": float(v) for k, v in event["test"].items()}
        elif kind == "failed" and not running.failure:
            running.failure = str(event["error"])

    def _finish(self, record: JobRecord, state: JobState, error: str = "") -> None:
        record.state, record.error, record.finished_ms, record.pid = state, error, now_ms(), 0
        self._save(record)
        prom.job_finished(state.value)
        self._notify(record, "state")

    def _save(self, record: JobRecord) -> None:
        self._persisted[record.id] = time.monotonic()
        atomic_write_json(self.store.job_file(record.id), record.to_json())
        prom.count_jobs(r.state.value for r in self.jobs.values())

    def _notify(self, record: JobRecord, kind: str) -> None:
        queues = self._watchers.get(record.id)
        if not queues:
            return
        snapshot = copy.deepcopy(record)
        for queue in queues:
            if queue.full():
                if kind == "progress" and not snapshot.terminal:
                    continue  # a slow watcher misses progress ticks, never a state change
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait((kind, snapshot))

    def _log_tail(self, job_id: str) -> str:
        path = self.store.jobs_dir / f"{job_id}.log"
        with contextlib.suppress(OSError):
            lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if lines:
                return f": {lines[-1][-300:]}"
        return ""


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _kill_orphan(record: JobRecord) -> None:
    """Kill a job process a dead trainer left behind (only if it really is that job's runner)."""
    pid = int(record.pid or 0)
    if not pid:
        return
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"services.trainer.runner" in cmdline and record.id.encode() in cmdline:
            os.killpg(pid, signal.SIGKILL)
