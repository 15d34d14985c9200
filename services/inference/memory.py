"""How much memory the worker's loaded versions hold, against an operator's budget. Pure.

A version is booked at what its sessions keep resident for certain: the bytes of its model files
(``model.onnx`` and any external data) once per instance, since each ONNX Runtime session holds its
own copy of the weights, and a text model's ``tokenizer.json`` once. That is an estimate (a session
adds its arena and the optimized graph on top), but one that is known before the load, the same on
every host, and what ``ModelStatistics.memory_usage`` reports. With ``--memory-budget-bytes`` a load
that would take the booked total past the budget is refused with RESOURCE_EXHAUSTED naming it, or,
with ``--evict lru``, makes room by unloading the models least recently used first; an evicted model
loads again on its next request, which waits for that load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ferry.core.errors import ResourceExhausted
from ferry.core.store import weight_bytes
from ferry.core.text import find_tokenizer

Key = tuple[str, int]  # (model, version)


def version_bytes(version_dir: Path, instances: int) -> int:
    """The booked size of a version: its files (the model and its external data) per instance,
    and its tokenizer's file once (the instances share one tokenizer)."""
    tokenizer = find_tokenizer(version_dir)
    return weight_bytes(version_dir) * max(1, instances) + (tokenizer.stat().st_size if tokenizer else 0)


@dataclass
class MemoryBook:
    budget: int = 0  # bytes; 0 means no budget
    evict: bool = False  # least recently used models make room
    booked: dict[Key, int] = field(default_factory=dict)
    last_used: dict[str, float] = field(default_factory=dict)  # model -> monotonic time of its last request

    def total(self) -> int:
        return sum(self.booked.values())

    def make_room(self, model: str, version: int, need: int, now: float) -> list[str]:
        """The models to unload (least recently used first) before ``model`` ``version`` loads
        with ``need`` bytes; raises RESOURCE_EXHAUSTED when it cannot fit."""
        if not self.budget:
            return []
        in_use = self.total() - self.booked.get((model, version), 0)
        if in_use + need <= self.budget:
            return []
        if need > self.budget:
            raise ResourceExhausted(
                f"model {model!r} version {version} needs about {need} bytes, more than the worker's whole "
                f"memory budget of {self.budget} bytes (--memory-budget-bytes)"
            )
        if not self.evict:
            raise ResourceExhausted(
                f"loading model {model!r} version {version} needs about {need} bytes, and {in_use} of the "
                f"worker's memory budget of {self.budget} bytes (--memory-budget-bytes) are in use; unload a "
                "model, raise the budget, or let the worker evict idle models (--evict lru)"
            )
        per_model: dict[str, int] = {}
        for (name, _), size in self.booked.items():
            if name != model:
                per_model[name] = per_model.get(name, 0) + size
        order = sorted(per_model, key=lambda name: (self.last_used.get(name, 0.0), name))
        victims: list[str] = []
        for name in order:
            if in_use + need <= self.budget:
                break
            victims.append(name)
            in_use -= per_model[name]
        if in_use + need > self.budget:
            raise ResourceExhausted(
                f"model {model!r} version {version} needs about {need} bytes; even with every other model "
                f"evicted, {in_use} bytes of this model's other versions stay, over the memory budget of "
                f"{self.budget} bytes (--memory-budget-bytes)"
            )
        return victims

    def book(self, model: str, version: int, size: int) -> None:
        self.booked[(model, version)] = size

    def release(self, model: str, version: int) -> None:
        self.booked.pop((model, version), None)

    def used(self, model: str, now: float) -> None:
        self.last_used[model] = now

    def of(self, model: str, version: int) -> int | None:
        return self.booked.get((model, version))

    def snapshot(self) -> Mapping[Key, int]:
        return dict(self.booked)
