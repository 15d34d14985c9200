"""A text model's formed batch becomes the graph's feeds: one tokenizing, padding, truncation rows."""

from __future__ import annotations

from typing import Any

import numpy as np

from ferry.core.modelconfig import spec_from_config
from ferry.core.text import PAD_ID, TextEncoder, TokenizerConfig, fit_tokenizer
from services.inference.textfeeds import TRUNCATED_OUTPUT, TextFeeds, truncated_rows

CORPUS = ["the cat sat on the mat", "dogs run in the park", "running runners ran"] * 10
MAX_LENGTH = 8


def _feeds(**config: Any) -> TextFeeds:
    spec = spec_from_config(
        "m",
        {
            "max_batch_size": 8,
            "input": [{"name": "input", "data_type": "INT64", "dims": [-1]}],
            "output": [{"name": "logits", "data_type": "FP32", "dims": [3]}],
            "text": {"max_length": MAX_LENGTH},
            **config,
        },
    )
    tokenizer = fit_tokenizer(CORPUS, TokenizerConfig(vocab_size=120))
    return TextFeeds(spec, TextEncoder(tokenizer, MAX_LENGTH))


def _texts(*values: str) -> dict[str, np.ndarray]:
    return {"text": np.array(values, dtype=object).reshape(-1, 1)}


def test_a_batch_of_texts_is_padded_to_its_longest_and_cut_rows_are_marked() -> None:
    feeds = _feeds()
    graph, side = feeds(
        _texts("the cat", "dogs run in the park", "running runners ran in the park on the mat")
    )
    ids = graph["input"]
    assert list(graph) == ["input"] and ids.dtype == np.int64 and ids.shape == (3, MAX_LENGTH)
    assert (ids[0] == PAD_ID).sum() > (ids[1] == PAD_ID).sum() >= 0 and (ids[2] != PAD_ID).all()
    assert side[TRUNCATED_OUTPUT].tolist() == [False, False, True]
    alone = feeds(_texts("the cat"))[0]["input"]
    assert ids[0][: alone.shape[1]].tolist() == alone[0].tolist()  # padding only adds [PAD] at the end


def test_buckets_pad_the_batch_past_its_longest() -> None:
    graph, _ = _feeds(sequence_buckets=[4, 16])(_texts("the cat sat", "dogs run"))
    assert graph["input"].shape == (2, 16) and (graph["input"][:, 8:] == PAD_ID).all()


def test_token_ids_pass_through_untouched() -> None:
    ids = {"input": np.array([[2, 7, 3]], dtype=np.int64)}
    graph, side = _feeds()(ids)
    assert graph is ids and side == {}


def test_each_member_takes_its_own_rows_out_of_the_side_output() -> None:
    outputs = {"logits": np.zeros((2, 3), np.float32), TRUNCATED_OUTPUT: np.array([False, True])}
    assert truncated_rows(outputs) == (1,) and list(outputs) == ["logits"]
    assert truncated_rows({"logits": np.zeros((1, 3), np.float32)}) == ()
