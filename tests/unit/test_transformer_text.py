"""transformer_text in the zoo: padding, the hand-written layer against torch's, bounds, sizes, export.

No network and no services: the module itself, the trainer's spec check (``normalize_spec``, which
builds the model and counts it), the CLI's size line, and the exporter's own ONNX conversion
(``export_onnx`` + ONNX Runtime) at sequence lengths other than the traced one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ferry.cli.train import model_size
from ferry.core.errors import InvalidArgument
from ferry.zoo import TRANSFORMER_LIMITS, TransformerText, build_model, count_parameters, parameter_count
from services.exporter.runtime import ort_session, torch_to_onnx
from services.trainer.spec import normalize_spec

TINY: dict[str, Any] = {
    "vocab_size": 50,
    "num_classes": 3,
    "width": 16,
    "layers": 2,
    "heads": 2,
    "ff": 32,
    "max_len": 40,
    "dropout": 0.0,
}


def tiny(**changes: Any) -> TransformerText:
    torch.manual_seed(0)
    return TransformerText(**{**TINY, **changes}).eval()


def tokens(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids without padding (1..vocab-1), as the text datasets draw them."""
    return torch.from_numpy(np.random.default_rng(seed).integers(1, TINY["vocab_size"], (rows, length)))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(x)
    return out


def test_output_shape_for_any_batch_and_length() -> None:
    model = tiny()
    for rows, length in ((1, 1), (3, 7), (5, 40)):
        assert logits(model, tokens(rows, length)).shape == (rows, 3)
    with pytest.raises(ValueError, match="sequence length 41 is over max_len 40"):
        model(tokens(1, 41))


def test_right_padding_does_not_change_the_logits() -> None:
    model = tiny()
    text = tokens(4, 9, seed=1)
    alone = logits(model, text)
    for extra in (1, 5, 31):
        padded = torch.cat([text, torch.zeros(4, extra, dtype=torch.long)], dim=1)
        torch.testing.assert_close(logits(model, padded), alone, atol=1e-5, rtol=0)
    # A batch mixing lengths: the short text padded beside a long one answers as it does alone.
    long = tokens(1, 20, seed=2)
    batch = torch.cat([torch.cat([text[:1], torch.zeros(1, 11, dtype=torch.long)], dim=1), long])
    both = logits(model, batch)
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], logits(model, long)[0], atol=1e-5, rtol=0)


def test_padding_is_masked_not_merely_ignored_by_the_pooling() -> None:
    """Changing what sits under the pad positions' embeddings must not reach the other positions:
    with a mask that let them attend to padding, the logits would move."""
    model = tiny()
    padded = torch.cat([tokens(2, 6, seed=3), torch.zeros(2, 4, dtype=torch.long)], dim=1)
    before = logits(model, padded)
    with torch.no_grad():
        model.embed.weight[0] = 5.0  # the padding row (kept at zero by padding_idx in training)
    torch.testing.assert_close(logits(model, padded), before, atol=1e-5, rtol=0)


def test_an_all_padding_row_gives_the_head_bias_not_nan() -> None:
    model = tiny()
    batch = torch.cat([torch.zeros(1, 8, dtype=torch.long), tokens(1, 8)])
    out = logits(model, batch)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], model.head.bias.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("training", [False, True])
def test_the_export_safe_layer_computes_what_torch_encoder_computes(training: bool) -> None:
    """``_encoder_layer`` re-states ``nn.TransformerEncoderLayer``'s forward so it exports with a
    symbolic sequence axis; on the layer's own weights it must give torch's answer (eval: at the
    non-padding positions, which are all the pooling reads; train, dropout 0: everywhere)."""
    model = tiny()
    model.train(training)
    x = torch.randn(3, 10, TINY["width"])
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 6:] = True
    pad[2, 2:] = True
    from ferry.zoo import _encoder_layer

    with torch.no_grad():
        ours = x
        for layer in model.encoder.layers:
            ours = _encoder_layer(layer, ours, pad)
        theirs = model.encoder(x, src_key_padding_mask=pad)
    keep = ~pad if not training else torch.ones_like(pad)
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-5)


