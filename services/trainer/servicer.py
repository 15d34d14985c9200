"""The Trainer gRPC servicer: decode the request, call the job manager, encode the answer.

Only Ferry errors leave it; the shared interceptor maps them to statuses.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from ferry._proto.ferry.v1 import trainer_pb2 as pb
from ferry._proto.ferry.v1 import trainer_pb2_grpc
from ferry.core.errors import InvalidArgument
from ferry.core.guard import caller_name
from ferry.core.params import json_object
from services.trainer.jobs import JobManager
from services.trainer.records import JobRecord, JobState
from services.trainer.spec import normalize_spec
from services.trainer.uploads import receive_upload


def _json_object(text: str, what: str) -> dict[str, Any]:
    return json_object(text, what) if text else {}


def spec_from_proto(spec: pb.TrainSpec) -> dict[str, Any]:
    """The proto spec as a plain dict; unset optional fields stay absent (= default)."""
    raw: dict[str, Any] = {
        "model": {
            "arch": spec.model.arch,
            "factory": spec.model.factory,
            "params": _json_object(spec.model.params_json, "model.params_json"),
        },
        "dataset": {
            "name": spec.dataset.name,
            "upload": spec.dataset.upload,
            "params": _json_object(spec.dataset.params_json, "dataset.params_json"),
        },
    }
    if spec.dataset.HasField("test_fraction"):
        raw["dataset"]["test_fraction"] = spec.dataset.test_fraction
    if spec.dataset.HasField("tokenizer"):  # only the fields set: zero values take the defaults
        tok = spec.dataset.tokenizer
        entry: dict[str, Any] = {"kind": tok.kind} if tok.kind else {}
        if tok.vocab_size:
            entry["vocab_size"] = tok.vocab_size
        if tok.HasField("lowercase"):
            entry["lowercase"] = tok.lowercase
        raw["dataset"]["tokenizer"] = entry
    for key in ("task", "loss", "optimizer", "schedule", "device"):
        raw[key] = getattr(spec, key)
    for key in ("momentum", "weight_decay", "step_size", "warmup_epochs", "epochs", "batch_size"):
        raw[key] = getattr(spec, key)
    for key in ("early_stopping_patience", "early_stopping_min_delta", "grad_clip_norm", "nprocs"):
        raw[key] = getattr(spec, key)
    for key in ("lr", "gamma", "val_fraction", "seed"):
        if spec.HasField(key):
            raw[key] = getattr(spec, key)
    for key in ("epochs", "batch_size", "nprocs", "step_size"):
        if raw[key] < 0:
            raise InvalidArgument(f"{key} must be positive, got {raw[key]}")
    return raw


def job_to_proto(record: JobRecord) -> pb.TrainJob:
    progress = record.progress
    return pb.TrainJob(
        id=record.id,
        name=record.name,
        state=record.state.to_proto(),
        spec_json=json.dumps(record.spec, sort_keys=True),
        progress=pb.TrainProgress(
            epoch=int(progress.epoch),
            epochs=int(progress.epochs),
            step=int(progress.step or 0),
            steps_per_epoch=int(progress.steps_per_epoch or 0),
            loss=float(progress.loss or 0.0),
            samples_per_second=float(progress.samples_per_second or 0.0),
            eta_seconds=float(progress.eta_seconds or 0.0),
            metrics={k: float(v) for k, v in progress.metrics.items()},
        ),
        error=record.error,
        created_ms=record.created_ms,
        started_ms=record.started_ms,
        finished_ms=record.finished_ms,
        checkpoints=record.checkpoints,
        test_metrics={k: float(v) for k, v in record.test_metrics.items()},
        attempts=record.attempts,
        resumed_from=record.resumed_from,
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    """ferry.v1.Trainer over a ``JobManager``."""

    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    async def SubmitJob(
        self, request: pb.TrainSubmitRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainJob:
        if request.name:
            from ferry.core.store import validate_name

            validate_name(request.name, "job name")
        raw = spec_from_proto(request.spec)
        spec = await asyncio.to_thread(normalize_spec, raw, self.manager.store.root, self.manager.limits)
        return job_to_proto(self.manager.submit(spec, request.name, owner=caller_name()))

    async def GetJob(self, request: pb.TrainGetRequest, context: grpc.aio.ServicerContext) -> pb.TrainJob:
        return job_to_proto(self.manager.get(request.id))

    async def ListJobs(
        self, request: pb.TrainListRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainListResponse:
        states = []
        for value in request.states:
            try:
                states.append(JobState.from_proto(value))
            except ValueError as err:
                raise InvalidArgument(f"{err} in the filter") from err
        jobs, token = self.manager.list(states, request.page_size, request.page_token)
        return pb.TrainListResponse(jobs=[job_to_proto(r) for r in jobs], next_page_token=token)

    async def WatchJob(
        self, request: pb.TrainWatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TrainEvent]:
        async for kind, record in self.manager.watch(request.id):
            yield pb.TrainEvent(kind=kind, job=job_to_proto(record))

    async def CancelJob(
        self, request: pb.TrainCancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainJob:
        return job_to_proto(await self.manager.cancel(request.id))

    async def UploadDataset(
        self, request_iterator: AsyncIterator[pb.DatasetChunk], context: grpc.aio.ServicerContext
    ) -> pb.DatasetUploadResponse:
        result = await receive_upload(
            self.manager.store, request_iterator, self.manager.settings.max_upload_bytes
        )
        return pb.DatasetUploadResponse(
            name=result.name,
            size_bytes=result.size_bytes,
            sha256=result.sha256,
            x_shape=result.x_shape,
            classes=result.classes,
        )
