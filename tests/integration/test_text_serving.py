"""Raw text in, logits and labels out, through a real worker and a real gateway.

The model is the zoo's ``transformer_text`` (random weights) with a real WordPiece tokenizer
fitted here and saved as the version's ``tokenizer.json``. A text sent as BYTES must get the
answer its token ids get, the same version keeps taking token ids, texts past ``max_length`` are
cut and the answer says which, and every bad input gets INVALID_ARGUMENT naming the problem. A
version whose tokenizer is corrupt or missing is UNAVAILABLE with the reason while the others
serve.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from benchmarks.buckets import CLASSES, VOCAB, export_transformer
from ferry._proto.inference import grpc_service_pb2 as pb
from ferry._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ferry.core.text import TOKENIZER_FILE, TextEncoder, TokenizerConfig, fit_tokenizer, read_tokenizer
from tests.integration.test_gateway import stats, wait_until, worker_and_gateway
from tests.integration.test_worker_http import call, serve
from tests.support.deps import require_module
from tests.support.gate import held_config
from tests.support.models import publish

tc = require_module("tritonclient.grpc")
require_module("torch")

MAX_LENGTH = 12
LABELS = ["sports", "weather", "money", "food"]
CORPUS = [
    "the team won the match after a late goal",
    "heavy rain and strong winds are expected tonight",
    "the market fell as prices of shares dropped",
    "bake the bread in a hot oven for twenty minutes",
    "runners were running in the rain before the storm",
    "the striker scored twice and the fans cheered",
] * 20


def _tokenizer_file(folder: Path) -> Path:
    tokenizer = fit_tokenizer(CORPUS, TokenizerConfig(vocab_size=300))
    assert tokenizer.get_vocab_size() < VOCAB
    path = folder / TOKENIZER_FILE
    path.write_text(tokenizer.to_str(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("store")
    work = tmp_path_factory.mktemp("text")
    onnx_file = export_transformer(work / "tt.onnx", width=32, max_len=64)
    tokenizer = _tokenizer_file(work)
    config = {
        "max_batch_size": 8,
        "text": {"max_length": MAX_LENGTH},
        "sequence_buckets": {"max_length": 64},
    }
    # "held" batches only once four requests are queued, and has no sequence_buckets: its texts of
    # different lengths can share a run only if they are tokenized together, in the batch they form
    held = held_config(4, 8, text=config["text"])
    for model in ("topics", "held", "corrupt", "missing"):
        version = publish(root, model, 1, onnx_file, held if model == "held" else config)
        if model in ("topics", "held"):
            (version / TOKENIZER_FILE).write_bytes(tokenizer.read_bytes())
            (version / "labels.txt").write_text("".join(f"{n}\n" for n in LABELS), encoding="utf-8")
        elif model == "corrupt":
            (version / TOKENIZER_FILE).write_text('{"model": "nothing like a tokenizer"', encoding="utf-8")
    _import_bert_shaped(root, work, tokenizer)
    with worker_and_gateway(root, ("topics", "held", "bert-shaped")) as (addresses, _):
        yield {
            "addresses": addresses,
            "encoder": TextEncoder(read_tokenizer(tokenizer), MAX_LENGTH),
            "store": root,
        }


def _import_bert_shaped(root: Path, work: Path, tokenizer: Path) -> None:
    """A graph with a BERT's three inputs, imported with its tokenizer through ImportOnnx's tar."""
    import io
    import tarfile

    from ferry.core.store import Store
    from services.exporter.importer import import_onnx
    from tests.support.models import export_bert_shaped

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for path in (export_bert_shaped(work / "model.onnx"), tokenizer):
            archive.add(str(path), arcname=path.name)
    import_onnx(
        Store(root), "bert-shaped", out.getvalue(), 8, json.dumps({"text": {"max_length": MAX_LENGTH}})
    )


HOPS = ["worker", "gateway"]


def _texts(values: list[bytes], name: str = "text") -> Any:
    inp = tc.InferInput(name, [len(values), 1], "BYTES")
    inp.set_data_from_numpy(np.array(values, dtype=object).reshape(-1, 1))
    return inp


def _ids(ids: np.ndarray) -> Any:
    inp = tc.InferInput("input", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids.astype(np.int64))
    return inp


def _status(address: str, request: pb.ModelInferRequest) -> tuple[str, str]:
    with grpc.insecure_channel(address) as ch:
        try:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=30)
        except grpc.RpcError as err:
            return err.code().name, err.details() or ""
    return "OK", ""


def _text_request(values: list[bytes], name: str = "text", datatype: str = "BYTES") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="topics")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(values), 1])
    tensor.contents.bytes_contents.extend(values)
    return request


@pytest.mark.parametrize("hop", HOPS)
def test_a_text_gets_the_answer_of_its_token_ids(servers: dict[str, Any], hop: str) -> None:
    client = tc.InferenceServerClient(servers["addresses"][hop])
    texts = ["The team won the match", "rain and winds tonight", "bake bread in the oven"]
    encoded = servers["encoder"].encode(texts)
    by_text = client.infer("topics", [_texts([t.encode() for t in texts])])
    by_ids = client.infer("topics", [_ids(encoded.ids)])
    np.testing.assert_allclose(by_text.as_numpy("output"), by_ids.as_numpy("output"), atol=1e-5, rtol=1e-4)
    assert by_text.get_response().parameters.get("truncated") is None  # nothing was cut


@pytest.mark.parametrize("hop", HOPS)
def test_texts_of_mixed_lengths_keep_their_own_answers(servers: dict[str, Any], hop: str) -> None:
    client = tc.InferenceServerClient(servers["addresses"][hop])
    texts = [b"goal", b"the market fell as prices dropped", b"hot oven"]
    together = client.infer("topics", [_texts(texts)]).as_numpy("output")
    for row, text in enumerate(texts):
        alone = client.infer("topics", [_texts([text])]).as_numpy("output")
        np.testing.assert_allclose(together[row], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("hop", HOPS)
def test_a_long_text_is_cut_to_max_length_and_the_answer_says_so(servers: dict[str, Any], hop: str) -> None:
    client = tc.InferenceServerClient(servers["addresses"][hop])
    long = " ".join(["the striker scored twice"] * 10)
    answer = client.infer("topics", [_texts([b"rain", long.encode(), b"goal"])])
    params = answer.get_response().parameters
    assert params["truncated"].int64_param == 1
    assert params["truncated_rows"].string_param == "1"
    cut = servers["encoder"].encode([long])
    assert cut.ids.shape[1] == MAX_LENGTH and cut.truncated == (0,)
    by_ids = client.infer("topics", [_ids(cut.ids)]).as_numpy("output")
    np.testing.assert_allclose(answer.as_numpy("output")[1], by_ids[0], atol=1e-5, rtol=1e-4)


def test_texts_sent_apart_are_tokenized_and_run_as_one_batch(servers: dict[str, Any]) -> None:
    """Four requests of one text each, of different lengths and one past max_length: the worker
    tokenizes them together in the batch they form, pads them to its longest, runs it once, and each
    answer is the one its text gets alone, with the truncation on the long one's answer only."""
    import asyncio

    tc_aio = require_module("tritonclient.grpc.aio")
    address = servers["addresses"]["worker"]
    texts = [b"rain", b"the striker scored twice", " ".join(["strong winds"] * 12).encode(), b"bake bread"]
    client = tc.InferenceServerClient(address)
    alone = [client.infer("topics", [_texts([t])]) for t in texts]
    before = stats(address, "held")

    async def together() -> list[Any]:
        aio = tc_aio.InferenceServerClient(address)
        try:  # held in the queue until all four are there
            return list(await asyncio.gather(*(aio.infer("held", [_texts([t])]) for t in texts)))
        finally:
            await aio.close()

    answers = asyncio.run(together())
    after = stats(address, "held")
    assert after.inference_count - before.inference_count == len(texts)
    assert after.execution_count - before.execution_count == 1
    for got, want in zip(answers, alone, strict=True):
        np.testing.assert_allclose(got.as_numpy("output"), want.as_numpy("output"), atol=1e-5, rtol=1e-4)
    cut = [dict(a.get_response().parameters) for a in answers]
    assert [
        ("truncated" in p, p["truncated_rows"].string_param if "truncated_rows" in p else "") for p in cut
    ] == [
        (False, ""),
        (False, ""),
        (True, "0"),
        (False, ""),
    ]


