"""Dataset uploads: chunks to a temporary file, checked, then renamed into ``datasets/``.

Nothing is kept from an upload that fails: over the size limit (RESOURCE_EXHAUSTED),
a checksum that does not match, or content that is not a usable dataset
(INVALID_ARGUMENT). The stored file is ``datasets/<name>.npz`` or ``.csv``, which a
job names with ``dataset.upload``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from ferry.core.store import Store, validate_name
from ferry.core.uploads import drain
from ferry.datasets import UPLOAD_FORMATS, read_upload


@dataclass
class UploadResult:
    name: str
    size_bytes: int
    sha256: str
    x_shape: list[int] = field(default_factory=list)
    classes: int = 0


async def receive_upload(store: Store, chunks: AsyncIterator[Any], max_bytes: int) -> UploadResult:
    """Consume ``DatasetChunk`` messages and store the dataset they carry."""
    name = fmt = expected = ""
    overwrite = False
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=store.datasets_dir, prefix=".upload-", suffix=".tmp")
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
                out.write(chunk.data)
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
        x, y = read_upload(tmp.read_bytes(), fmt)
        target = store.datasets_dir / f"{name}.{fmt}"
        others = [store.datasets_dir / f"{name}.{f}" for f in UPLOAD_FORMATS]
        if not overwrite and any(p.exists() for p in others):
            raise AlreadyExists(f"dataset {name!r} already exists; upload with overwrite to replace it")
        for p in others:
            if p != target:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        os.replace(tmp, target)
        classes = len(np.unique(y)) if y.dtype.kind in "iu" else 0
        return UploadResult(name, size, actual, list(x.shape), classes)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
