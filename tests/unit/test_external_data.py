"""ferry.core.external_data: the locations it reads agree with onnx's own, and each bad one is
refused naming the tensor. Real models exported by torch and saved by onnx, no mocks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf.message import DecodeError
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from ferry.core import external_data
from ferry.core.errors import InvalidArgument
from ferry.core.external_data import DATA_FILE, ExternalRef
from tests.support.models import export_mlp


def externalize(model: onnx.ModelProto, folder: Path, location: str = DATA_FILE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=64,
    )
    return path


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    """An exported MLP saved as model.onnx + model.onnx.data (three tensors in the data file)."""
    plain = export_mlp(tmp_path / "plain.onnx")
    return externalize(onnx.load(str(plain)), tmp_path / "v1")


def onnx_refs(path: Path) -> list[tuple[str, str, int, int | None]]:
    """What onnx itself says about the model's external tensors."""
    model = onnx.load(str(path), load_external_data=False)
    out = []
    for t in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(t):
            info = external_data_helper.ExternalDataInfo(t)
            out.append((t.name, info.location, info.offset or 0, info.length))
    return out


def rewrite(path: Path, tensor: str, **entries: str) -> None:
    """Change one tensor's external_data entries in place (the data file is left alone)."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if t.name == tensor:
            current = {e.key: e.value for e in t.external_data} | entries
            del t.external_data[:]
            for key, value in current.items():
                t.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())


def test_an_inline_model_has_no_references(tmp_path: Path) -> None:
    data = export_mlp(tmp_path / "m.onnx").read_bytes()
    assert external_data.references(data) == []
    assert external_data.check_model(data, tmp_path) == {}


def test_references_agree_with_onnx_and_the_model_passes(mlp: Path) -> None:
    refs = external_data.references(mlp.read_bytes())
    assert [(r.tensor, r.location, r.offset, r.length) for r in refs] == onnx_refs(mlp)
    assert len(refs) == 3 and all(r.nbytes == r.length for r in refs)
    assert external_data.check_model_file(mlp) == {DATA_FILE: (mlp.parent / DATA_FILE).stat().st_size}
    x = np.ones((2, 8), np.float32)
    assert ort.InferenceSession(str(mlp), providers=["CPUExecutionProvider"]).run(None, {"input": x})


def test_tensors_in_attributes_subgraphs_and_sparse_initializers_are_found(tmp_path: Path) -> None:
    """A Constant's tensor, an If's branch initializer and a sparse initializer's values."""
    big = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "branch_w")
    then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "branch_w"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 8])],
        [big],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 8])],
    )
    const = numpy_helper.from_array(np.ones((4, 4), np.float32), "const_value")
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(3, np.float32), "sparse_values"),
        numpy_helper.from_array(np.array([0, 5, 9], np.int64), "sparse_indices"),
        [10],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=const),
            helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph)
    tensors = [
        model.graph.node[0].attribute[0].t,
        next(a for a in model.graph.node[1].attribute if a.name == "then_branch").g.initializer[0],
        model.graph.sparse_initializer[0].values,
    ]
    for i, tensor in enumerate(tensors):
        external_data_helper.set_external_data(tensor, f"w{i}.bin", offset=8 * i, length=tensor.ByteSize())
        tensor.data_location = TensorProto.EXTERNAL
    refs = external_data.references(model.SerializeToString())
    assert sorted((r.tensor, r.location, r.offset) for r in refs) == [
        ("branch_w", "w1.bin", 8),
        ("const_value", "w0.bin", 0),
        ("sparse_values", "w2.bin", 16),
    ]
    sizes = {r.location: r.nbytes for r in refs}
    assert sizes == {"w0.bin": 64, "w1.bin": 256, "w2.bin": 12}


def test_packed_dims_are_read(tmp_path: Path) -> None:
    """dims written packed (what a proto3 writer emits) mean the same as one varint each."""
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value="w.bin")
    packed = bytes([0x0A, 2, 3, 5])  # field 1, length-delimited: dims 3 and 5
    graph = bytes([0x2A, len(packed) + tensor.ByteSize()]) + packed + tensor.SerializeToString()
    model = bytes([0x3A, len(graph)]) + graph  # ModelProto.graph
    assert list(onnx.load_model_from_string(model).graph.initializer[0].dims) == [3, 5]
    assert external_data.references(model) == [ExternalRef("w", "w.bin", 0, None, 60)]