def test_dropout_is_active_in_training_only() -> None:
    model = tiny(dropout=0.5)
    x = tokens(4, 12)
    torch.testing.assert_close(logits(model, x), logits(model, x))
    model.train()
    torch.manual_seed(1)
    first = logits(model, x)
    assert not torch.allclose(first, logits(model, x))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 30, "heads": 4}, r"param 'width' \(30\) must be divisible by 'heads' \(4\)"),
        (
            {"layers": 13},
            r"param 'layers' must be an integer in \[1, 12\] \(BERT-base size at most\), got 13",
        ),
        ({"width": 1024, "heads": 8}, r"param 'width' must be an integer in \[1, 768\].*got 1024"),
        ({"heads": 16, "width": 64}, r"param 'heads' must be an integer in \[1, 12\].*got 16"),
        ({"max_len": 513}, r"param 'max_len' must be an integer in \[1, 512\].*got 513"),
        ({"ff": 4096}, r"param 'ff' must be an integer in \[1, 3072\].*got 4096"),
        ({"layers": 0}, r"param 'layers' must be an integer in \[1, 12\].*got 0"),
        ({"width": "64"}, r"param 'width' must be an integer in \[1, 768\].*got '64'"),
        ({"heads": True}, r"param 'heads' must be an integer .*got True"),
        ({"vocab_size": 300_000}, r"param 'vocab_size' must be an integer in \[1, 262144\], got 300000"),
        ({"dropout": 1.0}, r"param 'dropout' must lie in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"param 'dropout' must lie in \[0, 1\), got -0.1"),
    ],
)
def test_bad_params_are_invalid_argument_naming_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        build_model({"arch": "transformer_text", "params": {**TINY, **changes}})
    with pytest.raises(InvalidArgument, match=message):
        parameter_count("transformer_text", {**TINY, **changes})  # refused before anything is built


def test_an_unknown_param_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match=r"model 'transformer_text': bad parameters .*'depth'"):
        build_model({"arch": "transformer_text", "params": {**TINY, "depth": 3}})


def _formula(v: int, c: int, w: int, n: int, f: int, p: int) -> int:
    """Parameters by hand: embeddings and their norm; per layer the q/k/v and output projections,
    the feed-forward pair and two norms; the head."""
    per_layer = (3 * w * w + 3 * w) + (w * w + w) + (w * f + f) + (f * w + w) + 4 * w
    return v * w + p * w + 2 * w + n * per_layer + w * c + c


@pytest.mark.parametrize(
    "params",
    [
        TINY,
        {"vocab_size": 64, "num_classes": 4, "width": 32, "layers": 2, "heads": 4, "ff": 64, "max_len": 32},
        {"vocab_size": 8000, "num_classes": 5, "width": 256, "layers": 4, "heads": 4},  # ff 1024, max_len 128
    ],
)
def test_parameter_count_is_the_built_models(params: dict[str, Any]) -> None:
    model = build_model({"arch": "transformer_text", "params": params})
    assert parameter_count("transformer_text", params) == count_parameters(model)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    full = {"width": 64, "layers": 2, "heads": 4, "max_len": 128, **params}
    w = full["width"]
    expected = _formula(
        full["vocab_size"], full["num_classes"], w, full["layers"], full.get("ff", 4 * w), full["max_len"]
    )
    assert count_parameters(model) == expected


def test_parameter_count_of_bert_base_without_allocating_it() -> None:
    """BERT-base's shape at the bounds (30,522 WordPiece ids, 2 classes): counted on the meta
    device, so its 436 MB of weights are never allocated. (BERT-base's own 109.5M adds
    token-type embeddings and a pooler layer, which this encoder does not have.)"""
    bert = {"vocab_size": 30522, "num_classes": 2, "width": 768, "layers": 12, "heads": 12, "max_len": 512}
    count = parameter_count("transformer_text", bert)
    assert count == _formula(30522, 2, 768, 12, 3072, 512) == 108_891_650
    at_limits = {
        k: TRANSFORMER_LIMITS[k] for k in ("vocab_size", "width", "layers", "heads", "ff", "max_len")
    }
    assert parameter_count("transformer_text", {**at_limits, "num_classes": 2}) == _formula(
        262_144, 2, 768, 12, 3072, 512
    )
    assert parameter_count("lstm_text", {"vocab_size": 64, "num_classes": 4}) == count_parameters(
        build_model({"arch": "lstm_text", "params": {"vocab_size": 64, "num_classes": 4}})
    )


