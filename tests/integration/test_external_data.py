"""Models too big for one protobuf, end to end on real processes: an exporter whose external-data
threshold is tiny writes model.onnx + model.onnx.data, ImportOnnx takes a tar of a model and its
data, and one worker on the same store serves both, while every bad external-data location
(absolute, ``..``, a symlink, a missing file, a size mismatch) is INVALID_ARGUMENT on import
and UNAVAILABLE with its reason in RepositoryIndex when found in the store."""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ferry.client.exporter import SyncExporterClient
from ferry.client.inference import SyncInferenceClient
from ferry.core.errors import InvalidArgument
from ferry.core.external_data import DATA_FILE
from ferry.core.store import Store
from services.exporter.source import load_checkpoint
from tests.support.models import export_mlp, ort_run
from tests.support.procs import ServiceProcess
from tests.unit.test_exporter_source import train_job

THRESHOLD = 1000  # bytes: the mlp's 64x32 weights alone are 8 KiB
GOOD_STORE_MODEL = "ext-good"


def until(check: Callable[[], object], deadline_s: float = 60.0, what: str = "condition") -> object:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def externalize(plain: Path, folder: Path) -> Path:
    """``plain`` saved as folder/model.onnx + folder/model.onnx.data, the exporter's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        onnx.load(str(plain)),
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=64,
    )
    return folder / "model.onnx"


def relocate(model_file: Path, location: str) -> None:
    """Point every external tensor of ``model_file`` at ``location`` (offsets kept)."""
    model = onnx.load(str(model_file), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_file.write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_mlp(tmp_path_factory.mktemp("onnx") / "mlp.onnx")


BAD_STORE = {
    # model name: (how its version 1 is broken, how RepositoryIndex's reason must start)
    "ext-absolute": ("absolute", "tensor '0.weight': external data location '{good}' is an absolute path"),
    "ext-dotdot": (
        "dotdot",
        "tensor '0.weight': external data location '../../ext-good/1/model.onnx.data' contains '..'",
    ),
    "ext-symlink": ("symlink", "tensor '0.weight': external data location 'model.onnx.data' is a symlink"),
    "ext-missing": (
        "missing",
        "tensor '0.weight': external data location 'model.onnx.data' names a missing file",
    ),
    "ext-short": (
        "short",  # the last tensor, 2.weight, is the one cut short
        "tensor '2.weight': external data location 'model.onnx.data': size mismatch: it reads bytes",
    ),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, plain: Path) -> Store:
    """A trained mlp job for the exporter, one good external-data version, and one broken
    version per bad case; each broken one points at real weights, so only the check stops it."""
    store = Store(tmp_path_factory.mktemp("store"))
    train_job(store, "job-mlp", "mlp", steps=30)
    good = externalize(plain, store.version_dir(GOOD_STORE_MODEL, 1))
    good_data = good.parent / DATA_FILE
    for name, (case, _) in BAD_STORE.items():
        model = externalize(plain, store.version_dir(name, 1))
        data = model.parent / DATA_FILE
        if case == "absolute":
            data.unlink()
            relocate(model, str(good_data))
        elif case == "dotdot":
            data.unlink()
            relocate(model, f"../../{GOOD_STORE_MODEL}/1/{DATA_FILE}")
        elif case == "symlink":
            data.unlink()
            data.symlink_to(good_data)
        elif case == "missing":
            data.unlink()
        else:
            data.write_bytes(data.read_bytes()[:-8])
    return store


@pytest.fixture(scope="module")
def exporter(store: Store) -> Iterator[SyncExporterClient]:
    proc = ServiceProcess.serve(
        "exporter",
        "--store",
        str(store.root),
        "--port",
        "0",
        "--external-data-threshold-bytes",
        str(THRESHOLD),
    ).start()
    try:
        with SyncExporterClient(proc.address) as client:
            yield client
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def worker(store: Store) -> Iterator[SyncInferenceClient]:
    proc = ServiceProcess.serve(
        "worker",
        "--store",
        str(store.root),
        "--port",
        "0",
        "--poll-interval-s",
        "0.3",
        "--intra-op-threads",
        "1",
    ).start()
    try:
        with SyncInferenceClient(proc.address) as client:
            yield client
    finally:
        proc.stop()


def version_files(store: Store, model: str, version: int) -> set[str]:
    return {p.name for p in store.version_dir(model, version).iterdir()}


def served(worker: SyncInferenceClient, model: str, x: np.ndarray) -> np.ndarray:
    until(lambda: worker.model_ready(model), what=f"{model} ready on the worker")
    return worker.infer(model, {"input": x})["output"]


# --- the exporter writes it, the worker serves it ---------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_export_over_the_threshold_is_published_with_its_data_file_and_served(
    exporter: SyncExporterClient, worker: SyncInferenceClient, store: Store, precision: str
) -> None:
    report = exporter.export("job-mlp", "mlp-ext", precision=precision)
    assert report.published and report.parity_passed, report.failure
    files = report.meta["files"]
    data_bytes = (store.version_dir("mlp-ext", report.version) / DATA_FILE).stat().st_size
    assert files["external_data"] == {DATA_FILE: data_bytes} and data_bytes > THRESHOLD
    graph_only = store.model_file("mlp-ext", report.version).stat().st_size
    assert files["model_bytes"] == graph_only < data_bytes < files["optimized_fp32_bytes"] + 1024
    assert version_files(store, "mlp-ext", report.version) == {
        "model.onnx",
        DATA_FILE,
        "meta.json",
        "labels.txt",
    }
    x = np.random.default_rng(3).random((5, 64), dtype=np.float32)
    module = load_checkpoint(store, "job-mlp").module
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    until(lambda: worker.model_ready("mlp-ext", report.version), what="the exported version ready")
    got = worker.infer("mlp-ext", {"input": x}, version=report.version)["logits"]
    np.testing.assert_allclose(got, expected, atol=1e-4 if precision == "fp32" else 0.05)


# --- bad external data found in the store -----------------------------------------------------


def test_bad_external_data_in_the_store_is_unavailable_with_its_reason_while_others_serve(
    worker: SyncInferenceClient, store: Store, plain: Path
) -> None:
    x = np.random.default_rng(4).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(served(worker, GOOD_STORE_MODEL, x), ort_run(plain, x), atol=1e-5)
    good = str(store.version_dir(GOOD_STORE_MODEL, 1) / DATA_FILE)

    def settled() -> dict[str, object] | None:
        index = {(m.name, m.version): m for m in worker.repository_index()}
        rows = {name: index.get((name, "1")) for name in BAD_STORE}
        return rows if all(r is not None and r.state == "UNAVAILABLE" for r in rows.values()) else None

    rows = until(settled, what="every bad version reported")
    assert isinstance(rows, dict)
    for name, (_, reason) in BAD_STORE.items():
        text = rows[name].reason
        assert text.startswith("failed to load: " + reason.format(good=good)), (name, text)
        assert not worker.model_ready(name)
    assert worker.model_ready(GOOD_STORE_MODEL)  # still serving after all those failures
    np.testing.assert_allclose(served(worker, GOOD_STORE_MODEL, x), ort_run(plain, x), atol=1e-5)


# --- ImportOnnx with external data --------------------------------------------------------------


def tar_of(members: dict[str, bytes | str]) -> bytes:
    """An uncompressed tar: bytes are regular files, a str is a symlink to that target."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return out.getvalue()


