"""Which model versions this worker serves, and the switch from one to the next.

The store is the source of truth: every ``poll_interval_s`` the repository
compares what the store holds (and each model's version policy) with what is
loaded. A new version is loaded and warmed up off the event loop while the old
one keeps serving; only then is it switched in, and the old version drains its
queue before its sessions are released. Requests resolve a version and enqueue
in one synchronous step, so a switch never strands a request on a closed queue.
The repository API (load/unload, optionally of one version) pins or excludes
versions on top of the policy. A version that fails to load is reported
UNAVAILABLE with its error and retried only when its file changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core import warmup
from ferry.core.classify import read_labels
from ferry.core.cpus import cpu_limit
from ferry.core.errors import (
    FailedPrecondition,
    FerryError,
    InvalidArgument,
    ModelUnavailable,
    NotFound,
    ResourceExhausted,
)
from ferry.core.grpcserver import incident
from ferry.core.modelconfig import ModelSpec, spec_from_config, version_policy_of
from ferry.core.store import Store
from ferry.core.text import TOKENIZER_FILE, TextEncoder, find_tokenizer, read_tokenizer
from ferry.core.textinput import parse_text
from services.inference.batcher import Batcher
from services.inference.memory import MemoryBook, version_bytes
from services.inference.runner import OrtRunner, provider_list
from services.inference.sequences import Sequences, check_graph, initial_states
from services.inference.settings import WorkerSettings
from services.inference.stats import ModelStats
from services.inference.textfeeds import TextFeeds

log = logging.getLogger("ferry.worker.repository")

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


@dataclass(eq=False)
class Version:
    """One loaded, serving model version."""

    model: str
    number: int
    spec: ModelSpec
    runner: OrtRunner
    batcher: Batcher
    stats: ModelStats
    labels: tuple[str, ...] = ()  # labels.txt beside the versions, for class_count outputs
    sequences: Sequences | None = None  # a sequence model's live sequences
    encoder: TextEncoder | None = None  # a model that takes text: its tokenizer

    async def close(self) -> None:
        """Stop serving: live sequences are dropped, queued requests finish or fail."""
        if self.sequences is not None:
            self.sequences.close()
        await self.batcher.close()


@dataclass
class Built:
    """A version ready to serve, built off the event loop."""

    runner: OrtRunner
    spec: ModelSpec
    initial: dict[str, np.ndarray]  # a sequence model's initial states, else empty
    booked: int  # bytes it holds, by the memory book's measure (services.inference.memory)
    encoder: TextEncoder | None = None


@dataclass
class ModelState:
    name: str
    wanted: bool = True
    pinned: set[int] = field(default_factory=set)
    excluded: set[int] = field(default_factory=set)
    ready: dict[int, Version] = field(default_factory=dict)
    status: dict[int, tuple[str, str]] = field(default_factory=dict)
    failed_mtime: dict[int, float] = field(default_factory=dict)
    stats: dict[int, ModelStats] = field(default_factory=dict)
    override: dict[str, Any] | None = None  # a RepositoryModelLoad config, in force over config.json
    evicted: bool = False  # unloaded to make room (--evict lru): loads again on its next request
    errors: dict[int, FerryError] = field(default_factory=dict)  # why each version last failed to load


class Repository:
    def __init__(self, store: Store, settings: WorkerSettings) -> None:
        self.store = store
        self.settings = settings
        self.models: dict[str, ModelState] = {}
        self._lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._providers = provider_list(
            settings.providers,
            settings.cuda_device_id,
            settings.cuda_mem_limit_bytes,
            settings.cudnn_conv_algo_search,
        )
        self.memory = MemoryBook(settings.memory_budget_bytes, settings.evict == "lru")
        # Sized by the pod's CPU quota, not the node's cores that ORT would count.
        self._intra_threads = settings.intra_op_threads or cpu_limit(settings.cpu_limit)
        self._require = None if settings.allow_cpu_fallback else list(settings.providers)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.sync()
        if self.settings.poll_interval_s > 0:
            self._watch_task = asyncio.create_task(self._watch(), name="store-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.sync()
            except Exception:
                log.exception("store scan failed; serving what is loaded")

    async def close(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
        async with self._lock:
            for state in self.models.values():
                for number in list(state.ready):
                    await self._unload_version(state, number)

    # --- syncing with the store ---------------------------------------------------------------

    async def sync(self, only: str | None = None) -> None:
        async with self._lock:
            names = [only] if only else sorted(set(self.store.list_models()) | set(self.models))
            for name in names:
                await self._sync_model(name)

    def _state(self, name: str) -> ModelState:
        state = self.models.get(name)
        if state is None:
            wanted = not self.settings.models or name in self.settings.models
            state = self.models[name] = ModelState(name, wanted=wanted)
        return state

    async def _sync_model(self, name: str) -> None:
        state = self._state(name)
        available = self.store.list_versions(name)
        config: dict[str, Any] | None = None
        target: set[int] = set()
        if state.wanted and available and not state.evicted:
            try:
                config = state.override if state.override is not None else self.store.read_config(name)
            except (OSError, ValueError) as err:
                for v in available:
                    state.status[v] = (UNAVAILABLE, f"config.json unreadable: {err}")
                return
            target = set(version_policy_of(config).select(available)) | (state.pinned & set(available))
            target -= state.excluded
        for number in sorted(target - set(state.ready)):
            await self._load_version(state, number, config)
        for number in sorted(set(state.ready) - target):
            await self._unload_version(state, number)
        for number in list(state.status):
            if number not in available:
                state.status.pop(number, None)
                state.failed_mtime.pop(number, None)

    async def _load_version(self, state: ModelState, number: int, config: dict[str, Any] | None) -> None:
        path = self.store.version_dir(state.name, number) / "model.onnx"
        mtime = path.stat().st_mtime if path.exists() else 0.0
        if state.failed_mtime.get(number) == mtime:
            return
        state.status[number] = (LOADING, "")
        try:
            need = await self._make_room(state.name, number, config)
            built = await asyncio.get_running_loop().run_in_executor(
                None, self._build, state.name, number, config, need
            )
        except Exception as err:
            if isinstance(err, FerryError):
                state.errors[number] = err
                reason = f"failed to load: {err.message}"
                log.warning("model %s version %s %s", state.name, number, reason)
            else:  # the kind and an incident id; the library's own text goes to the log only
                reason = incident(err, "failed to load")
            state.status[number] = (UNAVAILABLE, reason)
            state.failed_mtime[number] = mtime
            return
        self._install(state, number, built)

    def _install(self, state: ModelState, number: int, built: Built) -> Version | None:
        """Serve ``built`` as this version; returns the version it replaced, for its caller to close."""
        runner, spec = built.runner, built.spec
        stats = state.stats.setdefault(number, ModelStats())
        batcher = Batcher(
            f"{state.name}:{number}",
            runner.run,
            max_batch_size=spec.max_batch_size,
            policy=spec.batching,
            slots=len(runner.sessions),
            stats=stats,
            prepare=TextFeeds(spec, built.encoder) if built.encoder is not None else None,
        )
        old = state.ready.get(number)
        labels = read_labels(self.store.version_dir(state.name, number), self.store.model_dir(state.name))
        sequences = Sequences(state.name, spec.sequence, built.initial) if spec.sequence is not None else None
        state.ready[number] = Version(
            state.name, number, spec, runner, batcher, stats, labels, sequences, built.encoder
        )
        state.status[number] = (READY, "")
        state.failed_mtime.pop(number, None)
        state.errors.pop(number, None)
        self.memory.book(state.name, number, built.booked)
        log.info("model %s version %s ready on %s", state.name, number, runner.providers)
        return old

    def _instances(self, config: dict[str, Any] | None) -> int:
        return max(1, self.settings.instances or int((config or {}).get("instance_count", 1)))

    async def _make_room(self, name: str, number: int, config: dict[str, Any] | None) -> int:
        """Evict what the memory budget asks before ``name`` ``number`` loads; returns the bytes
        it will be booked at. RESOURCE_EXHAUSTED when it cannot fit."""
        need = version_bytes(self.store.version_dir(name, number), self._instances(config))
        for victim in self.memory.make_room(name, number, need, time.monotonic()):
            await self._evict(victim, f"to make room for model {name!r} version {number}")
        return need

    async def _evict(self, name: str, why: str) -> None:
        """Unload every version of ``name``; it loads again on its next request."""
        state = self.models[name]
        numbers = sorted(state.ready)
        for number in numbers:
            await self._unload_version(state, number)
            state.status[number] = (UNAVAILABLE, f"evicted {why}; it loads again on its next request")
        state.evicted = True
        log.warning("model %s evicted %s (versions %s)", name, why, numbers)

    async def reload_evicted(self, name: str, version: str = "") -> Version:
        """The version a request to an evicted model goes to, once that model has loaded again
        (the request waits for the load); a model that was not evicted answers as ``resolve``."""
        state = self.models.get(name)
        if state is not None and state.evicted:
            async with self._lock:
                if state.evicted:
                    state.evicted = False
                    for number in list(state.status):  # the evicted ones; a failed load keeps its reason
                        if state.status[number][0] == UNAVAILABLE and number not in state.failed_mtime:
                            state.status.pop(number)
                    await self._sync_model(name)
        return self.resolve(name, version)

    def _build(self, name: str, number: int, config: dict[str, Any] | None, booked: int) -> Built:
        s = self.settings
        instances = self._instances(config)
        runner = OrtRunner(
            self.store.model_file(name, number),
            providers=self._providers,
            instances=max(1, instances),
            optimization=s.graph_optimization,
            intra_op_threads=self._intra_threads,
            inter_op_threads=s.inter_op_threads,
            require=self._require,
        )
        derived = runner.derive_spec(name, s.max_batch_size)
        spec = spec_from_config(name, config, derived) if config else derived
        missing = [t.name for t in spec.inputs if t.name not in runner.input_names]
        if missing:
            raise InvalidArgument(f"config.json names inputs the graph does not have: {missing}")
        graph = {t.name: t.datatype for t in (*derived.inputs, *derived.outputs)}
        for t in (*spec.inputs, *spec.outputs):
            if t.name in graph and graph[t.name] != t.datatype:
                raise InvalidArgument(
                    f"the config gives {t.name!r} datatype {t.datatype} but the graph's is {graph[t.name]}"
                )
        spec, encoder = _text(spec, self.store.version_dir(name, number))
        initial: dict[str, np.ndarray] = {}
        if spec.sequence is not None:
            check_graph(spec.sequence, runner.input_names, runner.output_names)
            where = f"config of model {name!r}"
            batched = spec.max_batch_size > 0
            initial = initial_states(spec.sequence, batched, self.store.model_dir(name), where)
        if s.warmup:
            _warm(runner, spec, number, self.store.model_dir(name), initial)
        return Built(runner, spec, initial, booked, encoder)

    async def _unload_version(self, state: ModelState, number: int) -> None:
        version = state.ready.pop(number, None)
        if version is None:
            return
        state.status[number] = (UNLOADING, "")
        self.memory.release(state.name, number)
        await version.close()
        state.status.pop(number, None)
        log.info("model %s version %s unloaded", state.name, number)

    # --- serving ------------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> Version:
        """The version a request goes to: the named one, or the highest ready one."""
        state = self.models.get(name)
        if state is None:
            raise NotFound(f"unknown model {name!r}")
        if not version:
            if not state.ready:
                raise ModelUnavailable(f"model {name!r} has no version ready ({self._why(state)})")
            return state.ready[max(state.ready)]
        number = parse_version(version)
        if number in state.ready:
            return state.ready[number]
        if number in state.status:
            st, reason = state.status[number]
            raise ModelUnavailable(
                f"model {name!r} version {number} is {st}{': ' + reason if reason else ''}"
            )
        raise NotFound(f"model {name!r} has no version {number}")

    @staticmethod
    def _why(state: ModelState) -> str:
        if not state.wanted:
            return "the model is not loaded"
        details = [f"v{v} {st}{': ' + r if r else ''}" for v, (st, r) in sorted(state.status.items())]
        return "; ".join(details) or "no published version"

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except FerryError:
            return False
        return True

    def index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        rows: list[tuple[str, str, str, str]] = []
        for name in sorted(set(self.store.list_models()) | set(self.models)):
            state = self.models.get(name)
            statuses = dict(state.status) if state else {}
            if not statuses and not ready_only:
                rows.append(
                    (name, "", UNAVAILABLE, "unloaded" if state and not state.wanted else "no version loaded")
                )
            for number, (st, reason) in sorted(statuses.items()):
                if not ready_only or st == READY:
                    rows.append((name, str(number), st, reason))
        return rows

    # --- repository API -----------------------------------------------------------------------

    async def load(self, name: str, version: int | None = None, config: dict[str, Any] | None = None) -> None:
        """Load a model (or one version). With ``config``, that config replaces config.json for
        this model until a plain load: it is built first and only then swapped in, so an override
        that does not load fails with the reason and the old config keeps serving."""
        if not self.store.list_versions(name):
            raise NotFound(f"model {name!r} is not in the store")
        if config is not None:
            await self._swap_config(name, config, override=True)
            return
        state = self._state(name)
        if state.override is not None:  # back to config.json, swapped in the same way
            try:
                file_config = self.store.read_config(name)
            except (OSError, ValueError) as err:
                raise InvalidArgument(f"failed to load {name!r}: config.json unreadable: {err}") from err
            await self._swap_config(name, file_config, override=False)
        state.wanted = True
        if version is not None:
            if version not in self.store.list_versions(name):
                raise NotFound(f"model {name!r} has no version {version} in the store")
            state.pinned.add(version)
            state.excluded.discard(version)
            state.failed_mtime.pop(version, None)
        else:
            state.excluded.clear()
            state.failed_mtime.clear()
        state.evicted = False
        await self.sync(only=name)
        failed = {v: r for v, (st, r) in state.status.items() if st == UNAVAILABLE and (version in (None, v))}
        over = [e for v, e in state.errors.items() if v in failed and isinstance(e, ResourceExhausted)]
        if over:
            raise ResourceExhausted(f"model {name!r}: {over[0].message}")
        if failed:
            raise FailedPrecondition(
                f"model {name!r}: " + "; ".join(f"version {v} {r}" for v, r in failed.items())
            )

    async def _swap_config(self, name: str, config: dict[str, Any] | None, override: bool) -> None:
        """Build every version ``config`` selects, then swap them in for the ones serving."""
        async with self._lock:
            state = self._state(name)
            available = self.store.list_versions(name)
            try:
                policy = version_policy_of(config)
            except (TypeError, ValueError, AttributeError) as err:
                raise InvalidArgument(
                    f"failed to load {name!r}: bad version_policy in the config: {err}"
                ) from err
            targets = sorted(
                (set(policy.select(available)) | (state.pinned & set(available))) - state.excluded
            )
            built = {}
            for number in targets:
                need = await self._make_room(name, number, config)
                try:
                    built[number] = await asyncio.get_running_loop().run_in_executor(
                        None, self._build, name, number, config, need
                    )
                except Exception as err:
                    reason = err.message if isinstance(err, FerryError) else incident(err, "failed to build")
                    raise InvalidArgument(
                        f"failed to load {name!r} version {number} with the given config: {reason}; "
                        "the model keeps its previous config"
                    ) from err
            state.wanted, state.override = True, (dict(config or {}) if override else None)
            for number, ready in built.items():
                old = self._install(state, number, ready)
                if old is not None:
                    await old.close()
            for number in sorted(set(state.ready) - set(built)):
                await self._unload_version(state, number)
            log.warning(
                "model %s: config %s (versions %s)",
                name,
                "overridden" if override else "from config.json",
                targets,
            )

    async def unload(self, name: str, version: int | None = None) -> None:
        state = self.models.get(name)
        if state is None:
            raise NotFound(f"unknown model {name!r}")
        if version is None:
            state.wanted = False
            state.pinned.clear()
        else:
            state.excluded.add(version)
            state.pinned.discard(version)
        await self.sync(only=name)

    def statistics(self, name: str = "", version: str = "") -> list[tuple[str, int, ModelStats]]:
        if name and name not in self.models:
            raise NotFound(f"unknown model {name!r}")
        number = parse_version(version) if version else None
        out = []
        for model in [name] if name else sorted(self.models):
            for v, stats in sorted(self.models[model].stats.items()):
                if number is None or v == number:
                    out.append((model, v, stats))
        if name and number is not None and not out:
            raise NotFound(f"model {name!r} has no version {number}")
        return out


def parse_version(text: str) -> int:
    with contextlib.suppress(ValueError):
        number = int(text)
        if number > 0:
            return number
    raise InvalidArgument(f"invalid model version {text!r}: versions are positive integers")


MUST_PASS = ("1", "true", "yes")


def _text(spec: ModelSpec, version_dir: Path) -> tuple[ModelSpec, TextEncoder | None]:
    """A version takes text when its config has a ``text`` entry or its folder (else its model's)
    holds ``tokenizer.json``; the tokenizer is read here, so a missing or corrupt one fails the load
    with the reason while the other versions keep serving."""
    path = find_tokenizer(version_dir)
    if spec.text is None and path is None:
        return spec, None
    if spec.text is None:
        inputs = [(t.name, t.datatype, t.dims) for t in spec.inputs]
        spec = replace(spec, text=parse_text({}, inputs, f"model {spec.name!r} (it has {TOKENIZER_FILE})"))
    assert spec.text is not None
    if spec.sequence is not None:
        raise InvalidArgument("a text input and sequence_batching exclude each other")
    if spec.max_batch_size <= 0:
        raise InvalidArgument(
            "a model that takes text must batch (max_batch_size > 0): texts come one per row"
        )
    if path is None:
        raise InvalidArgument(f"the config gives the model a text input but {TOKENIZER_FILE} is missing")
    encoder = TextEncoder(read_tokenizer(path), spec.text.max_length)
    if not spec.text.mask and encoder.pad_id != 0:
        raise InvalidArgument(
            f"{TOKENIZER_FILE} pads with id {encoder.pad_id}, but the model has no attention-mask input and "
            "reads padding as id 0"
        )
    return spec, encoder


def _warm(
    runner: OrtRunner, spec: ModelSpec, number: int, model_dir: Path, states: dict[str, np.ndarray]
) -> None:
    """Run the config's ``model_warmup`` samples (``ferry.core.warmup``), or zeros twice.

    A sample that does not fit the model fails the load with the reason. Zeros or empty
    strings do not suit every graph (a Cast of "" to a number fails), so a run that fails is
    logged and the model serves anyway, unless its config says
    ``"parameters": {"warmup_must_pass": "true"}``."""
    where = f"config of model {spec.name!r}"
    if spec.warmup:
        inputs = {t.name: (t.datatype, tuple(t.dims)) for t in spec.inputs}
        for sample in spec.warmup:
            warmup.check(sample, inputs, spec.max_batch_size, where)
        samples = spec.warmup
    else:
        tensors = [(t.name, t.datatype, tuple(t.dims)) for t in spec.inputs]
        samples = (warmup.zeros_sample(tensors, spec.max_batch_size > 0),)
    runs = [(warmup.feeds(x, model_dir, where, seed=i), x.count) for i, x in enumerate(samples)]
    for feeds, _ in runs:  # a sequence model is also fed its states, as at a sequence's start
        rows = max(1, next(iter(feeds.values())).shape[0]) if spec.max_batch_size > 0 and feeds else 1
        for name, value in states.items():
            feeds[name] = np.repeat(value, rows, axis=0) if spec.max_batch_size > 0 else value
    started = time.monotonic()
    try:
        made = runner.warmup(runs)
    except Exception as err:  # ONNX Runtime raises its own error types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        if spec.parameters.get("warmup_must_pass", "").lower() in MUST_PASS:
            raise InvalidArgument(f"warm-up failed and warmup_must_pass is set: {reason}") from err
        log.warning(
            "model %s version %s: warm-up failed (%s); it serves anyway",
            spec.name,
            number,
            reason,
        )
        return
    log.info(
        "model %s version %s warmed up: %s (%d runs, %.0f ms)",
        spec.name,
        number,
        ", ".join(f"{x.name} batch {x.batch_size} x{x.count}" for x in samples),
        made,
        (time.monotonic() - started) * 1000,
    )
