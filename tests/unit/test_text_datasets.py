"""Text datasets: the generated ``topics`` corpus, CSV and JSONL uploads, and token ids from a saved
tokenizer. Every bad upload names its problem and its line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ferry.core.errors import InvalidArgument
from ferry.core.store import Store
from ferry.core.text import TextEncoder, TokenizerConfig, fit_tokenizer
from ferry.datasets import (
    TEXT,
    UPLOAD_FORMATS,
    dataset_names,
    find_upload,
    is_text_csv,
    load_dataset,
    read_text_upload,
    read_upload,
)
from ferry.textcorpus import MAX_WORDS, MIN_WORDS, TOPICS, generate


def test_topics_is_deterministic_balanced_and_named() -> None:
    texts, labels = generate(2000, 0)
    again, labels_again = generate(2000, 0)
    other, _ = generate(2000, 1)
    assert texts == again and np.array_equal(labels, labels_again) and texts != other
    assert "topics" in TEXT and "topics" in dataset_names() and "jsonl" in UPLOAD_FORMATS
    counts = np.bincount(labels, minlength=4)
    assert counts.sum() == 2000 and counts.min() >= 440 and counts.max() <= 560, counts
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) >= MIN_WORDS and max(lengths) == MAX_WORDS
    assert 12 <= float(np.median(lengths)) <= 26
    assert all(t[0].isupper() and t.endswith(".") for t in texts)
    words = {w.strip(",.").lower() for t in texts for w in t.split()}
    assert {"run", "running", "runner", "baking", "baked", "investor", "rainy"} <= words

    data = load_dataset({"name": "topics", "seed": 3, "params": {"samples": 500}})
    assert data.is_text and data.class_names == list(TOPICS) == ["sports", "weather", "finance", "cooking"]
    assert (len(data.texts_train), len(data.texts_test), data.classes, data.task) == (
        400,
        100,
        4,
        "classification",
    )
    assert data.x_train.shape == (400, 0) and data.input_shape == [-1] and data.datatype == "INT64"
    texts3, labels3 = generate(500, 3)
    row = texts3.index(data.texts_test[0])
    assert data.y_test[0] == labels3[row]  # the labels travel with their texts through the split


def test_topics_is_learnable_but_not_trivially() -> None:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    data = load_dataset({"name": "topics"})
    vectorizer = CountVectorizer()
    x_train = vectorizer.fit_transform(data.texts_train)
    model = LogisticRegression(max_iter=2000).fit(x_train, data.y_train)
    accuracy = model.score(vectorizer.transform(data.texts_test), data.y_test)
    assert 0.85 <= accuracy < 0.99, accuracy


def test_a_saved_tokenizer_turns_texts_into_padded_ids() -> None:
    entry = {"name": "topics", "params": {"samples": 300}}
    plain = load_dataset(entry)
    tokenizer = fit_tokenizer(plain.texts_train, TokenizerConfig("wordpiece", 200, True))
    encoder = TextEncoder(tokenizer, max_length=64)
    data = load_dataset(entry, encoder=encoder)
    assert data.x_train.dtype == np.int64 and data.x_train.shape[0] == 240 and data.x_test.shape[0] == 60
    assert data.x_train.shape[1] == 64  # some sentences are cut at max_length
    assert data.vocab_size == encoder.vocab_size <= 200 and int(data.x_train.max()) < data.vocab_size
    assert data.input_shape == [-1] and data.datatype == "INT64"
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    first = data.x_train[0][data.x_train[0] != 0].tolist()
    assert first == encoder.token_ids([data.texts_train[0]])[0] and first[0] == cls and first[-1] == sep
    assert np.array_equal(data.y_train, plain.y_train)
    # The split's longest row decides its width.
    short = load_dataset({"name": "topics", "params": {"samples": 300}}, encoder=TextEncoder(tokenizer, 512))
    widths = [len(t) for t in TextEncoder(tokenizer, 512).token_ids(short.texts_test)]
    assert short.x_test.shape[1] == max(widths) > 64


def test_jsonl_labels_are_strings_as_written() -> None:
    lines = [
        {"text": "the stock rose", "label": "finance"},
        {"text": "it rained", "label": 7},
        {"text": "a goal", "label": 7.0},
        {"text": "bake it", "label": "finance", "extra": 1},
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode() + b"\n\n"
    rows = read_text_upload(data, "jsonl")
    assert rows.texts == ["the stock rose", "it rained", "a goal", "bake it"]
    assert rows.labels == ["finance", "7", "7.0", "finance"]
    custom = b'{"body": "x y", "topic": "a"}\n{"body": "z", "topic": "b"}\n'
    assert read_text_upload(custom, "jsonl", "body", "topic").labels == ["a", "b"]


def test_text_csv_with_quotes_and_named_columns() -> None:
    data = b'id,text,label\n1,"hello, world",greeting\n2,"a ""quoted"" text\nover two lines",other\n'
    rows = read_text_upload(data, "csv")
    assert rows.texts == ["hello, world", 'a "quoted" text\nover two lines'] and rows.labels == [
        "greeting",
        "other",
    ]
    assert is_text_csv(data) and not is_text_csv(b"f1,f2,label\n1,2,0\n")
    custom = b"review,stars\ngood,5\nbad,1\n"
    assert not is_text_csv(custom) and is_text_csv(custom, "review")
    assert read_text_upload(custom, "csv", "review", "stars").labels == ["5", "1"]
    bom = "\ufefftext,label\nhello,a\nbye,b\n".encode()  # as a spreadsheet saves it
    assert is_text_csv(bom) and read_text_upload(bom, "csv").texts == ["hello", "bye"]
    x, y = read_upload(b"f1,f2,label\n1,2,0\n3,4,1\n", "csv")  # a numeric CSV is as before
    assert x.tolist() == [[1, 2], [3, 4]] and y.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("fmt", "data", "message"),
    [
        ("jsonl", b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n',
         "JSONL dataset is not UTF-8: invalid byte 0xe9 on line 2"),
        ("csv", b"text,label\nok,a\n\xff,b\n", "CSV dataset is not UTF-8: invalid byte 0xff on line 3"),
        ("jsonl", b'{"text": "a", "label": "x"}\n{"label": "y"}\n',
         "JSONL dataset line 2 has no key 'text' (it has ['label'])"),
        ("jsonl", b'{"text": "a", "label": "x"}\n{"text": "b"}\n', "JSONL dataset line 2 has no key 'label'"),
        ("csv", b"body,label\na,x\nb,y\n", "CSV dataset line 1: the header has no column 'text'"),
        ("csv", b"text,tag\na,x\nb,y\n", "CSV dataset line 1: the header has no column 'label'"),
        ("jsonl", b'{"text": 12, "label": "x"}\n{"text": "b", "label": "y"}\n',
         "JSONL dataset line 1: 'text' must be a string, got number 12"),
        ("jsonl", b'{"text": ["a"], "label": "x"}\n{"text": "b", "label": "y"}\n',
         "JSONL dataset line 1: 'text' must be a string, got list"),
        ("jsonl", b'{"text": "a", "label": "x"}\n{"text": "  ", "label": "y"}\n',
         "JSONL dataset line 2: 'text' is empty"),
        ("csv", b"text,label\na,x\n,y\n", "CSV dataset line 3: 'text' is empty"),
        ("jsonl", b'{"text": "a", "label": null}\n{"text": "b", "label": "y"}\n',
         "JSONL dataset line 1: label 'label' must be a string or a number, got NoneType"),
        ("jsonl", b'{"text": "a", "label": "x"}\nnot json\n', "JSONL dataset line 2 is not JSON"),
        ("jsonl", b'{"text": "a", "label": "x"}\n["a", "x"]\n',
         "JSONL dataset line 2 must be a JSON object, got list"),
        ("csv", b"text,label\na,x\nb,y,z\n", "CSV dataset line 3 has 3 fields, the header 2"),
        ("jsonl", b'{"text": "a", "label": "x"}\n', "JSONL dataset has 1 row(s); it needs at least 2"),
        ("csv", b"text,label\n", "CSV dataset has 0 row(s); it needs at least 2"),
        ("jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n',
         "JSONL dataset has only one class ('x'); a classifier needs at least 2"),
        ("csv", b"", "CSV dataset is empty"),
    ],
)  # fmt: skip
def test_bad_text_uploads_name_the_problem_and_line(fmt: str, data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        read_text_upload(data, fmt)
    assert caught.value.message.startswith(message), caught.value.message


def test_uploaded_text_from_the_store(tmp_path: Path) -> None:
    folder = tmp_path / "datasets"
    folder.mkdir()
    lines = [
        {"text": f"sentence number {i} about {'cats' if i % 2 else 'dogs'}", "label": i % 2}
        for i in range(20)
    ]
    (folder / "pets.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    (folder / "pets-csv.csv").write_text(
        "body,kind\n" + "".join(f"{line['text']},{'cat' if line['label'] else 'dog'}\n" for line in lines)
    )
    assert find_upload(tmp_path, "pets").name == "pets.jsonl"
    data = load_dataset({"upload": "pets", "seed": 2}, store=tmp_path)
    assert data.is_text and data.name == "upload:pets" and data.class_names == ["0", "1"]
    assert (len(data.texts_train), len(data.texts_test), data.classes) == (16, 4, 2)
    for text, label in zip(data.texts_train, data.y_train, strict=True):
        assert text.endswith("cats" if label == 1 else "dogs")
    named = {"upload": "pets-csv", "params": {"text_column": "body", "label_column": "kind"}}
    csv_data = load_dataset(named, store=tmp_path)
    assert csv_data.is_text and csv_data.class_names == ["cat", "dog"]
    with pytest.raises(InvalidArgument, match=r"^CSV dataset must be numeric with the label last, or text"):
        load_dataset({"upload": "pets-csv"}, store=tmp_path)  # without the column names it is not text
    with pytest.raises(InvalidArgument, match=r"^text dataset upload 'pets' is a classification dataset"):
        load_dataset({"upload": "pets", "task": "regression"}, store=tmp_path)
    with pytest.raises(InvalidArgument, match=r"^dataset param 'text_column' must be a non-empty string"):
        load_dataset({"upload": "pets", "params": {"text_column": 3}}, store=tmp_path)


@dataclass
class Chunk:
    name: str = ""
    format: str = ""
    data: bytes = b""
    sha256: str = ""
    overwrite: bool = False


def _upload(store: Store, name: str, fmt: str, data: bytes) -> object:
    import hashlib

    from services.trainer.uploads import receive_upload

    async def chunks() -> AsyncIterator[Chunk]:
        yield Chunk(name, fmt, data[:10], hashlib.sha256(data).hexdigest())
        yield Chunk(data=data[10:])

    return asyncio.run(receive_upload(store, chunks(), 1 << 20))


def test_the_trainer_keeps_a_text_upload_and_refuses_a_bad_one(tmp_path: Path) -> None:
    store = Store(tmp_path)
    good = b'{"text": "a b", "label": "x"}\n{"text": "c", "label": "y"}\n{"text": "d", "label": "y"}\n'
    result = _upload(store, "small", "jsonl", good)
    assert (result.x_shape, result.classes) == ([3], 2)  # type: ignore[attr-defined]
    assert (store.datasets_dir / "small.jsonl").read_bytes() == good
    text_csv = b"text,label\nhello,a\nbye,b\n"
    result = _upload(store, "words", "csv", text_csv)
    assert (result.x_shape, result.classes) == ([2], 2)  # type: ignore[attr-defined]
    # Other column names: checked for form here, in full when a job names them.
    custom = _upload(store, "reviews", "csv", b"review,stars\ngood film,5\nbad film,1\nok,3\n")
    assert (custom.x_shape, custom.classes) == ([3], 0)  # type: ignore[attr-defined]
    keyed = _upload(store, "keyed", "jsonl", b'{"body": "a"}\n{"body": "b", "topic": 1}\n')
    assert (keyed.x_shape, keyed.classes) == ([2], 0)  # type: ignore[attr-defined]
    data = load_dataset(
        {"upload": "reviews", "params": {"text_column": "review", "label_column": "stars"}}, store=tmp_path
    )
    assert data.class_names == ["1", "3", "5"] and data.is_text
    with pytest.raises(InvalidArgument, match=r"^JSONL dataset line 1 has no key 'topic'"):
        load_dataset(
            {"upload": "keyed", "params": {"text_column": "body", "label_column": "topic"}}, store=tmp_path
        )
    for fmt, bad, message in (
        ("jsonl", b'{"text": "a", "label": "x"}\n{oops\n', r"^JSONL dataset line 2 is not JSON"),
        ("jsonl", b'{"body": "a"}\n', r"^JSONL dataset has 1 row\(s\); it needs at least 2"),
        ("csv", b"review,stars\ngood,5\nbad\n", r"^CSV dataset line 3 has 1 fields, the header 2"),
        ("csv", b"f1,f2,label\n1,2,0\n3,x,1\n", r"^CSV dataset must be numeric with the label last"),
        ("csv", b"text,label\n\xff,a\nb,c\n", r"^CSV dataset is not UTF-8: invalid byte 0xff on line 2"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            _upload(store, "broken", fmt, bad)
    kept = ["keyed.jsonl", "reviews.csv", "small.jsonl", "words.csv"]
    assert sorted(p.name for p in store.datasets_dir.iterdir()) == kept