# --- the trainer's spec check ---------------------------------------------------------------------


def _spec(tmp_path: Path, params: dict[str, Any], dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = {
        "model": {"arch": "transformer_text", "params": params},
        "dataset": dataset or {"name": "synthetic_tokens", "params": {"samples": 200, "seq_len": 16}},
    }
    return normalize_spec(raw, tmp_path)


def test_spec_fills_vocab_and_classes_and_counts_the_model(tmp_path: Path) -> None:
    params = {"width": 32, "layers": 2, "heads": 4, "ff": 64, "max_len": 32}
    spec = _spec(tmp_path, params)
    assert spec["model"] == {
        "arch": "transformer_text",
        "params": {**params, "vocab_size": 64, "num_classes": 4},
    }
    assert spec["input"] == {"name": "input", "datatype": "INT64", "shape": [-1]}
    assert spec["model_parameters"] == parameter_count("transformer_text", spec["model"]["params"]) == 20_356
    assert model_size(json.dumps(spec)) == "model transformer_text: 20,356 parameters"


def test_spec_refuses_sequences_over_max_len(tmp_path: Path) -> None:
    with pytest.raises(
        InvalidArgument,
        match=r"model 'transformer_text' takes sequences up to max_len=8 but dataset 'synthetic_tokens' "
        r"has sequences of length 16 \(feature shape \[16\]\); raise max_len",
    ):
        _spec(tmp_path, {"width": 16, "heads": 2, "max_len": 8})


def test_spec_refuses_bad_params_and_float_features(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"param 'width' \(30\) must be divisible by 'heads' \(4\)"):
        _spec(tmp_path, {"width": 30, "heads": 4})
    with pytest.raises(InvalidArgument, match=r"takes token ids \[sequence\] but dataset 'iris' has float"):
        _spec(tmp_path, {}, {"name": "iris"})
    with pytest.raises(
        InvalidArgument, match=r"takes vocab_size=10 but dataset 'synthetic_tokens' has token"
    ):
        _spec(tmp_path, {"vocab_size": 10})


def test_the_cli_size_line() -> None:
    spec = {"model": {"arch": "transformer_text", "params": {}}, "model_parameters": 108_891_650}
    assert model_size(json.dumps(spec)) == "model transformer_text: 108,891,650 parameters"
    assert model_size(json.dumps({"model": {"factory": "pkg.mod:make", "params": {}}})) == ""
    assert model_size("") == model_size("not json") == ""


# --- export ---------------------------------------------------------------------------------------


def test_the_exported_graph_keeps_batch_and_sequence_symbolic(tmp_path: Path) -> None:
    """Traced at batch 2, length 12; run at other batches and lengths, padded rows and an all-pad
    row included, it gives torch's logits (the exporter's fp32 tolerance, 1e-4)."""
    model = tiny()
    path = tmp_path / "t.onnx"
    torch_to_onnx(model, tokens(2, 12).numpy(), path, 17, ("input", "logits"), {0: "batch", 1: "sequence"})
    session = ort_session(path)
    rng = np.random.default_rng(4)
    for rows, length in ((1, 1), (5, 3), (3, 12), (7, 40)):
        x = rng.integers(1, TINY["vocab_size"], (rows, length))
        x[0, length // 2 + 1 :] = 0  # one right-padded row
        if rows > 2:
            x[-1] = 0  # and one of nothing but padding
        got = session.run(None, {"input": x})[0]
        np.testing.assert_allclose(got, logits(model, torch.from_numpy(x)).numpy(), atol=1e-4, rtol=1e-4)
