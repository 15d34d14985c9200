"""ImportOnnx validation and export options, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ferry.core.errors import InvalidArgument
from ferry.core.store import Store
from services.exporter.importer import import_onnx, inspect_onnx
from services.exporter.pipeline import resolve_options
from services.exporter.settings import ExporterSettings
from tests.support.models import export_mlp


def _fixed_batch(path: Path) -> bytes:
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(3, 4),), str(path), input_names=["x"], dynamo=False)
    return path.read_bytes()


def test_inspect_derives_signature_without_batch(tmp_path: Path) -> None:
    inputs, outputs, facts = inspect_onnx(export_mlp(tmp_path / "m.onnx", 8, 3).read_bytes())
    assert [(t.name, t.datatype, t.dims) for t in inputs] == [("input", "FP32", (8,))]
    assert [(t.name, t.dims) for t in outputs] == [("output", (3,))]
    assert facts["opsets"]["ai.onnx"] >= 11


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no ONNX bytes were uploaded"),
        (b"\xff\xfe garbage", "not a valid ONNX model"),
        (b"hello world, not onnx", "not a valid ONNX model"),
    ],
)
def test_invalid_files(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        inspect_onnx(data)


def test_input_without_batch_dimension(tmp_path: Path) -> None:
    with pytest.raises(
        InvalidArgument, match=r"input 'x' lacks a batch dimension: its first axis is fixed at 3"
    ):
        inspect_onnx(_fixed_batch(tmp_path / "fixed.onnx"))


def test_import_publishes_and_bad_config_json_publishes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    data = export_mlp(tmp_path / "m.onnx").read_bytes()
    with pytest.raises(InvalidArgument, match="config_json must be a JSON object"):
        import_onnx(store, "m", data, 8, config_json="[1]")
    assert store.list_versions("m") == []
    version, meta = import_onnx(store, "m", data, 8, config_json='{"instance_count": 2}')
    assert version == 1 and meta["source"]["kind"] == "import"
    assert store.read_config("m")["instance_count"] == 2


def test_resolve_options_defaults_and_errors() -> None:
    settings = ExporterSettings()
    opts = resolve_options({"precision": "", "opset": 0}, settings)
    assert (opts.precision, opts.opset, opts.atol, opts.parity_batch) == ("fp32", 17, 1e-4, 32)
    with pytest.raises(InvalidArgument, match="unknown quantization 'weird'"):
        resolve_options({"quantization": "weird"}, settings)
    with pytest.raises(InvalidArgument, match="invalid checkpoint tag"):
        resolve_options({"checkpoint": "../x"}, settings)
