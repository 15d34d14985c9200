"""The Trainer client: submit, watch, get, list, cancel jobs and upload datasets.

``TrainerClient`` is the one implementation (asyncio); ``SyncTrainerClient`` runs it
on a private loop, with ``watch`` as a plain iterator. Specs may be given as a
``TrainSpec`` or as a plain dict mirroring it, e.g.::

    {"model": {"arch": "mlp", "params": {"hidden": [64]}},
     "dataset": {"name": "digits"}, "epochs": 5, "lr": 1e-3}

A text job's dataset may carry its tokenizer as a dict:
``"dataset": {"name": "topics", "tokenizer": {"kind": "wordpiece", "vocab_size": 2000}}``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from ferry._proto.ferry.v1 import trainer_pb2 as pb
from ferry._proto.ferry.v1 import trainer_pb2_grpc as pb_grpc
from ferry.client._channel import SyncWrapper, blocking, chunked, open_channel, translate, translated, upload
from ferry.core import jobstates
from ferry.core.errors import InvalidArgument
from ferry.core.jobstates import TERMINAL

TERMINAL_STATES = tuple(state.value for state in TERMINAL)
CHUNK_BYTES = 1024 * 1024


def state_name(job: pb.TrainJob) -> str:
    """``"RUNNING"`` rather than ``pb.TRAIN_JOB_STATE_RUNNING``."""
    return jobstates.state_name(job.state)


def build_spec(spec: pb.TrainSpec | Mapping[str, Any]) -> pb.TrainSpec:
    """A ``TrainSpec`` from a dict; model/dataset ``params`` may be dicts (sent as JSON)."""
    if isinstance(spec, pb.TrainSpec):
        return spec
    values = dict(spec)
    model = dict(values.pop("model", {}) or {})
    dataset = dict(values.pop("dataset", {}) or {})
    if "params" in model:
        model["params_json"] = json.dumps(model.pop("params"))
    if "params" in dataset:
        dataset["params_json"] = json.dumps(dataset.pop("params"))
    try:
        if isinstance(dataset.get("tokenizer"), Mapping):
            dataset["tokenizer"] = pb.TrainTokenizer(**dataset["tokenizer"])
        return pb.TrainSpec(model=pb.TrainModel(**model), dataset=pb.TrainDataset(**dataset), **values)
    except (ValueError, TypeError) as err:
        raise InvalidArgument(f"bad training spec: {err}") from err


def _states(states: Any) -> list[int]:
    return [
        pb.TrainJobState.Value(f"TRAIN_JOB_STATE_{s.upper()}") if isinstance(s, str) else s for s in states
    ]


class TrainerClient:
    """Async client of ``ferry.v1.Trainer``."""

    def __init__(self, address: str, **channel_kwargs: Any) -> None:
        self.address = address
        self.channel = open_channel(address, **channel_kwargs)
        self.stub = pb_grpc.TrainerStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> TrainerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @translated
    async def submit(
        self, spec: pb.TrainSpec | Mapping[str, Any], name: str = "", timeout: float | None = 120
    ) -> pb.TrainJob:
        """Queue a job; a spec the trainer refuses raises ``InvalidArgument`` naming the problem."""
        request = pb.TrainSubmitRequest(spec=build_spec(spec), name=name)
        return await self.stub.SubmitJob(request, timeout=timeout)

    @translated
    async def get(self, job_id: str, timeout: float | None = 30) -> pb.TrainJob:
        return await self.stub.GetJob(pb.TrainGetRequest(id=job_id), timeout=timeout)

    @translated
    async def list(
        self, states: Any = (), page_size: int = 0, page_token: str = "", timeout: float | None = 30
    ) -> pb.TrainListResponse:
        request = pb.TrainListRequest(states=_states(states), page_size=page_size, page_token=page_token)
        return await self.stub.ListJobs(request, timeout=timeout)

    @translated
    async def cancel(self, job_id: str, timeout: float | None = 60) -> pb.TrainJob:
        return await self.stub.CancelJob(pb.TrainCancelRequest(id=job_id), timeout=timeout)

    async def watch(self, job_id: str, timeout: float | None = None) -> AsyncIterator[pb.TrainEvent]:
        """The job now, then its events until it ends (the last event holds the final job)."""
        call = self.stub.WatchJob(pb.TrainWatchRequest(id=job_id), timeout=timeout)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as err:
            raise translate(err) from err

    async def wait(self, job_id: str, timeout: float | None = None) -> pb.TrainJob:
        """Follow the job until it ends; returns the final job."""
        job = None
        async for event in self.watch(job_id, timeout=timeout):
            job = event.job
        assert job is not None
        return job

    @translated
    async def upload_dataset(
        self,
        name: str,
        data: bytes | str | Path,
        fmt: str = "",
        *,
        overwrite: bool = False,
        sha256: str = "",
        chunk_bytes: int = CHUNK_BYTES,
        timeout: float | None = 600,
    ) -> pb.DatasetUploadResponse:
        """Upload ``.npz`` (x, y), ``.csv`` (label last, or text with a header) or ``.jsonl`` (text
        and label keys) bytes or a file; checksummed."""
        if isinstance(data, str | Path):
            path = Path(data)
            fmt = fmt or path.suffix.lstrip(".").lower()
            data = path.read_bytes()
        digest = sha256 or hashlib.sha256(data).hexdigest()
        head = pb.DatasetChunk(name=name, format=fmt or "npz", overwrite=overwrite, sha256=digest)
        messages = chunked(head, lambda b: pb.DatasetChunk(data=b), data, chunk_bytes)
        return await upload(self.stub.UploadDataset, messages, timeout)


class SyncTrainerClient(SyncWrapper):
    """Blocking twin of ``TrainerClient``: same methods, and ``watch`` is a plain iterator."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(lambda: TrainerClient(address, **kwargs))

    submit = blocking(TrainerClient.submit)
    get = blocking(TrainerClient.get)
    list = blocking(TrainerClient.list)
    cancel = blocking(TrainerClient.cancel)
    wait = blocking(TrainerClient.wait)
    upload_dataset = blocking(TrainerClient.upload_dataset)

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[pb.TrainEvent]:
        stream = self._client.watch(job_id, timeout=timeout)
        while True:
            try:
                yield self._loop.run(stream.__anext__())
            except StopAsyncIteration:
                return
