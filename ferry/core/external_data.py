"""ONNX external data: where a model's tensors say their bytes live, and whether that is safe.

A model over protobuf's 2 GiB limit keeps its weights outside ``model.onnx``: such a tensor
has ``data_location = EXTERNAL`` and ``external_data`` entries ``location`` (a path relative
to the model file's folder), ``offset`` and ``length`` (bytes into that file). ONNX Runtime
opens whatever the location names, so a model file alone could make it read ``/etc/passwd``,
``../../other-model/weights`` or a symlink's target. Before a model with external data is
loaded anywhere (ImportOnnx, the worker), every location must be

- relative, with no ``..`` anywhere in it, and not ONNX Runtime's in-memory address tag;
- a regular file inside the model's folder, reached through no symlink;
- long enough: ``offset + length`` within the file, and ``length`` equal to the tensor's size
  when its type has a fixed width.

Each failure is INVALID_ARGUMENT naming the tensor and the location.

The locations are read from the serialized model by a small protobuf wire reader (every
tensor: graph initializers, sparse initializers, node attributes, subgraphs, functions and
training graphs), so a worker needs no ``onnx`` package, and the weights stored inline are
skipped over without a copy.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ferry.core.errors import InvalidArgument

DATA_FILE = "model.onnx.data"  # the exporter's one external-data file beside model.onnx
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
ORT_MEMORY_TAG = "_ORT_MEM_ADDR_"  # ONNX Runtime reads "*/_ORT_MEM_ADDR_/*" as a process address
MAX_DEPTH = 64  # nested subgraphs; deeper is refused rather than risk the stack

# Bits per element of each TensorProto.DataType with a fixed width (strings and the 6-bit
# floats, whose packing is not settled, are left out: their size is not checked).
_BITS = {
    1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64,
    14: 64, 15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2, 26: 2,
}  # fmt: skip
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ExternalRef:
    """One tensor's external data, as the model file states it."""

    tensor: str
    location: str
    offset: int
    length: int | None  # None: to the end of the file
    nbytes: int | None  # the size its dims and type imply, when the type has a fixed width

    def where(self) -> str:
        return f"tensor {self.tensor!r}: external data location {self.location!r}"


# --- reading the protobuf ---------------------------------------------------------------------


class UnreadableModel(InvalidArgument):
    """The bytes are not a protobuf at all (ONNX Runtime refuses them too, in its own words)."""


