"""ONNX Runtime sessions for one model version, and the signature they imply.

A runner holds one session per instance; ``run`` borrows an idle one, so
``instances`` sessions run side by side on the batcher's threads. Execution
providers come from settings: by default CUDA first when onnxruntime-gpu offers
it, then CPU. ``derive_spec`` reads names, datatypes and dims from the graph,
which is what serves when ``config.json`` says nothing.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ferry.core import external_data
from ferry.core.datatypes import BY_ORT
from ferry.core.errors import FailedPrecondition
from ferry.core.modelconfig import DEFAULT_MAX_BATCH_SIZE, BatchingPolicy, ModelSpec, TensorSpec

ORT_NAMES = {ort: d.name for ort, d in BY_ORT.items()}

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


CUDA = "CUDAExecutionProvider"


def fallback_problem(asked: list[str], got: list[str], allow_cpu_fallback: bool) -> str | None:
    """Why serving on ``got`` when ``asked`` is wrong, or None. ONNX Runtime falls back to CPU
    silently (an INFO line) when CUDA does not load; a GPU worker serving on CPU is a slow
    outage, so an explicit ask for CUDA must be met unless CPU fallback is allowed. An empty
    ``asked`` (the default: CUDA when offered, then CPU) is best effort, so CPU-only hosts start."""
    if allow_cpu_fallback or CUDA not in asked or CUDA in got:
        return None
    return (
        f"{CUDA} was asked for (providers={asked}) but ONNX Runtime offers only {got}: "
        "is onnxruntime-gpu installed, with the CUDA and cuDNN libraries and a visible GPU? "
        "Set allow_cpu_fallback to serve on CPU instead"
    )


def provider_names(providers: list[Any]) -> list[str]:
    """Names of a ``provider_list`` result (entries are names or (name, options))."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def provider_list(
    names: list[str], cuda_device_id: int = 0, cuda_mem_limit: int = 0, cudnn_search: str = "HEURISTIC"
) -> list[Any]:
    """Providers with their options; CUDA gets the device id, memory limit and cuDNN search mode."""
    out: list[Any] = []
    for name in names or default_providers():
        if name == "CUDAExecutionProvider":
            options: dict[str, Any] = {"device_id": cuda_device_id, "cudnn_conv_algo_search": cudnn_search}
            if cuda_mem_limit:
                options["gpu_mem_limit"] = cuda_mem_limit
            out.append((name, options))
        else:
            out.append(name)
    return out


class OrtRunner:
    """``instances`` ORT sessions of one model file (and its external-data files, checked first:
    ``ferry.core.external_data``)."""

    def __init__(
        self,
        path: Path,
        *,
        providers: list[Any],
        instances: int = 1,
        optimization: str = "all",
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        require: list[str] | None = None,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = OPT_LEVELS[optimization]
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        # Idle intra-op threads would otherwise spin for a while after each run, taking a CPU
        # from the event loop that decodes the next requests (on a 2-CPU host, half the machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        model_bytes = Path(path).read_bytes()
        # Every external-data location is checked before ONNX Runtime opens any (INVALID_ARGUMENT
        # naming the tensor); such a model loads from its path, so ORT finds the files beside it.
        try:
            self.external_files = external_data.check_model(model_bytes, Path(path).parent)
        except external_data.UnreadableModel:  # not a protobuf: ONNX Runtime says so below
            self.external_files = {}
        source: bytes | str = str(path) if self.external_files else model_bytes
        self.sessions = [ort.InferenceSession(source, options, providers=providers) for _ in range(instances)]
        if require is not None:
            problem = fallback_problem(require, self.sessions[0].get_providers(), False)
            if problem:
                raise FailedPrecondition(problem)
        self._idle: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for s in self.sessions:
            self._idle.put(s)
        first = self.sessions[0]
        self.input_names = [i.name for i in first.get_inputs()]
        self.output_names = [o.name for o in first.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return list(self.sessions[0].get_providers())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._idle.get()
        try:
            values = session.run(self.output_names, feeds)
        finally:
            self._idle.put(session)
        return dict(zip(self.output_names, values, strict=True))

    def derive_spec(self, name: str, default_max_batch: int = DEFAULT_MAX_BATCH_SIZE) -> ModelSpec:
        """The serving signature the graph implies: a dynamic first axis on every input means batching."""
        first = self.sessions[0]
        ins, outs = first.get_inputs(), first.get_outputs()
        batchable = all(i.shape and not isinstance(i.shape[0], int) for i in ins) and all(
            o.shape and not isinstance(o.shape[0], int) for o in outs
        )

        def tensor(node: Any) -> TensorSpec:
            dims = [d if isinstance(d, int) and d >= 0 else -1 for d in node.shape]
            return TensorSpec(
                node.name, ORT_NAMES.get(node.type, node.type), tuple(dims[1:] if batchable else dims)
            )

        return ModelSpec(
            name=name,
            inputs=tuple(tensor(i) for i in ins),
            outputs=tuple(tensor(o) for o in outs),
            max_batch_size=default_max_batch if batchable else 0,
            batching=BatchingPolicy() if batchable else None,
        )

    def warmup(self, runs: Sequence[tuple[dict[str, np.ndarray], int]]) -> int:
        """Run every session on each warm-up feed ``count`` times before it serves, so the first
        real request pays no lazy initialisation; returns the runs made."""
        made = 0
        for session in self.sessions:
            for feeds, count in runs:
                for _ in range(count):
                    session.run(self.output_names, feeds)
                    made += 1
        return made
