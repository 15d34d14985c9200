"""A factory model kept in a child process: the exporter sends it arrays and gets arrays back.

A factory is code the operator allowed (``--allowed-factories``), but it is still not the
exporter's code, so the exporter never imports it. A child process does: spawned, so it is a
fresh interpreter that shares nothing with the server's threads. It rebuilds the checkpoint,
exports it to ONNX, and computes the reference outputs of the parity gate. A factory that
raises, hangs or exits fails its export, with the reason, and the exporter goes on. Every
answer is bounded by ``timeout_s``. The child dies with the exporter and is killed when the
export ends.

The wire between the two is a ``multiprocessing`` pipe carrying bytes, never pickles: a JSON
header and at most one array in ``.npy`` form (``allow_pickle=False``). What a hostile factory
sends back is data, so it cannot run code in the exporter either.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ferry.core.errors import FailedPrecondition, FerryError, error_for_status
from ferry.core.lifetime import die_with_parent

MAX_MESSAGE_BYTES = 512 * 1024 * 1024


def pack(header: dict[str, Any], array: np.ndarray | None = None) -> bytes:
    """One message: a 4-byte length, the JSON header, then the array as ``.npy`` bytes (or none)."""
    head = json.dumps(header).encode()
    body = io.BytesIO()
    if array is not None:
        np.save(body, np.ascontiguousarray(array), allow_pickle=False)
    return len(head).to_bytes(4, "big") + head + body.getvalue()


def unpack(data: bytes) -> tuple[dict[str, Any], np.ndarray | None]:
    n = int.from_bytes(data[:4], "big")
    header = json.loads(data[4 : 4 + n])
    rest = data[4 + n :]
    array = np.load(io.BytesIO(rest), allow_pickle=False) if rest else None
    if not isinstance(header, dict):
        raise ValueError("a message header must be a JSON object")
    return header, array


class IsolatedModel:
    """Stands in for ``Checkpoint.module`` when the module comes from a factory."""

    def __init__(
        self, store_root: str | Path, job_id: str, tag: str, allowed: Sequence[str], timeout_s: float
    ) -> None:
        self.timeout_s = timeout_s
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(
            target=_serve,
            args=(child, str(store_root), job_id, tag, list(allowed), os.getpid()),
            daemon=True,
            name=f"ferry-export-{job_id}",
        )
        self._proc.start()
        child.close()
        header, _ = self._answer("loading the factory model")
        self.kind = str(header.get("kind", "module"))

    def forward(self, x: np.ndarray, batch: int) -> np.ndarray:
        self._conn.send_bytes(pack({"op": "forward", "batch": batch}, x))
        _, out = self._answer("running the factory model")
        if out is None:
            raise FailedPrecondition("the factory model's process answered no outputs")
        return out

    def to_onnx(
        self, example: np.ndarray, path: Path, opset: int, names: tuple[str, str], axes: dict[int, str]
    ) -> None:
        header = {"op": "onnx", "path": str(path), "opset": opset, "names": list(names), "axes": axes}
        self._conn.send_bytes(pack(header, example))
        self._answer("exporting the factory model")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send_bytes(pack({"op": "close"}))
        self._proc.join(2)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2)
        self._conn.close()

    def _answer(self, doing: str) -> tuple[dict[str, Any], np.ndarray | None]:
        try:
            ready = self._conn.poll(self.timeout_s)
        except (OSError, ValueError):
            ready = False
        if not ready and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2)
            raise FailedPrecondition(
                f"the factory model's process did not answer within {self.timeout_s:g} s ({doing}); "
                "it was killed"
            )
        try:
            header, array = unpack(self._conn.recv_bytes(MAX_MESSAGE_BYTES))
        except (EOFError, OSError) as err:
            self._proc.join(2)
            raise FailedPrecondition(
                f"the factory model's process ended with exit code {self._proc.exitcode} ({doing})"
            ) from err
        except ValueError as err:
            raise FailedPrecondition(
                f"the factory model's process sent a malformed answer ({doing})"
            ) from err
        if "error" in header:
            code = getattr(grpc.StatusCode, str(header["error"]), grpc.StatusCode.FAILED_PRECONDITION)
            raise error_for_status(code, str(header.get("message", "")))
        return header, array

    def __repr__(self) -> str:
        return f"IsolatedModel({self.kind if hasattr(self, 'kind') else '?'}, pid {self._proc.pid})"


def _serve(conn: Any, store_root: str, job_id: str, tag: str, allowed: list[str], parent: int) -> None:
    """The child: load once, then answer requests until told to close or the pipe goes away."""
    die_with_parent(parent)

    def fail(err: BaseException) -> None:
        if isinstance(err, FerryError):
            conn.send_bytes(pack({"error": err.code.name, "message": err.message}))
        else:
            reason = f"the factory model failed: {type(err).__name__}: {err}"
            conn.send_bytes(pack({"error": "FAILED_PRECONDITION", "message": reason}))

    try:
        from ferry.core.store import Store
        from services.exporter.source import load_checkpoint

        module = load_checkpoint(Store(store_root), job_id, tag, allowed).module
        conn.send_bytes(pack({"kind": type(module).__name__}))
    except BaseException as err:  # an import may raise anything, SystemExit included
        fail(err)
        return
    from services.exporter.runtime import torch_outputs, torch_to_onnx

    while True:
        try:
            header, array = unpack(conn.recv_bytes(MAX_MESSAGE_BYTES))
        except (EOFError, OSError, ValueError):
            return
        try:
            if header["op"] == "forward" and array is not None:
                conn.send_bytes(pack({}, torch_outputs(module, array, int(header["batch"]))))
            elif header["op"] == "onnx" and array is not None:
                axes = {int(k): str(v) for k, v in header["axes"].items()}
                names = (str(header["names"][0]), str(header["names"][1]))
                torch_to_onnx(module, array, Path(header["path"]), int(header["opset"]), names, axes)
                conn.send_bytes(pack({}))
            else:
                return
        except BaseException as err:
            fail(err)
