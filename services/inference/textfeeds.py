"""Raw texts become a graph's inputs once per formed batch, not once per request.

The batcher hands a text model's formed batch here on its runner thread. Concurrent requests
of one text each are thus tokenized in one ``encode_batch`` call: the tokenizer spreads it over
its own threads with the GIL released, and the event loop only decodes and queues. The batch
is then padded to its ``sequence_buckets`` size like token ids are, so requests of any length
share the run. Which rows were cut to ``max_length`` travels back as a per-row side output, so
the batcher splits it with the logits and each request reports its own rows.

A request that sends token ids to the same version passes through untouched.
"""

from __future__ import annotations

import numpy as np

from ferry.core.buckets import pad_to_bucket
from ferry.core.modelconfig import ModelSpec
from ferry.core.text import Encoded, TextEncoder
from ferry.core.textinput import TextInput

TRUNCATED_OUTPUT = "\0truncated"  # a side output; no graph output: ONNX Runtime names end at NUL


def graph_feeds(spec: ModelSpec, text: TextInput, encoded: Encoded) -> dict[str, np.ndarray]:
    """The encoded texts as the graph's inputs, in the integer type each one takes."""
    feeds = {}
    for name, values in (
        (text.ids, encoded.ids),
        (text.mask, encoded.mask),
        (text.type_ids, encoded.type_ids),
    ):
        if name:
            tensor = spec.input(name)
            feeds[name] = values.astype(np.int32) if tensor and tensor.datatype == "INT32" else values
    return feeds


class TextFeeds:
    """The batcher's ``prepare`` step for one text model version."""

    def __init__(self, spec: ModelSpec, encoder: TextEncoder) -> None:
        assert spec.text is not None
        self.spec = spec
        self.text: TextInput = spec.text
        self.encoder = encoder

    def __call__(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(the graph's feeds, per-row side outputs) for one formed batch."""
        raw = feeds.get(self.text.input)
        if raw is None:  # token ids: the dataplane already padded them to their bucket
            return feeds, {}
        texts = [str(t) for t in raw.reshape(-1)]
        encoded = self.encoder.encode(texts, self.text.input)
        graph = graph_feeds(self.spec, self.text, encoded)
        if self.spec.buckets is not None:
            graph = pad_to_bucket(graph, self.spec.buckets)
        cut = np.zeros(len(texts), dtype=bool)
        cut[list(encoded.truncated)] = True
        return graph, {TRUNCATED_OUTPUT: cut}


def truncated_rows(outputs: dict[str, np.ndarray]) -> tuple[int, ...]:
    """Take the side output out of one request's outputs: the rows whose texts were cut."""
    cut = outputs.pop(TRUNCATED_OUTPUT, None)
    return () if cut is None else tuple(int(r) for r in np.flatnonzero(cut))
