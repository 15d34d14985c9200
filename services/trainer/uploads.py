"""Dataset uploads: chunks to a temporary file, checked, then renamed into ``datasets/``.

Nothing is kept from an upload that fails: over the size limit (RESOURCE_EXHAUSTED),
a checksum that does not match, or content that is not a usable dataset
(INVALID_ARGUMENT), or a disk that fills up on the way (RESOURCE_EXHAUSTED, "the store at
... is full"). The stored file is ``datasets/<name>.npz``, ``.csv`` or ``.jsonl``, which a job
names with ``dataset.upload``; a text upload (``.jsonl``, or a ``.csv`` with a header and a
column of texts) is checked in full when it has the default columns ``text`` and ``label``, for
form only when it has others (a job names them in its dataset params). It appears in one rename of the fsynced
temporary; the temporary (``.upload-*.tmp``) is flocked while it is written, so the next
upload removes the ones a killed trainer left, and only those.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import AlreadyExists, InvalidArgument, ResourceExhausted, store_full
from ferry.core.store import Store, fsync_dir, validate_name
from ferry.core.uploads import drain
from ferry.datasets import UPLOAD_FORMATS, check_text_upload, read_upload


@dataclass
class UploadResult:
    name: str
    size_bytes: int
    sha256: str
    x_shape: list[int] = field(default_factory=list)
    classes: int = 0


TMP_PREFIX = ".upload-"


def _sweep(folder: Path) -> None:
    """Remove the temporaries of uploads that died with their trainer (no lock held on them)."""
    for p in folder.glob(f"{TMP_PREFIX}*.tmp"):
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # an upload in progress
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


async def receive_upload(store: Store, chunks: AsyncIterator[Any], max_bytes: int) -> UploadResult:
    """Consume ``DatasetChunk`` messages and store the dataset they carry."""
    name = fmt = expected = ""
    overwrite = False
    digest = hashlib.sha256()
    size = 0
    _sweep(store.datasets_dir)
    fd, tmp_name = tempfile.mkstemp(dir=store.datasets_dir, prefix=TMP_PREFIX, suffix=".tmp")
    fcntl.flock(fd, fcntl.LOCK_EX)  # no await since mkstemp: a sweep never sees it unlocked
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                if not name and chunk.name:
                    name, fmt, overwrite = chunk.name, chunk.format or "npz", chunk.overwrite
                    validate_name(name, "dataset name")
                    if fmt not in UPLOAD_FORMATS:
                        raise InvalidArgument(
                            f"unknown dataset format {fmt!r}; use one of {', '.join(UPLOAD_FORMATS)}"
                        )
                if chunk.sha256:
                    expected = chunk.sha256.lower()
                size += len(chunk.data)
                if size > max_bytes:
                    await drain(chunks, size, max_bytes)
                    raise ResourceExhausted(
                        f"dataset upload exceeds the size limit of {max_bytes} bytes; nothing was kept"
                    )
                digest.update(chunk.data)
                try:
                    out.write(chunk.data)
                except OSError as err:
                    if (full := store_full(err, store.root)) is None:
                        raise
                    await drain(chunks, size, max_bytes)
                    raise full from err
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as err:  # buffered data meets the full disk here
                if (full := store_full(err, store.root)) is None:
                    raise
                raise full from err
        if not name:
            raise InvalidArgument("the upload named no dataset (set name in the first chunk)")
        actual = digest.hexdigest()
        if not expected:
            raise InvalidArgument("the upload carried no sha256 checksum; nothing was kept")
        if expected != actual:
            raise InvalidArgument(
                f"checksum mismatch for dataset {name!r}: sent sha256 {expected}, received data has "
                f"{actual}; nothing was kept"
            )
        data = tmp.read_bytes()
        text = check_text_upload(data, fmt) if fmt in ("jsonl", "csv") else None
        if text is not None:
            x_shape, classes = [text[0]], text[1]
        else:
            x, y = read_upload(data, fmt)
            x_shape, classes = list(x.shape), len(np.unique(y)) if y.dtype.kind in "iu" else 0
        target = store.datasets_dir / f"{name}.{fmt}"
        others = [store.datasets_dir / f"{name}.{f}" for f in UPLOAD_FORMATS]
        if not overwrite and any(p.exists() for p in others):
            raise AlreadyExists(f"dataset {name!r} already exists; upload with overwrite to replace it")
        for p in others:
            if p != target:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        os.replace(tmp, target)
        fsync_dir(store.datasets_dir)
        return UploadResult(name, size, actual, x_shape, classes)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