def test_unknown_groups_are_skipped_as_protobuf_does() -> None:
    """A deprecated group in an unknown field (what an older writer may leave) hides nothing."""
    tensor = TensorProto(name="w", data_type=TensorProto.INT8, dims=[4], data_location=TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value="/etc/hostname")
    graph = bytes([0x2A, tensor.ByteSize()]) + tensor.SerializeToString()
    group = bytes([0x9B, 0x06, 0x08, 0x01, 0x9C, 0x06])  # field 99 start, field 1 = 1, field 99 end
    model = group + bytes([0x3A, len(graph)]) + graph
    assert onnx.load_model_from_string(model).graph.initializer[0].name == "w"
    assert external_data.references(model) == [ExternalRef("w", "/etc/hostname", 0, None, 4)]


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("/etc/hostname", "is an absolute path"),
        ("../v2/model.onnx.data", "contains '..'"),
        ("sub/../model.onnx.data", "contains '..'"),
        ("", "is empty"),
        ("*/_ORT_MEM_ADDR_/*", "is ONNX Runtime's in-memory address tag"),
        ("nothere.data", "names a missing file"),
        ("sub", "is not a regular file"),
        ("model.onnx.data/x", "names a missing file"),
    ],
)
def test_bad_locations_are_refused_naming_the_tensor(mlp: Path, location: str, reason: str) -> None:
    (mlp.parent / "sub").mkdir()
    rewrite(mlp, "0.weight", location=location)
    with pytest.raises(InvalidArgument) as err:
        external_data.check_model_file(mlp)
    assert err.value.message.startswith(f"tensor '0.weight': external data location {location!r} {reason}")


def test_a_symlinked_data_file_is_refused_even_inside_the_folder(mlp: Path) -> None:
    folder = mlp.parent
    os.replace(folder / DATA_FILE, folder / "real.data")
    (folder / DATA_FILE).symlink_to("real.data")
    with pytest.raises(InvalidArgument, match=r"tensor '0.weight': .*'model.onnx.data' is a symlink"):
        external_data.check_model_file(mlp)


def test_a_symlinked_folder_on_the_way_is_refused(mlp: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.replace(mlp.parent / DATA_FILE, outside / DATA_FILE)
    (mlp.parent / "weights").symlink_to(outside)
    for t in ("0.weight", "0.bias", "2.weight"):
        rewrite(mlp, t, location=f"weights/{DATA_FILE}")
    with pytest.raises(InvalidArgument, match=r"'weights/model.onnx.data' is a symlink"):
        external_data.check_model_file(mlp)


def test_a_location_in_a_subfolder_is_fine(mlp: Path) -> None:
    (mlp.parent / "weights").mkdir()
    os.replace(mlp.parent / DATA_FILE, mlp.parent / "weights" / DATA_FILE)
    for t in ("0.weight", "0.bias", "2.weight"):
        rewrite(mlp, t, location=f"weights/{DATA_FILE}")
    assert set(external_data.check_model_file(mlp)) == {f"weights/{DATA_FILE}"}


def test_a_truncated_data_file_is_a_size_mismatch(mlp: Path) -> None:
    data = mlp.parent / DATA_FILE
    data.write_bytes(data.read_bytes()[:600])  # 2.weight is bytes 576 to 768
    with pytest.raises(InvalidArgument) as err:
        external_data.check_model_file(mlp)
    assert err.value.message == (
        "tensor '2.weight': external data location 'model.onnx.data': size mismatch: it reads bytes "
        "576 to 768 but the file has 600 bytes"
    )


def test_a_length_that_is_not_the_tensors_size_is_a_size_mismatch(mlp: Path) -> None:
    rewrite(mlp, "0.weight", length="256")
    with pytest.raises(InvalidArgument, match=r"'0.weight'.*size mismatch: the tensor needs 512 bytes but"):
        external_data.check_model_file(mlp)


def test_an_offset_past_the_end_without_a_length(mlp: Path) -> None:
    model = onnx.load(str(mlp), load_external_data=False)
    tensor = model.graph.initializer[0]
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=DATA_FILE)
    tensor.external_data.add(key="offset", value="5000")
    mlp.write_bytes(model.SerializeToString())
    with pytest.raises(InvalidArgument, match="size mismatch: it reads bytes 5000 to 768"):
        external_data.check_model_file(mlp)


@pytest.mark.parametrize(("key", "value"), [("offset", "-1"), ("length", "12x")])
def test_offsets_and_lengths_must_be_counts(mlp: Path, key: str, value: str) -> None:
    rewrite(mlp, "0.weight", **{key: value})
    with pytest.raises(InvalidArgument, match=f"tensor '0.weight': external data {key} '{value}' is not"):
        external_data.check_model_file(mlp)


@pytest.mark.parametrize("data", [b"\x3a\x10\x2a", b"this is not an onnx file", b"\x3a\xff\xff\xff"])
def test_an_unreadable_protobuf_is_invalid(data: bytes) -> None:
    with pytest.raises(
        external_data.UnreadableModel, match="not a valid ONNX model: cannot read its protobuf"
    ):
        external_data.references(data)
    with pytest.raises(DecodeError):  # protobuf itself refuses the same bytes
        onnx.load_model_from_string(data)


def test_location_problem_is_pure() -> None:
    assert external_data.location_problem("model.onnx.data") is None
    assert external_data.location_problem("weights/a.bin") is None
    assert external_data.location_problem("C:\\weights.bin") == (
        "is an absolute path; it must be relative to the model's folder"
    )
    assert external_data.location_problem("a\x00b") == "contains a NUL byte"
