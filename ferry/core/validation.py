"""The checks every inference request meets against a model's spec, before any batch forms.

The worker and the gateway both run them, so a bad request is refused with the same
message wherever it arrives, and one bad member can never fail a merged batch. Only
metadata is read first (names, datatypes, shapes); byte sizes are checked as tensors
are decoded. Pure.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.codec import FIXED_DTYPES, check_content_form, decode_inputs, utf8_strings
from ferry.core.errors import InvalidArgument
from ferry.core.modelconfig import ModelSpec


def _signature(
    spec: ModelSpec,
) -> tuple[dict[str, tuple[str, tuple[int, ...], bool, np.dtype[Any] | None]], frozenset[str]]:
    """Per spec, computed once: input name -> (datatype, dims, dims fixed?, numpy dtype or None
    for BYTES), and the output names."""
    cached = spec.__dict__.get("_signature")
    if cached is None:
        inputs = {
            t.name: (t.datatype, tuple(t.dims), -1 not in t.dims, FIXED_DTYPES.get(t.datatype))
            for t in spec.inputs
        }
        cached = (inputs, frozenset(spec.output_names()))
        object.__setattr__(spec, "_signature", cached)  # a private cache on a frozen instance
    return cached


def _fast(
    spec: ModelSpec, request: pb.ModelInferRequest, decode: bool
) -> tuple[int, dict[str, np.ndarray | None]] | None:
    """The hot path: a request that passes every check, in one pass over its inputs, as its rows
    and (with ``decode``) its raw inputs as read-only views. None when any check fails, or when
    decoding needs the general codec (typed contents, BYTES): ``validate_request``'s full path
    then decides, and names the problem. It must accept exactly what the full path accepts."""
    inputs = request.inputs
    raw = request.raw_input_contents
    if (decode and not raw) or (raw and len(raw) != len(inputs)):
        return None
    signature, output_names = _signature(spec)
    if len(inputs) != len(signature):
        return None
    max_batch = spec.max_batch_size
    rows = -1
    arrays: dict[str, np.ndarray | None] = {}
    for i, tensor in enumerate(inputs):
        name = tensor.name
        expected = signature.get(name)
        if expected is None or name in arrays:
            return None
        datatype, dims, fixed, dtype = expected
        if tensor.datatype != datatype:
            return None
        shape = tuple(tensor.shape)
        inner = shape
        if max_batch > 0:
            if len(shape) != len(dims) + 1:
                return None
            batch = shape[0]
            if batch <= 0 or batch > max_batch or rows not in (-1, batch):
                return None
            rows = batch
            inner = shape[1:]
        if fixed:
            if inner != dims:
                return None
        elif len(inner) != len(dims) or any(
            got < 0 or (want != -1 and got != want) for got, want in zip(inner, dims, strict=True)
        ):
            return None
        if not decode:
            arrays[name] = None
            continue
        if dtype is None or tensor.HasField("contents") or len(raw[i]) != math.prod(shape) * dtype.itemsize:
            return None
        arrays[name] = np.ndarray(shape, dtype, raw[i])  # a read-only view, no copy
    for out in request.outputs:
        if out.name not in output_names:
            return None
    return max(rows, 1), arrays


def signature_for(spec: ModelSpec, request: pb.ModelInferRequest) -> ModelSpec:
    """The signature ``request`` is checked against: a model that takes text takes either its
    texts alone (``spec.for_text()``) or its token ids, never both."""
    text = spec.text
    if text is None or not any(t.name == text.input for t in request.inputs):
        return spec
    if len(request.inputs) > 1:
        ids = ", ".join(repr(t.name) for t in spec.inputs)
        raise InvalidArgument(
            f"model {spec.name!r}: send the texts ({text.input!r}) alone, or the token ids ({ids}); not both"
        )
    return spec.for_text()


def accept_request(spec: ModelSpec, request: pb.ModelInferRequest) -> tuple[int, dict[str, np.ndarray]]:
    """``validate_request`` and ``decode_inputs`` together: the request's rows and its inputs as
    arrays, or ``InvalidArgument`` naming the first problem. A valid raw request, the hot path,
    is checked and decoded in one pass over its inputs. For a model that takes text, the
    signature is the one ``signature_for`` picks."""
    spec = signature_for(spec, request)
    fast = _fast(spec, request, decode=True)
    if fast is not None:
        return fast[0], cast(dict[str, np.ndarray], fast[1])
    rows = validate_request(spec, request)
    arrays = decode_inputs(request)
    for t in spec.inputs:
        if t.datatype == "BYTES" and t.name in arrays:
            arrays[t.name] = utf8_strings(t.name, arrays[t.name])
    return rows, arrays


def validate_request(spec: ModelSpec, request: pb.ModelInferRequest) -> int:
    """Check a request's inputs and requested outputs against the signature; returns its rows.

    Only metadata is read (names, datatypes, shapes), so this runs before any
    tensor is decoded. Byte sizes are checked by the codec when decoding. A valid
    request takes a fast path; anything it does not accept goes through the full
    checks below, which raise the error naming the problem.
    """
    spec = signature_for(spec, request)
    fast = _fast(spec, request, decode=False)
    if fast is not None:
        return fast[0]
    check_content_form(request)
    seen: set[str] = set()
    rows = -1
    for tensor in request.inputs:
        expected = spec.input(tensor.name)
        if expected is None:
            known = ", ".join(t.name for t in spec.served_inputs())
            raise InvalidArgument(f"model {spec.name!r} has no input {tensor.name!r} (inputs: {known})")
        if tensor.name in seen:
            raise InvalidArgument(f"input {tensor.name!r} appears more than once")
        seen.add(tensor.name)
        if tensor.datatype != expected.datatype:
            hint = (
                f"; send raw texts as input {spec.text.input!r}"
                if spec.text and tensor.datatype == "BYTES"
                else ""
            )
            raise InvalidArgument(
                f"input {tensor.name!r}: datatype {tensor.datatype or '(empty)'} does not match the model's "
                f"{expected.datatype}{hint}"
            )
        shape = list(tensor.shape)
        full = spec.full_shape(expected)
        if len(shape) != len(full):
            raise InvalidArgument(
                f"input {tensor.name!r}: shape {shape} has rank {len(shape)} but the model expects {full}"
            )
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"input {tensor.name!r}: shape {shape} has a negative dimension")
        for got, want in zip(shape[1:] if spec.max_batch_size > 0 else shape, expected.dims, strict=True):
            if want != -1 and got != want:
                raise InvalidArgument(
                    f"input {tensor.name!r}: shape {shape} does not match the model's {full}"
                )
        if spec.max_batch_size > 0:
            batch = shape[0]
            if batch == 0:
                raise InvalidArgument(f"input {tensor.name!r}: empty batch (first dimension is 0)")
            if batch > spec.max_batch_size:
                raise InvalidArgument(
                    f"input {tensor.name!r}: batch size {batch} exceeds the model's max_batch_size "
                    f"{spec.max_batch_size}"
                )
            if rows not in (-1, batch):
                raise InvalidArgument(
                    f"inputs disagree on the batch size ({rows} vs {batch} for {tensor.name!r})"
                )
            rows = batch
    missing = [t.name for t in spec.inputs if t.name not in seen]
    if missing:
        raise InvalidArgument(f"model {spec.name!r}: missing input(s) {', '.join(repr(m) for m in missing)}")
    names = set(spec.output_names())
    for out in request.outputs:
        if out.name not in names:
            raise InvalidArgument(
                f"model {spec.name!r} has no output {out.name!r} (outputs: {', '.join(spec.output_names())})"
            )
    return max(rows, 1)
