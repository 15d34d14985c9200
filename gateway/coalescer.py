"""Batching across the hop: concurrent requests for one model version become one upstream call.

A request is first *prepared*: validated against the model's signature
(``validate_request``) and its tensors' byte sizes checked (the codec), so a bad
request fails alone, before it could spoil a batch. Prepared requests with the
same *merge signature* (inputs' names, datatypes and non-batch dims, requested
outputs, result-changing parameters) are concatenated along the batch axis by
joining their raw bytes, without decoding; raw v2 layout is row-major, so row
blocks of a batch are contiguous (BYTES included: length-prefixed elements).
The answer is split back by rows the same way.

``Batcher`` decides *when*: while fewer than ``concurrency`` batches of its key
are in flight, a batch forms for as long as the event loop has other calls ready
to decode (``ferry.core.forming``) and then goes upstream; otherwise requests
queue and leave together when a slot frees. Light load pays no delay; heavy load
makes batches as large as ``max_rows``, so the worker's per-call cost is shared
by many requests.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core import codec
from ferry.core.errors import Internal
from ferry.core.forming import FormingBatch
from ferry.core.modelconfig import ModelSpec
from ferry.core.textinput import TRUNCATED, TRUNCATED_ROWS, add_truncation, split_truncation
from ferry.core.validation import accept_request
from gateway.cache import NEUTRAL_PARAMETERS, _param_repr


@dataclass
class Prepared:
    """A validated request, its rows and each input's raw bytes (in ``request.inputs`` order)."""

    request: pb.ModelInferRequest
    rows: int
    raw: list[bytes]
    batched: bool  # the model takes a batch axis, so the request may join others

    @cached_property
    def signature(self) -> Hashable | None:
        """What must agree for two requests to merge; None: must travel alone. Worked out only
        for requests that go upstream (a cache hit never needs it)."""
        if not self.batched:
            return None
        request = self.request
        inputs = [(t.name, t.datatype, tuple(t.shape[1:]), _params_key(t.parameters)) for t in request.inputs]
        outputs = [(o.name, _params_key(o.parameters)) for o in request.outputs]
        return (
            tuple(sorted(inputs)) if len(inputs) > 1 else tuple(inputs),
            tuple(sorted(outputs)) if len(outputs) > 1 else tuple(outputs),
            _params_key(request.parameters, NEUTRAL_PARAMETERS),
        )


def _params_key(params: Any, skip: frozenset[str] = frozenset()) -> tuple[tuple[str, str], ...]:
    if not params:  # the common case, and the cheap one to check
        return ()
    return tuple((k, _param_repr(params[k])) for k in sorted(params) if k not in skip)


def prepare(spec: ModelSpec, request: pb.ModelInferRequest) -> Prepared:
    """Validate ``request`` like a worker would and bring its inputs to raw bytes.

    Raises ``InvalidArgument`` with the worker's own messages (same checks, same order).
    """
    rows, arrays = accept_request(spec, request)
    if request.raw_input_contents:
        raw = list(request.raw_input_contents)
    else:
        raw = [codec.raw_bytes(arrays[t.name]) for t in request.inputs]
    return Prepared(request=request, rows=rows, raw=raw, batched=spec.max_batch_size > 0)


def as_raw_request(item: Prepared, version: str) -> pb.ModelInferRequest:
    """The request as it goes upstream alone: raw contents, the resolved version, no ``id``
    (the gateway answers its caller with the caller's own; the answer may be cached for others)."""
    req = pb.ModelInferRequest()
    req.CopyFrom(item.request)
    req.model_version = version
    req.ClearField("id")
    for t in req.inputs:
        t.ClearField("contents")
    del req.raw_input_contents[:]
    req.raw_input_contents.extend(item.raw)
    return req


def merge(items: Sequence[Prepared], version: str) -> pb.ModelInferRequest:
    """One upstream request holding every item's rows, in item order."""
    if len(items) == 1:
        return as_raw_request(items[0], version)
    first = items[0].request
    total = sum(i.rows for i in items)
    merged = pb.ModelInferRequest(model_name=first.model_name, model_version=version)
    for k in first.parameters:
        merged.parameters[k].CopyFrom(first.parameters[k])
    merged.outputs.extend(first.outputs)
    order = [t.name for t in first.inputs]
    positions = [{t.name: n for n, t in enumerate(i.request.inputs)} for i in items]
    for name, tensor in zip(order, first.inputs, strict=True):
        out = merged.inputs.add(name=name, datatype=tensor.datatype, shape=[total, *tensor.shape[1:]])
        for k in tensor.parameters:
            out.parameters[k].CopyFrom(tensor.parameters[k])
        parts = [i.raw[pos[name]] for i, pos in zip(items, positions, strict=True)]
        merged.raw_input_contents.append(b"".join(parts))
    return merged


def _bytes_row_offsets(data: bytes, rows: int, per_row: int) -> list[int]:
    """Byte offsets where each row of a raw BYTES tensor starts (plus the end)."""
    offsets = [0]
    pos = 0
    for _ in range(rows):
        for _ in range(per_row):
            (length,) = struct.unpack_from("<I", data, pos)
            pos += 4 + length
        offsets.append(pos)
    if pos != len(data):
        raise Internal("upstream BYTES output does not split into its rows")
    return offsets