@pytest.mark.parametrize("hop", HOPS)
def test_top_k_labels_come_back_for_texts(servers: dict[str, Any], hop: str) -> None:
    client = tc.InferenceServerClient(servers["addresses"][hop])
    texts = [b"the fans cheered", b"strong winds"]
    logits = client.infer("topics", [_texts(texts)]).as_numpy("output")
    wanted = [tc.InferRequestedOutput("output", class_count=2)]
    top = client.infer("topics", [_texts(texts)], outputs=wanted).as_numpy("output")
    assert top.shape == (2, 2)
    for row in range(2):
        best = int(np.argmax(logits[row]))
        score, index, label = top[row][0].decode().split(":")
        assert (int(index), label) == (best, LABELS[best])
        assert float(score) == pytest.approx(float(logits[row][best]), abs=1e-4)


def test_the_gateway_cache_keys_on_the_text(servers: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(servers["addresses"]["gateway"])

    def hit(text: bytes) -> bool:
        params = client.infer("topics", [_texts([text])]).get_response().parameters
        return "ferry_cache_hit" in params and params["ferry_cache_hit"].bool_param

    first, second = b"cache me: the oven is hot", b"cache me: the oven is cold"
    assert not hit(first)
    assert hit(first)
    assert not hit(second)  # a different text is a different entry


def test_metadata_and_config_show_both_inputs(servers: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(servers["addresses"]["worker"])
    meta = client.get_model_metadata("topics")
    assert {(t.name, t.datatype, tuple(t.shape)) for t in meta.inputs} == {
        ("input", "INT64", (-1, -1)),
        ("text", "BYTES", (-1, 1)),
    }
    config = client.get_model_config("topics").config
    assert [(t.name, t.optional) for t in config.input] == [("input", True), ("text", True)]
    entry = json.loads(config.parameters["ferry.text"].string_value)
    assert entry["input"] == "text" and entry["ids"] == "input" and entry["max_length"] == MAX_LENGTH


BAD = [
    ("invalid UTF-8", _text_request([b"fine", b"\xff\xfe broken"]), "element 1 is not valid UTF-8"),
    ("empty text", _text_request([b"goal", b""]), "text 1 has nothing to classify"),
    ("only whitespace", _text_request([b"   \t "]), "text 0 has nothing to classify"),
    ("too many bytes", _text_request([b"x" * (70 << 10)]), "over this model's max_text_bytes 65536"),
    ("numbers to the text input", None, "datatype INT64 does not match the model's BYTES"),
    ("bytes to the token-id input", _text_request([b"goal"], "input"), "send raw texts as input 'text'"),
    ("both texts and ids", None, "send the texts ('text') alone, or the token ids"),
]


def _bad(kind: str, request: pb.ModelInferRequest | None) -> pb.ModelInferRequest:
    if request is not None:
        return request
    out = pb.ModelInferRequest(model_name="topics")
    if kind == "numbers to the text input":
        out.inputs.add(name="text", datatype="INT64", shape=[1, 1]).contents.int64_contents.append(7)
        return out
    out.inputs.add(name="text", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"goal")
    out.inputs.add(name="input", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([2, 3])
    return out


@pytest.mark.parametrize("hop", HOPS)
@pytest.mark.parametrize(("kind", "request_", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_text_inputs_are_refused_by_name(
    servers: dict[str, Any], hop: str, kind: str, request_: pb.ModelInferRequest | None, message: str
) -> None:
    code, details = _status(servers["addresses"][hop], _bad(kind, request_))
    assert code == "INVALID_ARGUMENT"
    assert message in details


def test_a_corrupt_or_missing_tokenizer_keeps_only_its_version_out(servers: dict[str, Any]) -> None:
    client = tc.InferenceServerClient(servers["addresses"]["worker"])

    def index() -> dict[str, Any]:
        return {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}

    wait_until(lambda: index()["corrupt"].get("reason") and index()["missing"].get("reason"), 30, "reasons")
    rows = index()
    assert rows["corrupt"]["state"] == "UNAVAILABLE"
    assert "tokenizer.json is not a readable tokenizer" in rows["corrupt"]["reason"]
    assert rows["missing"]["state"] == "UNAVAILABLE"
    assert "tokenizer.json is missing" in rows["missing"]["reason"]
    assert rows["topics"]["state"] == "READY"
    assert client.infer("topics", [_texts([b"goal"])]).as_numpy("output").shape == (1, CLASSES)


def test_texts_over_http_json_mean_the_same(servers: dict[str, Any]) -> None:
    proc, port = serve(servers["store"])
    try:
        worker = {"port": port}
        wait_until(lambda: call(worker, "GET", "/v2/models/topics/ready")[0] == 200, 30, "topics ready")
        long = " ".join(["heavy rain tonight"] * 10)
        body = {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": ["goal", long]}],
            "outputs": [{"name": "output", "parameters": {"classification": 1}}],
        }
        status, doc, _ = call(worker, "POST", "/v2/models/topics/infer", json.dumps(body))
        assert status == 200, doc
        assert isinstance(doc, dict)
        assert doc["parameters"] == {"truncated": 1, "truncated_rows": "1"}
        grpc_top = tc.InferenceServerClient(servers["addresses"]["worker"]).infer(
            "topics",
            [_texts([b"goal", long.encode()])],
            outputs=[tc.InferRequestedOutput("output", class_count=1)],
        )
        assert doc["outputs"][0]["data"] == [v.decode() for v in grpc_top.as_numpy("output").reshape(-1)]
        body["inputs"][0]["data"] = ["goal", ""]
        status, doc, _ = call(worker, "POST", "/v2/models/topics/infer", json.dumps(body))
        assert status == 400
        assert isinstance(doc, dict) and "text 1 has nothing to classify" in doc["error"]
    finally:
        proc.stop()


@pytest.mark.parametrize("hop", HOPS)
def test_an_imported_bert_shaped_graph_is_fed_ids_mask_and_token_types(
    servers: dict[str, Any], hop: str
) -> None:
    client = tc.InferenceServerClient(servers["addresses"][hop])
    texts = ["the team won", "heavy rain and strong winds are expected tonight across the city"]
    counts = client.infer("bert-shaped", [_texts([t.encode() for t in texts])]).as_numpy("counts")
    encoded = servers["encoder"].encode(texts)
    assert counts[:, 0].tolist() == encoded.mask.sum(axis=1).tolist()  # the mask: tokens per text
    assert counts[:, 1].tolist() == (encoded.ids * encoded.mask).sum(axis=1).tolist()
    assert counts[:, 2].tolist() == [0, 0]  # one text per row: every token type is 0
    assert encoded.mask[0].sum() < encoded.mask[1].sum() == MAX_LENGTH  # padded, and cut