class _Malformed(ValueError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed("varint longer than 10 bytes")


def _field(buf: memoryview, pos: int, depth: int = 0) -> tuple[int, int, int | memoryview, int]:
    """The field at ``pos``: (number, wire type, value, next position). The value is a varint,
    or the bytes of a length-delimited field (a view, not a copy); fixed-width values and
    (deprecated) groups, skipped whole, come back as 0. An end-group comes back as wire type 4."""
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    value: int | memoryview = 0
    if number == 0:
        raise _Malformed("field number 0")
    if wire == 0:
        value, pos = _varint(buf, pos)
    elif wire == 1:
        pos += 8
    elif wire == 2:
        size, pos = _varint(buf, pos)
        value, pos = buf[pos : pos + size], pos + size
    elif wire == 3:  # a group: its fields up to the matching end-group
        if depth > MAX_DEPTH:
            raise _Malformed(f"groups nested deeper than {MAX_DEPTH}")
        while True:
            inner, inner_wire, _, pos = _field(buf, pos, depth + 1)
            if inner_wire == 4:
                if inner != number:
                    raise _Malformed(f"group {number} ended by {inner}")
                break
    elif wire == 5:
        pos += 4
    elif wire != 4:
        raise _Malformed(f"invalid wire type {wire} in field {number}")
    if pos > len(buf):
        raise _Malformed("truncated message")
    return number, wire, value, pos


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of one message, in order."""
    pos = 0
    while pos < len(buf):
        number, wire, value, pos = _field(buf, pos)
        if wire == 4:
            raise _Malformed(f"end of group {number} outside any group")
        yield number, wire, value


def _messages(buf: memoryview, *numbers: int) -> Iterator[tuple[int, memoryview]]:
    for number, wire, value in _fields(buf):
        if number in numbers and wire == 2 and isinstance(value, memoryview):
            yield number, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _tensor(buf: memoryview) -> ExternalRef | None:
    """The external data of one TensorProto, or None when its data is inline."""
    dims: list[int] = []
    name, data_type, location_kind = "", 0, 0
    entries: dict[str, str] = {}
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0 and isinstance(value, int):
            dims.append(_signed(value))
        elif number == 1 and wire == 2 and isinstance(value, memoryview):  # packed dims
            pos = 0
            while pos < len(value):
                dim, pos = _varint(value, pos)
                dims.append(_signed(dim))
        elif number == 2 and isinstance(value, int):
            data_type = value
        elif number == 8 and isinstance(value, memoryview):
            name = bytes(value).decode("utf-8", "replace")
        elif number == 13 and isinstance(value, memoryview):
            key = val = ""
            for n, _, v in _fields(value):
                if n in (1, 2) and isinstance(v, memoryview):
                    text = bytes(v).decode("utf-8", "replace")
                    key, val = (text, val) if n == 1 else (key, text)
            entries[key] = val
        elif number == 14 and isinstance(value, int):
            location_kind = value
    if location_kind != EXTERNAL:
        return None
    where = f"tensor {name!r}"
    location = entries.get("location", "")
    offset = _count(entries.get("offset", "0"), where, "offset")
    length = _count(entries["length"], where, "length") if "length" in entries else None
    bits = _BITS.get(data_type)
    nbytes = None
    if bits is not None and all(d >= 0 for d in dims):
        nbytes = -(-math.prod(dims) * bits // 8)
    return ExternalRef(name, location, offset, length, nbytes)


def _count(text: str, where: str, key: str) -> int:
    if not text.isdigit():
        raise InvalidArgument(f"{where}: external data {key} {text!r} is not a non-negative integer")
    return int(text)


def _attribute(buf: memoryview, depth: int) -> Iterator[ExternalRef]:
    for number, value in _messages(buf, 5, 6, 10, 11, 22, 23):
        if number in (5, 10):
            yield from _one(_tensor(value))
        elif number in (6, 11):
            yield from _graph(value, depth + 1)
        else:
            yield from _sparse(value)


def _sparse(buf: memoryview) -> Iterator[ExternalRef]:
    for _, value in _messages(buf, 1, 2):
        yield from _one(_tensor(value))


def _one(ref: ExternalRef | None) -> Iterator[ExternalRef]:
    if ref is not None:
        yield ref


def _nodes(buf: memoryview, field: int, depth: int) -> Iterator[ExternalRef]:
    for _, node in _messages(buf, field):
        for _, attribute in _messages(node, 5):
            yield from _attribute(attribute, depth)


def _graph(buf: memoryview, depth: int) -> Iterator[ExternalRef]:
    if depth > MAX_DEPTH:
        raise _Malformed(f"subgraphs nested deeper than {MAX_DEPTH}")
    for number, value in _messages(buf, 5, 15):
        if number == 5:  # initializer
            yield from _one(_tensor(value))
        else:  # sparse_initializer
            yield from _sparse(value)
    yield from _nodes(buf, 1, depth)


def references(model: bytes | memoryview) -> list[ExternalRef]:
    """Every tensor of a serialized ModelProto whose data is external, in file order."""
    buf = memoryview(model)
    refs: list[ExternalRef] = []
    try:
        for number, value in _messages(buf, 7, 20, 25):
            if number == 7:  # graph
                refs.extend(_graph(value, 0))
            elif number == 20:  # training_info: initialization and algorithm graphs
                for _, graph in _messages(value, 1, 2):
                    refs.extend(_graph(graph, 0))
            else:  # functions: their nodes and their attributes' defaults
                refs.extend(_nodes(value, 7, 0))
                for _, attribute in _messages(value, 11):
                    refs.extend(_attribute(attribute, 0))
    except _Malformed as err:
        raise UnreadableModel(f"not a valid ONNX model: cannot read its protobuf ({err})") from err
    return refs


# --- checking the locations -------------------------------------------------------------------


def location_problem(location: str) -> str | None:
    """Why a location is refused before the file system is asked, or None."""
    if not location:
        return "is empty"
    if "\x00" in location:
        return "contains a NUL byte"
    if ORT_MEMORY_TAG in location:
        return "is ONNX Runtime's in-memory address tag, which reads process memory"
    if location.startswith(("/", "\\")) or _DRIVE.match(location) or os.path.isabs(location):
        return "is an absolute path; it must be relative to the model's folder"
    if ".." in location:
        return "contains '..'; it must stay inside the model's folder"
    return None


def resolve(location: str, folder: Path) -> Path:
    """The file a (syntactically fine) location names inside ``folder``, reached through no
    symlink; raises ValueError with the reason otherwise."""
    root = folder.resolve()
    current = root
    parts = [p for p in re.split(r"[/\\]", location) if p not in ("", ".")]
    if not parts:
        raise ValueError("names the model's folder, not a file")
    for i, part in enumerate(parts):
        current = current / part
        try:
            info = current.lstat()
        except FileNotFoundError:
            raise ValueError("names a missing file") from None
        except OSError as err:
            raise ValueError(f"cannot be read ({err.strerror})") from None
        if stat.S_ISLNK(info.st_mode):
            raise ValueError("is a symlink; external data must be a regular file in the model's folder")
        last = i == len(parts) - 1
        if last and not stat.S_ISREG(info.st_mode):
            raise ValueError("is not a regular file")
        if not last and not stat.S_ISDIR(info.st_mode):
            raise ValueError("names a missing file")
    if not current.resolve().is_relative_to(root):  # cannot happen without a symlink; kept as a guard
        raise ValueError("resolves outside the model's folder")
    return current


def check(refs: list[ExternalRef], folder: Path) -> dict[str, int]:
    """Check every reference against ``folder`` (the model file's folder); returns the size of
    each file referenced, by location. Raises InvalidArgument naming the first bad tensor."""
    sizes: dict[str, int] = {}
    for ref in refs:
        problem = location_problem(ref.location)
        if problem:
            raise InvalidArgument(f"{ref.where()} {problem}")
        if ref.location not in sizes:
            try:
                sizes[ref.location] = resolve(ref.location, folder).stat().st_size
            except ValueError as err:
                raise InvalidArgument(f"{ref.where()} {err}") from None
        size = sizes[ref.location]
        end = size if ref.length is None else ref.offset + ref.length
        if ref.offset > size or end > size:
            raise InvalidArgument(
                f"{ref.where()}: size mismatch: it reads bytes {ref.offset} to {end} but the file has "
                f"{size} bytes"
            )
        length = end - ref.offset
        if ref.nbytes is not None and length != ref.nbytes:
            raise InvalidArgument(
                f"{ref.where()}: size mismatch: the tensor needs {ref.nbytes} bytes but its external "
                f"data is {length} bytes"
            )
    return sizes


def check_model(model: bytes | memoryview, folder: Path) -> dict[str, int]:
    """``check(references(model), folder)``: the external-data files of a serialized model (empty
    when all its data is inline), each checked."""
    return check(references(model), folder)


def check_model_file(path: Path) -> dict[str, int]:
    """The same for a model file, against its own folder."""
    return check_model(Path(path).read_bytes(), Path(path).parent)
