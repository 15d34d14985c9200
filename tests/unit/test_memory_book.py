"""The worker's memory book without a server: booking, the budget, who is evicted."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.core.errors import ResourceExhausted
from services.inference.memory import MemoryBook, version_bytes


def test_a_version_is_booked_at_its_weight_files_per_instance(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x" * 100)
    (tmp_path / "model.onnx.data").write_bytes(b"x" * 900)
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    assert version_bytes(tmp_path, 1) == 1000 and version_bytes(tmp_path, 3) == 3000
    # an imported model's data files have the names its tensors give them, in subfolders too
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "embedding.bin").write_bytes(b"x" * 24)
    (tmp_path / "weights" / "tokenizer.json").write_bytes(b"x" * 6)  # a sidecar only at the top
    assert version_bytes(tmp_path, 1) == 1030


def test_a_tokenizer_is_booked_once_from_the_version_or_its_model(tmp_path: Path) -> None:
    version = tmp_path / "1"
    version.mkdir()
    (version / "model.onnx").write_bytes(b"x" * 100)
    (tmp_path / "tokenizer.json").write_bytes(b"t" * 40)  # the model's, shared by its versions
    assert version_bytes(version, 2) == 240
    (version / "tokenizer.json").write_bytes(b"t" * 7)  # the version's own comes first
    assert version_bytes(version, 2) == 207


def test_without_a_budget_anything_loads() -> None:
    book = MemoryBook()
    book.book("a", 1, 10**12)
    assert book.make_room("b", 1, 10**12, 0.0) == []


def test_over_the_budget_is_refused_naming_it() -> None:
    book = MemoryBook(budget=1000)
    book.book("a", 1, 600)
    assert book.make_room("b", 1, 400, 0.0) == []
    with pytest.raises(
        ResourceExhausted, match="needs about 401 bytes, and 600 of the worker's memory budget of 1000"
    ):
        book.make_room("b", 1, 401, 0.0)
    with pytest.raises(ResourceExhausted, match="more than the worker's whole memory budget of 1000 bytes"):
        book.make_room("b", 1, 1001, 0.0)


def test_reloading_a_booked_version_counts_it_once() -> None:
    book = MemoryBook(budget=1000)
    book.book("a", 1, 900)
    assert book.make_room("a", 1, 900, 0.0) == []


def test_eviction_takes_the_least_recently_used_models_first() -> None:
    book = MemoryBook(budget=1000, evict=True)
    for name in ("a", "b", "c"):
        book.book(name, 1, 300)
    book.used("a", 5.0)
    book.used("b", 1.0)
    book.used("c", 3.0)
    assert book.make_room("d", 1, 300, 6.0) == ["b"]
    assert book.make_room("d", 1, 650, 6.0) == ["b", "c"]
    book.book("d", 1, 200)  # d's other version stays: only other models are evicted
    with pytest.raises(ResourceExhausted, match="even with every other model evicted, 200 bytes"):
        book.make_room("d", 2, 900, 6.0)
    book.release("a", 1)
    assert book.of("a", 1) is None and book.total() == 800
