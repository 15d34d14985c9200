"""ferry.datasets: the same entry gives the same arrays in any process; bad entries say what is wrong."""

from __future__ import annotations

import io

import numpy as np
import pytest

from ferry.core.errors import InvalidArgument
from ferry.datasets import load_dataset, read_upload


def test_same_entry_same_arrays_and_a_disjoint_test_split() -> None:
    a = load_dataset({"name": "wine", "seed": 4})
    b = load_dataset({"name": "wine"}, seed=4)
    c = load_dataset({"name": "wine", "seed": 5})
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_test, c.x_test)
    assert len(a.x_test) == round(178 * 0.2) and len(a.x_train) + len(a.x_test) == 178
    assert (a.task, a.classes, a.outputs, a.datatype, a.feature_shape) == (
        "classification",
        3,
        3,
        "FP32",
        [13],
    )
    # Standardised with the train split's statistics.
    assert np.allclose(a.x_train.mean(axis=0), 0, atol=1e-5)


def test_digits_are_images_unless_flattened() -> None:
    images = load_dataset({"name": "digits"})
    flat = load_dataset({"name": "digits", "params": {"flatten": True}})
    assert images.feature_shape == [1, 8, 8] and flat.feature_shape == [64]
    assert images.x_train.max() <= 1.0 and images.classes == 10
    assert np.array_equal(images.x_test.reshape(len(images.x_test), -1), flat.x_test)


def test_synthetic_tokens_are_learnable_ids() -> None:
    data = load_dataset({"name": "synthetic_tokens", "params": {"vocab": 40, "classes": 3, "seq_len": 12}})
    assert data.datatype == "INT64" and data.input_shape == [-1] and data.vocab_size == 40
    assert data.x_train.shape[1:] == (12,) and data.x_train.min() >= 1 and data.x_train.max() < 40
    # Each class's band of the vocabulary dominates its sequences.
    band = 39 // 3
    votes = np.stack([((data.x_test - 1) // band == c).sum(1) for c in range(3)], 1).argmax(1)
    assert np.mean(votes == data.y_test) > 0.85


def test_synthetic_regression_has_float_targets() -> None:
    data = load_dataset({"name": "synthetic_regression", "params": {"targets": 2, "features": 3}})
    assert (data.task, data.classes, data.outputs) == ("regression", 0, 2)
    assert data.y_train.dtype == np.float32 and data.y_train.shape[1:] == (2,)


def test_bad_entries() -> None:
    with pytest.raises(InvalidArgument, match=r"^unknown dataset 'mnist'; built-in: digits, iris, wine"):
        load_dataset({"name": "mnist"})
    with pytest.raises(InvalidArgument, match=r"^test_fraction must lie strictly between 0 and 1, got 1.0$"):
        load_dataset({"name": "iris", "test_fraction": 1.0})
    with pytest.raises(InvalidArgument, match=r"^dataset param 'samples' must be an integer in \[10, "):
        load_dataset({"name": "synthetic_tokens", "params": {"samples": 3}})


def test_uploaded_files(tmp_path: object) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.ones((4, 2)), y=np.array([0, 1, 0, 1]))
    x, y = read_upload(buf.getvalue(), "npz")
    assert x.shape == (4, 2) and y.tolist() == [0, 1, 0, 1]
    x, y = read_upload(b"f1,f2,label\n1,2,0\n3,4,1\n5,6,1\n", "csv")
    assert x.tolist() == [[1, 2], [3, 4], [5, 6]] and y.dtype == np.int64
    with pytest.raises(
        InvalidArgument, match=r"^npz dataset must hold arrays 'x' and 'y', it holds \['a'\]$"
    ):
        buf = io.BytesIO()
        np.savez(buf, a=np.ones(3))
        read_upload(buf.getvalue(), "npz")
    with pytest.raises(InvalidArgument, match=r"^not a readable npz file"):
        read_upload(b"garbage", "npz")
    with pytest.raises(InvalidArgument, match=r"^CSV dataset must be numeric with the label last"):
        read_upload(b"1,2,0\n3,x,1\n", "csv")


def test_uploaded_dataset_from_the_store(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    (root / "datasets").mkdir()
    rng = np.random.default_rng(0)
    np.savez(root / "datasets" / "mine.npz", x=rng.normal(size=(30, 3)), y=np.arange(30) % 3 + 5)
    data = load_dataset({"upload": "mine", "seed": 1}, store=root)
    assert data.name == "upload:mine" and data.classes == 3 and set(data.y_train) <= {0, 1, 2}
    assert data.class_names == ["5", "6", "7"]  # class index -> the label value as uploaded
    with pytest.raises(InvalidArgument, match=r"^unknown uploaded dataset 'other'"):
        load_dataset({"upload": "other"}, store=root)


def test_class_names_come_from_the_source() -> None:
    assert load_dataset({"name": "iris"}).class_names == ["setosa", "versicolor", "virginica"]
    assert load_dataset({"name": "digits"}).class_names == [str(d) for d in range(10)]
    assert load_dataset({"name": "synthetic_classification"}).class_names == []  # unnamed classes
    assert load_dataset({"name": "synthetic_regression"}).class_names == []
