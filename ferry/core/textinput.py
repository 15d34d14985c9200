"""A model's raw-text input: ``config.json``'s ``text`` entry, and what it means for a request. Pure.

A version whose directory holds ``tokenizer.json`` (``ferry.core.text``) takes, besides its
token-id inputs, one BYTES input of UTF-8 texts, shape ``[batch, 1]``. A request sends either
that input alone or the token-id inputs, never both; the worker turns the texts into the ids,
the attention mask and the token types the graph takes. The exporter writes the entry for a
model trained on text; an imported model (a BERT with ``input_ids``, ``attention_mask`` and
``token_type_ids``) can be given one by hand::

    "text": {"input": "text", "max_length": 128}
    "text": {"input": "text", "ids": "input_ids", "mask": "attention_mask", "type_ids": "token_type_ids"}

``ids`` defaults to the graph's ``input_ids``, else its only INT64 input; ``mask`` and
``type_ids`` to inputs of those names when the graph has them (without a mask input the graph
must read padding as id 0, as the zoo's models do). ``max_length`` (tokens, specials included,
default 512) is where texts are cut; the answer says which were (``TRUNCATED_ROWS``).
``max_text_bytes`` (default 64 KiB) bounds one text before it is tokenized.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ferry.core.errors import InvalidArgument
from ferry.core.params import config_int, json_object
from ferry.core.text import blank_text

CONFIG_KEY = "text"
PROTO_PARAMETER = "ferry.text"  # the entry as JSON in ModelConfig.parameters, for the gateway
DEFAULT_INPUT = "text"
DEFAULT_MAX_LENGTH = 512
DEFAULT_MAX_TEXT_BYTES = 64 << 10
MAX_LENGTH_LIMIT = 1 << 16
TRUNCATED = "truncated"  # response parameter: how many of the request's texts were cut
TRUNCATED_ROWS = "truncated_rows"  # response parameter: which rows, "0,3"
KEYS = ("input", "ids", "mask", "type_ids", "max_length", "max_text_bytes")


@dataclass(frozen=True)
class TextInput:
    input: str  # the BYTES input clients send texts to
    ids: str  # the graph's token-id input
    mask: str = ""  # the graph's attention-mask input, or none
    type_ids: str = ""  # the graph's token-type input, or none
    max_length: int = DEFAULT_MAX_LENGTH
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES

    def to_config(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "ids": self.ids,
            "mask": self.mask,
            "type_ids": self.type_ids,
            "max_length": self.max_length,
            "max_text_bytes": self.max_text_bytes,
        }

    def graph_inputs(self) -> tuple[str, ...]:
        return tuple(n for n in (self.ids, self.mask, self.type_ids) if n)


def parse_text(raw: object, inputs: Sequence[tuple[str, str, tuple[int, ...]]], where: str) -> TextInput:
    """The ``text`` entry of a model with these graph (name, datatype, dims) inputs."""
    where = f"{where} text"
    if raw is True or raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"{where}: must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise InvalidArgument(f"{where}: unknown field(s) {unknown}; it takes {', '.join(KEYS)}")
    by_name = {name: (datatype, dims) for name, datatype, dims in inputs}
    name = raw.get("input") or DEFAULT_INPUT
    if not isinstance(name, str):
        raise InvalidArgument(f"{where}: input must be a name, got {name!r}")
    if name in by_name:
        raise InvalidArgument(f"{where}: input {name!r} is already one of the model's inputs")
    ints = [n for n, (datatype, _) in by_name.items() if datatype in ("INT64", "INT32")]
    ids = raw.get("ids") or ("input_ids" if "input_ids" in by_name else (ints[0] if len(ints) == 1 else ""))
    if not ids:
        raise InvalidArgument(
            f"{where}: say which input takes the token ids (ids); the model has {list(by_name)}"
        )
    chosen = {"ids": ids}
    for key, default in (("mask", "attention_mask"), ("type_ids", "token_type_ids")):
        given = raw.get(key)
        chosen[key] = given if given is not None else (default if default in by_name else "")
    for key, graph_name in chosen.items():
        if not graph_name:
            continue
        if graph_name not in by_name:
            raise InvalidArgument(f"{where}: {key} names {graph_name!r}, which is not an input of the model")
        datatype, dims = by_name[graph_name]
        if datatype not in ("INT64", "INT32") or len(dims) != 1 or dims[0] != -1:
            raise InvalidArgument(
                f"{where}: {key} input {graph_name!r} must be integers of shape [-1] (the sequence), "
                f"it is {datatype} {list(dims)}"
            )
    uncovered = sorted(set(by_name) - set(chosen.values()))
    if uncovered:
        raise InvalidArgument(f"{where}: the texts cannot feed the model's other input(s) {uncovered}")
    return TextInput(
        input=name,
        ids=chosen["ids"],
        mask=chosen["mask"],
        type_ids=chosen["type_ids"],
        max_length=config_int(raw, "max_length", where, 2, MAX_LENGTH_LIMIT, DEFAULT_MAX_LENGTH, digits=True),
        max_text_bytes=config_int(
            raw, "max_text_bytes", where, 2, 1 << 30, DEFAULT_MAX_TEXT_BYTES, digits=True
        ),
    )


def to_proto_parameter(text: TextInput) -> str:
    return json.dumps(text.to_config(), sort_keys=True)


def from_proto_parameter(value: str) -> dict[str, Any]:
    return json_object(value, f"model config parameter {PROTO_PARAMETER!r}")


def check_texts(name: str, texts: Sequence[str], max_bytes: int) -> None:
    """Refuse, before it is queued, a text too long to tokenize or with nothing in it; its row in
    the message. A blank text caught here never joins a batch, so it cannot make its neighbours
    run one by one (a text that only the tokenizer finds empty still fails with its batch's
    fallback)."""
    for row, text in enumerate(texts):
        size = len(text.encode("utf-8")) if len(text) * 4 > max_bytes else len(text)
        if size > max_bytes:
            raise InvalidArgument(
                f"input {name!r}: text {row} is {size} bytes, over this model's max_text_bytes {max_bytes}"
            )
        if not text.strip():
            raise InvalidArgument(blank_text(name, row))


def truncated_rows(value: str) -> list[int]:
    """The rows a response's ``truncated_rows`` parameter lists."""
    return [int(part) for part in value.split(",") if part]


def add_truncation(parameters: Any, rows: Sequence[int]) -> None:
    """Say in a response's ``parameters`` map which texts were cut (nothing when none was)."""
    if rows:
        parameters[TRUNCATED].int64_param = len(rows)
        parameters[TRUNCATED_ROWS].string_param = ",".join(str(r) for r in rows)


def split_truncation(value: str, bounds: Sequence[int]) -> list[list[int]]:
    """A merged batch's truncated rows, as each member's own rows (``bounds`` are the members'
    first rows, then the total)."""
    rows = truncated_rows(value)
    return [[r - lo for r in rows if lo <= r < hi] for lo, hi in itertools.pairwise(bounds)]
