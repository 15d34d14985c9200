from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ferry.core.errors import InvalidArgument, NotFound
from ferry.core.store import Store, validate_name


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "", ".hidden", "x" * 129, "a b", "a\\b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid"):
        validate_name(name)


def test_valid_names() -> None:
    assert validate_name("digits-cnn_v2.1") == "digits-cnn_v2.1"


def leftovers(store: Store, model: str) -> list[str]:
    """Anything in the model folder that is neither a version, the config nor the lock."""
    folder = store.model_dir(model)
    return sorted(
        p.name for p in folder.iterdir() if not p.name.isdigit() and p.name not in (".lock", "config.json")
    )


def test_publish_is_atomic_and_numbered(tmp_path: Path) -> None:
    store = Store(tmp_path)
    source = tmp_path / "built.onnx"
    source.write_bytes(b"one")
    assert store.publish_version("m", {"model.onnx": source}, {"n": 1}, {"max_batch_size": 4}) == 1
    assert store.publish_version("m", {"model.onnx": b"two", "labels.txt": b"a\nb\n"}, {"n": 2}) == 2
    assert store.list_versions("m") == [1, 2]
    assert store.model_file("m", 1).read_bytes() == b"one"
    assert store.model_file("m", 2).read_bytes() == b"two"
    assert (store.version_dir("m", 2) / "labels.txt").read_bytes() == b"a\nb\n"
    assert store.read_meta("m", 1) == {"n": 1} and store.read_meta("m", 2) == {"n": 2}
    assert store.read_config("m") == {"max_batch_size": 4}
    assert leftovers(store, "m") == []
    store.delete_version("m", 1)
    assert store.list_versions("m") == [2]
    with pytest.raises(NotFound, match="no version 1"):
        store.model_file("m", 1)


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    store = Store(tmp_path)
    versions: list[int] = []
    start = threading.Barrier(8)

    def publish(i: int) -> None:
        start.wait()
        versions.append(store.publish_version("m", {"model.onnx": str(i).encode()}, {"i": i}))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 9))
    for v in range(1, 9):  # each version is whole: its own model file with its own meta
        meta = store.read_meta("m", v)
        assert meta is not None and store.model_file("m", v).read_bytes() == str(meta["i"]).encode()
    assert leftovers(store, "m") == []


def test_a_failure_while_staging_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.publish_version("m", {"model.onnx": b"one"}, {}, {"max_batch_size": 4})
    with pytest.raises(FileNotFoundError):
        store.publish_version(
            "m", {"model.onnx": b"two", "labels.txt": tmp_path / "missing.txt"}, {}, {"max_batch_size": 8}
        )
    with pytest.raises(TypeError):  # meta that is not JSON fails after the files are staged
        store.publish_version("m", {"model.onnx": b"three"}, {"bad": object()})
    assert store.list_versions("m") == [1]
    assert store.read_config("m") == {"max_batch_size": 4}  # the config only changes with a version
    assert leftovers(store, "m") == []
    assert store.publish_version("m", {"model.onnx": b"four"}, {}) == 2


def test_publish_checks_its_files(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(InvalidArgument, match=r"needs a model\.onnx"):
        store.publish_version("m", {"labels.txt": b"a\n"}, {})
    with pytest.raises(InvalidArgument, match="invalid file name"):
        store.publish_version("m", {"model.onnx": b"x", "../escape": b"x"}, {})
    with pytest.raises(InvalidArgument, match=r"meta\.json is written from meta"):
        store.publish_version("m", {"model.onnx": b"x", "meta.json": b"{}"}, {})
    with pytest.raises(InvalidArgument, match="invalid model name"):
        store.publish_version("../m", {"model.onnx": b"x"}, {})
    assert not (store.models_dir / "m").exists()
