"""The blocking clients declare every public coroutine method of their async twins, with its signature."""

from __future__ import annotations

import inspect

import pytest

from ferry.client.exporter import ExporterClient, SyncExporterClient
from ferry.client.inference import InferenceClient, SyncInferenceClient
from ferry.client.trainer import SyncTrainerClient, TrainerClient

PAIRS = [
    (InferenceClient, SyncInferenceClient),
    (TrainerClient, SyncTrainerClient),
    (ExporterClient, SyncExporterClient),
]
# coroutine methods with a hand-written blocking twin, or none on purpose (streams)
NOT_BLOCKING = {"close", "stream_infer", "watch", "export_events"}


@pytest.mark.parametrize(("async_cls", "sync_cls"), PAIRS, ids=lambda c: c.__name__)
def test_every_coroutine_method_has_a_blocking_twin_with_its_signature(
    async_cls: type, sync_cls: type
) -> None:
    methods = [
        name
        for name, fn in inspect.getmembers(async_cls, inspect.iscoroutinefunction)
        if not name.startswith("_") and name not in NOT_BLOCKING
    ]
    assert methods, async_cls
    for name in methods:
        twin = sync_cls.__dict__.get(name)
        assert twin is not None, f"{sync_cls.__name__}.{name} is missing"
        assert not inspect.iscoroutinefunction(twin)
        assert inspect.signature(twin) == inspect.signature(getattr(async_cls, name)), name
        assert twin.__doc__ == getattr(async_cls, name).__doc__
