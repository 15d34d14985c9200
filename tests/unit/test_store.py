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


def stage(store: Store, model: str, payload: bytes) -> Path:
    folder = store.staging_dir(model)
    (folder / "model.onnx").write_bytes(payload)
    return folder


def test_publish_is_atomic_and_numbered(tmp_path: Path) -> None:
    store = Store(tmp_path)
    staged = stage(store, "m", b"one")
    assert store.list_versions("m") == []  # staging folders are never versions
    assert store.publish_version("m", staged, {"max_batch_size": 4}) == 1
    assert store.publish_version("m", stage(store, "m", b"two")) == 2
    assert store.list_versions("m") == [1, 2]
    assert store.model_file("m", 2).read_bytes() == b"two"
    assert store.read_config("m") == {"max_batch_size": 4}
    store.delete_version("m", 1)
    assert store.list_versions("m") == [2]
    with pytest.raises(NotFound, match="no version 1"):
        store.model_file("m", 1)


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    store = Store(tmp_path)
    staged = [stage(store, "m", str(i).encode()) for i in range(8)]
    versions: list[int] = []
    threads = [
        threading.Thread(target=lambda s=s: versions.append(store.publish_version("m", s))) for s in staged
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 9))


def test_publish_needs_a_model_file(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(InvalidArgument, match=r"holds no model\.onnx"):
        store.publish_version("m", store.staging_dir("m"))
