"""Triton's classification strings, from scores, without a server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.classify import class_counts, read_labels, top_k, write_labels
from ferry.core.errors import InvalidArgument


def test_top_k_strings_best_first_with_and_without_labels() -> None:
    scores = np.array([[0.1, 2.5, -1.0], [3.0, 3.0, 0.5]], np.float32)
    out = top_k("logits", scores, 2, ("cat", "dog", "bird"))
    assert out.shape == (2, 2) and out.dtype == object
    assert out.tolist() == [[b"2.500000:1:dog", b"0.100000:0:cat"], [b"3.000000:0:cat", b"3.000000:1:dog"]]
    assert top_k("logits", scores[0], 1).tolist() == [b"2.500000:1"]  # no batch axis, no labels


def test_labels_shorter_than_the_classes_leave_the_rest_unlabelled() -> None:
    assert top_k("x", np.array([[0.0, 1.0]]), 2, ("only",)).tolist() == [[b"1.000000:1", b"0.000000:0:only"]]


def _request(**counts: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, value in counts.items():
        out = request.outputs.add(name=name)
        if isinstance(value, int):
            out.parameters["classification"].int64_param = value
        elif isinstance(value, str):
            out.parameters["classification"].string_param = value
    return request


def test_class_counts_read_the_classification_parameter() -> None:
    assert class_counts(_request(a=3, b=None)) == {"a": 3}
    with pytest.raises(InvalidArgument, match="output 'a': class_count must be at least 1, got 0"):
        class_counts(_request(a=0))
    with pytest.raises(InvalidArgument, match="got -2"):
        class_counts(_request(a=-2))
    with pytest.raises(InvalidArgument, match="must be an integer"):
        class_counts(_request(a="three"))


def test_more_classes_than_there_are_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="output 'logits': class_count 4 is more than its 3 classes"):
        top_k("logits", np.zeros((1, 3), np.float32), 4)


def test_labels_file(tmp_path: Path) -> None:
    assert read_labels(tmp_path) == ()
    (tmp_path / "labels.txt").write_text("zero\r\none\n\ntwo\n", encoding="utf-8")
    assert read_labels(tmp_path) == ("zero", "one", "two")


def test_a_versions_labels_win_over_the_models(tmp_path: Path) -> None:
    version = tmp_path / "3"
    version.mkdir()
    write_labels(tmp_path, ["cat", "dog"])
    assert read_labels(version, tmp_path) == ("cat", "dog")  # the version has none: the model's
    write_labels(version, ["setosa", "two\nlines", ""])
    assert (version / "labels.txt").read_text(encoding="utf-8") == "setosa\ntwo lines\n2\n"
    assert read_labels(version, tmp_path) == ("setosa", "two lines", "2")
