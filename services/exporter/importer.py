"""ImportOnnx: validate an uploaded ONNX file and publish it as the next version of a model.

An imported file has no PyTorch source to compare against, so there is no parity
gate; instead it must pass ``onnx.checker`` (full check), load in ONNX Runtime,
and have a batch dimension (a dynamic first axis) on every input, because the
serving config batches (``max_batch_size`` > 0). Each failure is INVALID_ARGUMENT
with the reason.

A model with external data (over protobuf's 2 GiB, or saved so) comes as an uncompressed tar
in the same stream, so the request and today's clients do not change: ``model.onnx`` and the
files its tensors name, all at the top of the archive, regular files only, at most
``MAX_IMPORT_FILES`` of them (their total is bounded by ``max_import_bytes``, the upload's
limit). Every location is checked (``ferry.core.external_data``: relative, no ``..``, no
symlink, inside the version folder, long enough) before onnx or ONNX Runtime opens it, a file
no tensor names is refused, and nothing is published unless every check passes.

The tar may also carry the files a version serves beside its graph (``SIDE_FILES``):
``tokenizer.json``, which gives the model a raw-text input (``ferry.core.textinput``; the config
gets a ``text`` entry, derived from the graph's inputs unless ``config_json`` gives one), and
``labels.txt`` for the classification extension. Each is read and checked here, so a tokenizer
that cannot be read or a graph that texts cannot feed is refused at import, not at load.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.core import external_data
from ferry.core.classify import LABELS_FILE
from ferry.core.datatypes import BY_ONNX
from ferry.core.errors import InvalidArgument
from ferry.core.modelconfig import ModelSpec, TensorSpec, spec_from_config, spec_to_config
from ferry.core.params import json_object
from ferry.core.store import CONFIG_FILE, META_FILE, MODEL_FILE, Store, validate_name
from ferry.core.text import TOKENIZER_FILE, read_tokenizer

MAX_IMPORT_FILES = 1024  # members of a tar upload, model.onnx included
MAX_LABELS_BYTES = 1 << 20
SIDE_FILES = (TOKENIZER_FILE, LABELS_FILE)
TAR_HINT = "; a model with external data is uploaded as a tar of model.onnx and its data files"


def _tensor(value_info: Any, where: str, batched: bool) -> TensorSpec:
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        raise InvalidArgument(f"{where} {value_info.name!r} is a {kind}, not a tensor")
    tensor = value_info.type.tensor_type
    known = BY_ONNX.get(tensor.elem_type)
    datatype = known.name if known else None
    if datatype is None:
        raise InvalidArgument(
            f"{where} {value_info.name!r} has an unsupported element type {tensor.elem_type}"
        )
    if not tensor.HasField("shape"):
        raise InvalidArgument(f"{where} {value_info.name!r} has no shape; a batch dimension is required")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if batched:
        if not dims:
            raise InvalidArgument(
                f"{where} {value_info.name!r} is a scalar: it lacks a batch dimension (a dynamic first axis)"
            )
        if dims[0] != -1:
            raise InvalidArgument(
                f"{where} {value_info.name!r} lacks a batch dimension: its first axis is fixed at {dims[0]} "
                f"(shape {dims}); export it with a dynamic first axis"
            )
    return TensorSpec(value_info.name, datatype, tuple(dims[1:]) if dims else ())


def _tar(data: bytes) -> tarfile.TarFile | None:
    if len(data) < 512 or data[257:262] != b"ustar":  # the tar magic
        return None
    try:
        return tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError:  # no valid first header: an ONNX file that happens to hold the magic
        return None


def unpack(data: bytes, folder: Path) -> dict[str, Path] | None:
    """The files of a tar upload, written into ``folder``, by name, or None when ``data`` is not
    an uncompressed POSIX (ustar, pax or GNU) tar. INVALID_ARGUMENT for any member that is not a
    regular file at the top of the archive with a store-safe name."""
    archive = _tar(data)
    if archive is None:
        return None
    files: dict[str, Path] = {}
    try:
        with archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if member.isdir() and name.strip("/") in ("", "."):
                    continue  # the archive's own top folder ("tar cf m.tar -C dir .")
                where = f"the uploaded tar's {member.name!r}"
                if len(files) >= MAX_IMPORT_FILES:
                    raise InvalidArgument(f"the uploaded tar holds more than {MAX_IMPORT_FILES} files")
                if member.issym() or member.islnk():
                    raise InvalidArgument(
                        f"{where} is a {'symlink' if member.issym() else 'hard link'}; external data "
                        "must be regular files in the model's folder"
                    )
                if not member.isreg() or member.issparse():
                    raise InvalidArgument(f"{where} is not a regular file")
                validate_name(name, "file name in the uploaded tar (every file is at its top)")
                if name in (META_FILE, CONFIG_FILE):
                    raise InvalidArgument(f"{where}: {name} is written by the exporter, not uploaded")
                if name in files:
                    raise InvalidArgument(f"{where} appears twice")
                source = archive.extractfile(member)
                if source is None:  # cannot happen for a regular member; kept for the type
                    raise InvalidArgument(f"{where} cannot be read")
                with source, open(folder / name, "wb") as out:
                    shutil.copyfileobj(source, out, 1024 * 1024)
                files[name] = folder / name
    except (tarfile.TarError, EOFError) as err:
        raise InvalidArgument(f"the upload is a tar but cannot be read: {err}") from err
    if MODEL_FILE not in files:
        raise InvalidArgument(f"the uploaded tar holds no {MODEL_FILE}; it has {sorted(files)}")
    return files


def inspect_onnx(
    data: bytes, folder: Path | None = None
) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, Any]]:
    """Check an ONNX file; returns its inputs and outputs (dims without batch) and facts for meta.

    ``folder`` holds ``data`` as ``model.onnx`` with its external-data files; without one, a
    model with external data is refused."""
    import onnx

    if not data:
        raise InvalidArgument("no ONNX bytes were uploaded")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf DecodeError and friends
        raise InvalidArgument(f"not a valid ONNX model: cannot parse it ({err})") from err
    refs = external_data.references(data)
    if refs:
        if folder is None:
            raise InvalidArgument(f"{refs[0].where()} cannot be read from the upload alone{TAR_HINT}")
        external_data.check(refs, folder)
    path = str(folder / MODEL_FILE) if refs and folder is not None else None
    try:
        onnx.checker.check_model(path or model, full_check=True)
    except Exception as err:  # ValidationError, InferenceError
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InvalidArgument(f"not a valid ONNX model: {reason}") from err
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in initializers]
    if not graph_inputs or not model.graph.output:
        raise InvalidArgument("not a valid ONNX model: the graph has no inputs or no outputs")
    inputs = [_tensor(v, "input", True) for v in graph_inputs]
    outputs = [_tensor(v, "output", False) for v in model.graph.output]
    try:
        import onnxruntime as ort

        ort.InferenceSession(path or data, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT's own error types
        raise InvalidArgument(f"ONNX Runtime cannot load the model: {err}") from err
    facts = {
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }
    return inputs, outputs, facts


def import_onnx(
    store: Store,
    model_name: str,
    data: bytes,
    max_batch_size: int,
    config_json: str = "",
    source: str = "",
) -> tuple[int, dict[str, Any]]:
    """Validate ``data`` (an ONNX file, or a tar of one with its external data) and publish it as
    the next version of ``model_name``; returns (version, meta)."""
    validate_name(model_name, "model name")
    overrides: dict[str, Any] = {}
    if config_json:
        overrides = json_object(config_json, "config_json")
    with tempfile.TemporaryDirectory(prefix="ferry-import-") as tmp:
        folder = Path(tmp)
        unpacked = unpack(data, folder)
        files: dict[str, Path | bytes] = {MODEL_FILE: data} if unpacked is None else {**unpacked}
        model = data if unpacked is None else unpacked[MODEL_FILE].read_bytes()
        try:
            inputs, outputs, facts = inspect_onnx(model, folder)
        except InvalidArgument as err:
            hint = TAR_HINT if "external data" in err.message and unpacked is None else ""
            raise InvalidArgument(err.message + hint) from err
        external = external_data.check_model(model, folder)
        unreferenced = sorted(set(files) - {MODEL_FILE, *SIDE_FILES} - set(external))
        if unreferenced:
            raise InvalidArgument(
                f"the uploaded tar holds files no tensor of the model names: {unreferenced}"
            )
        outputs = [TensorSpec(t.name, t.datatype, t.dims) for t in outputs]
        spec = ModelSpec(model_name, tuple(inputs), tuple(outputs), max_batch_size=max_batch_size)
        config = {**spec_to_config(spec), **overrides, "name": model_name}
        _check_side_files(folder, files)
        if TOKENIZER_FILE in files:
            config.setdefault("text", {})
        merged = spec_from_config(model_name, config)  # the merged config must still be a valid config
        if merged.text is not None:  # written out whole, so the store says which input takes what
            config["text"] = merged.text.to_config()
        sizes: dict[str, Any] = {"model_bytes": len(model)}
        if external:
            sizes["external_data"] = external
        meta = {
            "format": 1,
            "created_unix_ms": int(time.time() * 1000),
            "source": {"kind": "import", "origin": source, "sha256": hashlib.sha256(data).hexdigest()},
            "precision": "as uploaded",
            "onnx": facts,
            "files": sizes,
            "parity": None,
        }
        version = store.publish_version(model_name, files, meta, config)
    meta["version"] = version
    return version, meta


def _check_side_files(folder: Path, files: dict[str, Path | bytes]) -> None:
    """INVALID_ARGUMENT naming the file when an uploaded tokenizer or labels file cannot serve."""
    if TOKENIZER_FILE in files:
        try:
            read_tokenizer(folder / TOKENIZER_FILE)
        except InvalidArgument as err:
            raise InvalidArgument(f"the uploaded tar's {err.message}") from err
    if LABELS_FILE in files:
        path = folder / LABELS_FILE
        if path.stat().st_size > MAX_LABELS_BYTES:
            raise InvalidArgument(f"the uploaded tar's {LABELS_FILE} is over {MAX_LABELS_BYTES} bytes")
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidArgument(
                f"the uploaded tar's {LABELS_FILE} is not UTF-8 ({err.reason} at byte {err.start})"
            ) from err