def split(response: pb.ModelInferResponse, rows: Sequence[int]) -> list[pb.ModelInferResponse]:
    """Cut a merged answer back into one answer per item, ``rows[i]`` rows each."""
    if len(rows) == 1:
        return [response]
    total = sum(rows)
    bounds = [0]
    for r in rows:
        bounds.append(bounds[-1] + r)
    outs = [
        pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version)
        for _ in rows
    ]
    for o in outs:
        for k in response.parameters:
            o.parameters[k].CopyFrom(response.parameters[k])
    if TRUNCATED_ROWS in response.parameters:  # rows of the merged batch: each member gets its own
        own = split_truncation(response.parameters[TRUNCATED_ROWS].string_param, bounds)
        for o, rows_cut in zip(outs, own, strict=True):
            del o.parameters[TRUNCATED], o.parameters[TRUNCATED_ROWS]
            add_truncation(o.parameters, rows_cut)
    raw = response.raw_output_contents
    for n, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if not shape or shape[0] != total:
            raise Internal(f"upstream output {tensor.name!r} has shape {shape}, not {total} rows")
        per_row = codec.element_count(shape[1:])
        if raw:
            data = raw[n]
            if tensor.datatype == "BYTES":
                offs = _bytes_row_offsets(data, total, per_row)
                cuts = [offs[b] for b in bounds]
            else:
                size = len(data) // total
                cuts = [b * size for b in bounds]
            pieces: list[Any] = [data[cuts[i] : cuts[i + 1]] for i in range(len(rows))]
        else:
            field_name = codec.CONTENTS_FIELD[tensor.datatype]
            values = list(getattr(tensor.contents, field_name))
            pieces = [values[bounds[i] * per_row : bounds[i + 1] * per_row] for i in range(len(rows))]
        for i, out in enumerate(outs):
            t = out.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=[rows[i], *shape[1:]])
            for k in tensor.parameters:
                t.parameters[k].CopyFrom(tensor.parameters[k])
            if raw:
                out.raw_output_contents.append(pieces[i])
            else:
                getattr(t.contents, field_name).extend(pieces[i])
    return outs


@dataclass
class Pending:
    """One request waiting for a batch; ``future`` gets its answer or its error."""

    item: Prepared
    future: asyncio.Future[Any]
    extra: Any = None


@dataclass
class Batcher:
    """Queues per key; ``dispatch`` receives up to ``max_rows`` rows of one key at a time."""

    dispatch: Callable[[Hashable, list[Pending]], Awaitable[None]]
    max_rows: int = 64
    _queues: dict[Hashable, deque[Pending]] = field(default_factory=dict)
    _running: dict[Hashable, int] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _limits: dict[Hashable, int] = field(default_factory=dict)
    _forming: dict[Hashable, FormingBatch] = field(default_factory=dict)
    _held: set[Hashable] = field(default_factory=set)  # keys with a forming pass scheduled

    async def submit(
        self,
        key: Hashable,
        item: Prepared,
        concurrency: int,
        extra: Any = None,
        max_rows: int | None = None,
    ) -> Any:
        """Queue ``item`` under ``key`` and wait for its answer.

        ``max_rows`` caps this key's batches below the batcher's own cap (the model's
        ``max_batch_size``: a merged batch must still be a request the worker accepts).
        """
        pending = Pending(item, asyncio.get_running_loop().create_future(), extra)
        key = (key, item.signature if item.signature is not None else object())  # None: alone
        if max_rows is not None:
            self._limits[key] = max(1, min(self.max_rows, max_rows))
        self._queues.setdefault(key, deque()).append(pending)
        self._kick(key, max(1, concurrency))
        return await pending.future

    def _take(self, queue: deque[Pending], limit: int) -> list[Pending]:
        batch: list[Pending] = []
        rows = 0
        while queue:
            head = queue[0]
            if head.future.done():  # the caller went away
                queue.popleft()
                continue
            if batch and rows + head.item.rows > limit:
                break
            batch.append(queue.popleft())
            rows += head.item.rows
        return batch

    def _kick(self, key: Hashable, concurrency: int) -> None:
        queue = self._queues.get(key)
        while queue and self._running.get(key, 0) < concurrency:
            limit = self._limits.get(key, self.max_rows)
            full = len(queue) >= limit or sum(p.item.rows for p in queue) >= limit
            forming = self._forming.get(key)
            if forming is None:
                forming = self._forming[key] = FormingBatch(asyncio.get_running_loop())
            if full:
                forming.reset()
            elif key in self._held:
                return  # a forming pass is scheduled; it sends the batch when the loop is idle
            elif forming.wait(len(queue)):
                self._held.add(key)
                asyncio.get_running_loop().call_soon(self._resume, key, concurrency)
                return
            batch = self._take(queue, limit)
            if not batch:
                break
            self._running[key] = self._running.get(key, 0) + 1
            task = asyncio.ensure_future(self._run(key, batch, concurrency))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if queue is not None and not queue and not self._running.get(key):
            self._forget(key)

    async def _run(self, key: Hashable, batch: list[Pending], concurrency: int) -> None:
        try:
            await self.dispatch(key, batch)
        except Exception as err:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
        finally:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(Internal("batch ended without an answer"))
            self._running[key] = self._running.get(key, 1) - 1
            self._kick(key, concurrency)
            if not self._queues.get(key) and not self._running.get(key):
                self._forget(key)

    def _resume(self, key: Hashable, concurrency: int) -> None:
        self._held.discard(key)
        self._kick(key, concurrency)

    def _forget(self, key: Hashable) -> None:
        self._queues.pop(key, None)
        self._running.pop(key, None)
        self._limits.pop(key, None)
        self._forming.pop(key, None)

    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())
