"""The raw-text input of a model: its config entry, the signature a request meets, the protocol
forms, the tokenizer's conventions, and the truncation report split across a merged batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry._proto.inference import grpc_service_pb2 as pb
from ferry.core.configproto import config_proto, metadata_proto, spec_from_config_proto
from ferry.core.errors import InvalidArgument
from ferry.core.modelconfig import spec_from_config, spec_to_config
from ferry.core.text import (
    MAX_TOKENIZER_BYTES,
    PAD_ID,
    TextEncoder,
    TokenizerConfig,
    fit_tokenizer,
    read_tokenizer,
    tokenizer_config,
)
from ferry.core.textinput import TextInput, add_truncation, check_texts, parse_text, split_truncation
from ferry.core.validation import accept_request, signature_for
from gateway.coalescer import split

IDS = ("input", "INT64", (-1,))
BERT = [("input_ids", "INT64", (-1,)), ("attention_mask", "INT64", (-1,)), ("token_type_ids", "INT64", (-1,))]


def test_defaults_take_the_only_integer_input() -> None:
    assert parse_text({}, [IDS], "m") == TextInput(input="text", ids="input")


def test_a_bert_graph_gets_its_mask_and_token_types_fed() -> None:
    text = parse_text({"max_length": 32}, BERT, "m")
    assert (text.ids, text.mask, text.type_ids, text.max_length) == (
        "input_ids",
        "attention_mask",
        "token_type_ids",
        32,
    )
    assert text.graph_inputs() == ("input_ids", "attention_mask", "token_type_ids")


@pytest.mark.parametrize(
    ("raw", "inputs", "message"),
    [
        ([1], [IDS], "must be a JSON object"),
        ({"colour": 1}, [IDS], "unknown field"),
        ({"input": "input"}, [IDS], "already one of the model's inputs"),
        ({}, [IDS, ("other", "INT64", (-1,))], "say which input takes the token ids"),
        ({"ids": "nope"}, [IDS], "'nope', which is not an input"),
        ({}, [("input", "FP32", (-1,))], "say which input takes the token ids"),
        ({"ids": "input"}, [("input", "INT64", (8,))], "must be integers of shape [-1]"),
        ({}, [IDS, ("pixels", "FP32", (3,))], "cannot feed the model's other input(s) ['pixels']"),
        ({"max_length": 1}, [IDS], "max_length must be an integer in [2, 65536]"),
        ({"max_length": True}, [IDS], "max_length must be an integer"),
        ({"max_text_bytes": "big"}, [IDS], "max_text_bytes must be an integer"),
    ],
)
def test_bad_text_entries_are_refused_by_name(raw: Any, inputs: list[Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_text(raw, inputs, "config of model 'm'")
    assert message in err.value.message


def _spec() -> Any:
    config = {
        "max_batch_size": 4,
        "input": [{"name": "input", "data_type": "INT64", "dims": [-1]}],
        "output": [{"name": "logits", "data_type": "FP32", "dims": [3]}],
        "text": {"max_length": 16},
    }
    return spec_from_config("m", config)


def test_the_entry_round_trips_through_config_json_and_the_protocol() -> None:
    spec = _spec()
    assert spec_from_config("m", spec_to_config(spec)).text == spec.text
    proto = config_proto(spec)
    assert [(t.name, t.optional) for t in proto.input] == [("input", True), ("text", True)]
    again = spec_from_config_proto(proto)
    assert again.text == spec.text and [t.name for t in again.inputs] == ["input"]
    meta = metadata_proto(spec, [1])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "INT64", [-1, -1]),
        ("text", "BYTES", [-1, 1]),
    ]


def _request(*tensors: tuple[str, str, list[int], list[Any]]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, shape, values in tensors:
        t = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if datatype == "BYTES":
            t.contents.bytes_contents.extend(values)
        else:
            t.contents.int64_contents.extend(values)
    return request


def test_a_request_of_texts_is_checked_against_the_text_input_alone() -> None:
    spec = _spec()
    texts = _request(("text", "BYTES", [2, 1], [b"a", "é".encode()]))
    assert signature_for(spec, texts) is spec.for_text()
    rows, arrays = accept_request(spec, texts)
    assert rows == 2 and arrays["text"].tolist() == [["a"], ["é"]]
    ids = _request(("input", "INT64", [1, 3], [2, 5, 3]))
    assert signature_for(spec, ids) is spec
    assert accept_request(spec, ids)[1]["input"].tolist() == [[2, 5, 3]]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_request(("text", "BYTES", [1, 1], [b"a"]), ("input", "INT64", [1, 1], [2])), "not both"),
        (_request(("text", "INT64", [1, 1], [7])), "does not match the model's BYTES"),
        (_request(("input", "BYTES", [1, 1], [b"a"])), "send raw texts as input 'text'"),
        (_request(("text", "BYTES", [2], [b"a", b"b"])), "has rank 1 but the model expects [-1, 1]"),
        (_request(("words", "BYTES", [1, 1], [b"a"])), "(inputs: input, text)"),
    ],
)
def test_requests_that_mix_up_texts_and_ids_are_refused(request_: pb.ModelInferRequest, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        accept_request(_spec(), request_)
    assert message in err.value.message


def test_a_text_over_the_byte_limit_is_refused_with_its_row() -> None:
    check_texts("text", ["short", "ü" * 10], 20)
    with pytest.raises(InvalidArgument, match=r"text 1 is 22 bytes, over this model's max_text_bytes 20"):
        check_texts("text", ["short", "ü" * 11], 20)


@pytest.mark.parametrize(("texts", "row"), [(["ok", ""], 1), (["\u3000\t \n", "ok"], 0)])
def test_a_blank_text_is_refused_before_it_is_queued(texts: list[str], row: int) -> None:
    with pytest.raises(InvalidArgument, match=rf"text {row} has nothing to classify"):
        check_texts("text", texts, 100)


def test_the_truncation_report_follows_each_member_of_a_merged_batch() -> None:
    assert split_truncation("0,3,4", [0, 2, 4, 7]) == [[0], [1], [0]]
    merged = pb.ModelInferResponse(model_name="m", model_version="1")
    merged.outputs.add(name="logits", datatype="FP32", shape=[5, 1])
    merged.raw_output_contents.append(np.arange(5, dtype=np.float32).tobytes())
    add_truncation(merged.parameters, [1, 3])
    first, second = split(merged, [2, 3])
    assert first.parameters["truncated"].int64_param == 1
    assert first.parameters["truncated_rows"].string_param == "1"
    assert second.parameters["truncated_rows"].string_param == "1"  # merged row 3 is its row 1
    merged2 = pb.ModelInferResponse()
    merged2.CopyFrom(merged)
    del merged2.parameters["truncated"], merged2.parameters["truncated_rows"]
    add_truncation(merged2.parameters, [0])
    a, b = split(merged2, [1, 4])
    assert a.parameters["truncated_rows"].string_param == "0" and "truncated" not in b.parameters


CORPUS = ["the cat sat on the mat", "dogs run in the park", "running runners ran"] * 10


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_a_fitted_tokenizer_keeps_ferrys_id_convention(kind: str) -> None:
    tokenizer = fit_tokenizer(CORPUS, TokenizerConfig(kind=kind, vocab_size=120))
    assert tokenizer.token_to_id("[PAD]") == PAD_ID
    encoder = TextEncoder(tokenizer, max_length=6)
    encoded = encoder.encode(["the cat", "running runners ran in the park today"])
    assert encoded.ids.shape == (2, 6)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert encoded.ids[0][0] == cls and sep in encoded.ids[0].tolist()
    assert encoded.mask[0].tolist() == [1 if t != PAD_ID else 0 for t in encoded.ids[0]]
    assert encoded.truncated == (1,)
    with pytest.raises(InvalidArgument, match="text 1 has nothing to classify"):
        encoder.encode(["the cat", "  "])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"kind": "sentencepiece"}, "unknown tokenizer kind"),
        ({"vocab_size": 3}, "vocab_size must be an integer in [6, 1000000]"),
        ({"lowercase": "yes"}, "lowercase must be true or false"),
        ({"size": 10}, "unknown field"),
    ],
)
def test_bad_tokenizer_entries_are_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        tokenizer_config(raw)
    assert message in err.value.message


def test_unreadable_tokenizer_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    with pytest.raises(InvalidArgument, match=r"tokenizer\.json is missing"):
        read_tokenizer(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(InvalidArgument, match="is not UTF-8 text"):
        read_tokenizer(path)
    path.write_text('{"version": "1.0", "model": 7}', encoding="utf-8")
    with pytest.raises(InvalidArgument, match="is not a readable tokenizer"):
        read_tokenizer(path)
    with path.open("wb") as f:
        f.truncate(MAX_TOKENIZER_BYTES + 1)
    with pytest.raises(InvalidArgument, match="over the limit"):
        read_tokenizer(path)
    path.write_text(fit_tokenizer(CORPUS, TokenizerConfig(vocab_size=80)).to_str(), encoding="utf-8")
    assert read_tokenizer(path).token_to_id("[PAD]") == PAD_ID
