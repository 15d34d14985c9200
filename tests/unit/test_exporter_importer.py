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


def _tar_of(files: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _tokenizer_json() -> bytes:
    from ferry.core.text import TokenizerConfig, fit_tokenizer

    return fit_tokenizer(["the cat sat", "a dog ran"] * 5, TokenizerConfig(vocab_size=60)).to_str().encode()


def test_an_import_with_its_tokenizer_and_labels_takes_text(tmp_path: Path) -> None:
    from tests.support.models import export_bert_shaped

    store = Store(tmp_path / "store")
    model = export_bert_shaped(tmp_path / "bert.onnx").read_bytes()
    files = {"model.onnx": model, "tokenizer.json": _tokenizer_json(), "labels.txt": b"mask\nids\ntypes\n"}
    version, _ = import_onnx(store, "bert", _tar_of(files), 8, '{"text": {"max_length": 32}}')
    folder = store.version_dir("bert", version)
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "tokenizer.json", "labels.txt"}
    text = store.read_config("bert")["text"]
    assert (text["ids"], text["mask"], text["type_ids"], text["max_length"]) == (
        "input_ids",
        "attention_mask",
        "token_type_ids",
        32,
    )


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("corrupt tokenizer", "the uploaded tar's tokenizer.json is not a readable tokenizer"),
        ("labels not UTF-8", "the uploaded tar's labels.txt is not UTF-8"),
        ("a tokenizer for float inputs", "say which input takes the token ids"),
    ],
)
def test_side_files_that_cannot_serve_are_refused_and_nothing_is_published(
    tmp_path: Path, which: str, message: str
) -> None:
    from tests.support.models import export_bert_shaped

    store = Store(tmp_path / "store")
    files = {"model.onnx": export_bert_shaped(tmp_path / "bert.onnx").read_bytes()}
    if which == "corrupt tokenizer":
        files["tokenizer.json"] = b'{"model": 1'
    elif which == "labels not UTF-8":
        files["labels.txt"] = b"ok\n\xff\xfe\n"
    else:
        files = {
            "model.onnx": export_mlp(tmp_path / "m.onnx").read_bytes(),
            "tokenizer.json": _tokenizer_json(),
        }
    with pytest.raises(InvalidArgument, match=message):
        import_onnx(store, "m", _tar_of(files), 8)
    assert store.list_versions("m") == []