@pytest.fixture(scope="module")
def split(plain: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(model.onnx, model.onnx.data) of the plain mlp."""
    model = externalize(plain, tmp_path_factory.mktemp("split"))
    return model.read_bytes(), (model.parent / DATA_FILE).read_bytes()


def relocated(model: bytes, location: str) -> bytes:
    proto = onnx.load_model_from_string(model)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return proto.SerializeToString()


def test_import_a_tar_with_external_data_publishes_both_files_and_serves(
    exporter: SyncExporterClient,
    worker: SyncInferenceClient,
    store: Store,
    split: tuple[bytes, bytes],
    plain: Path,
) -> None:
    model, data = split
    version, meta = exporter.import_onnx("imported-ext", tar_of({"model.onnx": model, DATA_FILE: data}))
    assert version == 1 and meta["files"] == {
        "model_bytes": len(model),
        "external_data": {DATA_FILE: len(data)},
    }
    assert version_files(store, "imported-ext", 1) == {"model.onnx", DATA_FILE, "meta.json"}
    assert (store.version_dir("imported-ext", 1) / DATA_FILE).read_bytes() == data
    # ListVersions counts the graph and its data, not the graph alone
    assert [v["size_bytes"] for v in exporter.list_versions("imported-ext")] == [len(model) + len(data)]
    x = np.random.default_rng(6).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(served(worker, "imported-ext", x), ort_run(plain, x), atol=1e-5)
    # a plain ONNX file (no tar) keeps working as before
    version, meta = exporter.import_onnx("imported-ext", plain.read_bytes())
    assert version == 2 and "external_data" not in meta["files"]


def _bad_imports(split: tuple[bytes, bytes], tmp: Path) -> dict[str, tuple[bytes, str]]:
    model, data = split
    outside = tmp / "outside.data"
    outside.write_bytes(data)
    return {
        "absolute": (
            tar_of({"model.onnx": relocated(model, str(outside)), DATA_FILE: data}),
            f"tensor '0.weight': external data location '{outside}' is an absolute path",
        ),
        "dotdot": (
            tar_of({"model.onnx": relocated(model, f"../{DATA_FILE}"), DATA_FILE: data}),
            f"tensor '0.weight': external data location '../{DATA_FILE}' contains '..'",
        ),
        "symlink member": (
            tar_of({"model.onnx": model, DATA_FILE: str(outside)}),
            f"the uploaded tar's '{DATA_FILE}' is a symlink",
        ),
        "missing": (
            tar_of({"model.onnx": model}),
            f"tensor '0.weight': external data location '{DATA_FILE}' names a missing file",
        ),
        "size mismatch": (
            tar_of({"model.onnx": model, DATA_FILE: data[:-8]}),
            f"tensor '2.weight': external data location '{DATA_FILE}': size mismatch: it reads bytes",
        ),
        "no tar": (model, "names a missing file; a model with external data is uploaded as a tar"),
        "member path escapes": (
            tar_of({"model.onnx": model, f"../{DATA_FILE}": data}),
            f"invalid file name in the uploaded tar (every file is at its top) '../{DATA_FILE}'",
        ),
        "member in a folder": (
            tar_of({"model.onnx": model, f"sub/{DATA_FILE}": data}),
            "invalid file name in the uploaded tar (every file is at its top) 'sub/model.onnx.data'",
        ),
        "unreferenced file": (
            tar_of({"model.onnx": model, DATA_FILE: data, "extra.bin": b"x"}),
            "the uploaded tar holds files no tensor of the model names: ['extra.bin']",
        ),
        "no model": (tar_of({DATA_FILE: data}), "the uploaded tar holds no model.onnx"),
        "meta.json": (
            tar_of({"model.onnx": model, DATA_FILE: data, "meta.json": b"{}"}),
            "meta.json is written by the exporter, not uploaded",
        ),
    }


def test_each_bad_import_is_invalid_argument_and_publishes_nothing(
    exporter: SyncExporterClient, store: Store, split: tuple[bytes, bytes], tmp_path: Path
) -> None:
    for case, (upload, message) in _bad_imports(split, tmp_path).items():
        with pytest.raises(InvalidArgument) as err:
            exporter.import_onnx("bad-import", upload)
        assert message in err.value.message, (case, err.value.message)
    assert "bad-import" not in exporter.list_models()
    assert store.list_versions("bad-import") == []
    folder = store.model_dir("bad-import")
    assert not folder.exists() or not [p for p in os.listdir(folder) if not p.startswith(".lock")]
