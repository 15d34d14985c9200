"""The built-in model zoo, shared by the trainer (to train) and the exporter (to rebuild).

This is the torch side of Ferry's contract between trainer and exporter: a
checkpoint's ``spec.json`` holds a ``model`` entry, either ``{"arch": NAME,
"params": {...}}`` for a zoo architecture or ``{"factory": "pkg.mod:fn",
"params": {...}}`` for a user's own, and ``build_model`` turns that entry back into
the same ``nn.Module`` on both sides. Only the trainer and the exporter import
this module; workers and the gateway never import torch.

A factory is code, so naming one in a job spec must not be a way to run code:
``build_model`` imports a factory only when its module lies under one of the
prefixes the operator allowed (``--allowed-factories``, empty by default), and
``check_factory`` refuses the rest before anything is imported.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ferry.core.errors import InvalidArgument, PermissionDenied

_FACTORY = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")


class MLP(nn.Module):
    """A plain multi-layer perceptron over flat features."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: list[int] | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden or [128, 64]:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """A small image classifier: conv blocks, global average pooling, a linear head."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: list[int] | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_channels
        for size in channels or [16, 32]:
            blocks += [nn.Conv2d(width, size, 3, padding=1), nn.BatchNorm2d(size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


class LSTMText(nn.Module):
    """A text classifier over token ids: embedding, LSTM, the last hidden state to classes."""

    def __init__(
        self, vocab_size: int, num_classes: int, embed_dim: int = 32, hidden: int = 64, layers: int = 1
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embed(tokens))
        return self.head(h[-1])


class LSTMTextStep(nn.Module):
    """An ``LSTMText`` that reads its text a piece at a time: tokens ``[batch, n]`` and the state
    ``(h, c)`` in, logits and the new state out. The state is batch-first (``[batch, layers,
    hidden]``, where the LSTM's own is layers-first), so a server keeping each sequence's state
    (Triton's sequence batching) can stack the states of different sequences into one batch.
    Fed a text piece by piece from zero state, it gives the logits ``LSTMText`` gives the whole."""

    def __init__(self, text: LSTMText) -> None:
        super().__init__()
        self.text = text

    def forward(
        self, tokens: torch.Tensor, h_in: torch.Tensor, c_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = (h_in.transpose(0, 1).contiguous(), c_in.transpose(0, 1).contiguous())
        _, (h, c) = self.text.lstm(self.text.embed(tokens), state)
        return self.text.head(h[-1]), h.transpose(0, 1), c.transpose(0, 1)


class EmbeddingBagText(nn.Module):
    """A bag-of-tokens text classifier: mean of token embeddings, then a linear head."""

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(dim=1))


# TransformerText's ceilings: BERT-base (width 768, 12 layers of 12 heads, ff 3072, 512 positions).
# The vocabulary ceiling covers the largest common WordPiece/BPE vocabularies (XLM-R's 250,002);
# at those ceilings the fp32 model stays near 1.1 GB, inside one ONNX protobuf (2 GB).
TRANSFORMER_LIMITS = {
    "vocab_size": 262_144,
    "num_classes": 100_000,
    "width": 768,
    "layers": 12,
    "heads": 12,
    "ff": 3072,
    "max_len": 512,
}
PAD_ID = 0  # the token id text datasets pad with (ferry.datasets never draws it as a token)


def _encoder_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """What ``layer(x, src_key_padding_mask=pad)`` computes (post-norm, eval or train), written
    with reshapes that keep the batch and sequence axes symbolic.

    ``nn.MultiheadAttention`` cannot be used as it is: under ``torch.onnx.export`` (TorchScript)
    its ``q.view(tgt_len, ...)`` bakes the traced sequence length into the graph (pytorch
    issues 99701, 117209), and in eval mode its fused fast paths
    (``_transformer_encoder_layer_fwd``, ``_native_multi_head_attention``) have no ONNX export
    at all. This runs the layer's own weights and submodules, so the state dict is the one
    ``nn.TransformerEncoder`` has, and eager torch (the parity gate's reference) runs exactly the
    graph that is exported. ``tests/unit/test_transformer_text.py`` checks it against the layer.
    """
    attn = layer.self_attn
    heads = attn.num_heads
    q, k, v = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    # [batch, seq, width] -> [batch, heads, seq, head_dim]; unflatten takes its sizes from the tensor
    q, k, v = (t.unflatten(-1, (heads, attn.head_dim)).transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-2, -1)) * (attn.head_dim**-0.5)
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    weights = nn.functional.dropout(scores.softmax(dim=-1), attn.dropout, attn.training)
    context = torch.matmul(weights, v).transpose(1, 2).flatten(2)
    x = layer.norm1(x + layer.dropout1(attn.out_proj(context)))
    ff = layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
    return layer.norm2(x + layer.dropout2(ff))


class TransformerText(nn.Module):
    """A BERT-style encoder classifier over token ids ``[batch, sequence]``.

    Token plus learned position embeddings, ``layers`` post-norm self-attention layers (GELU,
    ``nn.TransformerEncoderLayer`` weights, run by ``_encoder_layer``) that never attend to
    padding (token id 0), the mean of the non-padding positions, a linear head. Padding goes
    on the right: a text padded with any number of zeros gives the logits of the unpadded text,
    so texts of different lengths can share a batch. A row of padding only gives the head's
    bias. Sizes are bounded by ``TRANSFORMER_LIMITS`` (BERT-base); a size out of bounds is
    INVALID_ARGUMENT naming the parameter, before anything is allocated.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
        ff: int | None = None,
        max_len: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        ff = 4 * width if ff is None and _is_int(width) else ff
        sizes = {
            "vocab_size": vocab_size,
            "num_classes": num_classes,
            "width": width,
            "layers": layers,
            "heads": heads,
            "ff": ff,
            "max_len": max_len,
        }
        for key, value in sizes.items():
            high = TRANSFORMER_LIMITS[key]
            if not _is_int(value) or not 1 <= value <= high:  # type: ignore[operator]
                ceiling = "" if key in ("vocab_size", "num_classes") else " (BERT-base size at most)"
                raise InvalidArgument(
                    f"model 'transformer_text' param {key!r} must be an integer in [1, {high}]{ceiling}, "
                    f"got {value!r}"
                )
        if width % heads:
            raise InvalidArgument(
                f"model 'transformer_text' param 'width' ({width}) must be divisible by 'heads' ({heads})"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise InvalidArgument(
                f"model 'transformer_text' param 'dropout' must lie in [0, 1), got {dropout!r}"
            )
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)
        self.position = nn.Embedding(max_len, width)
        self.embed_norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=int(ff), dropout=dropout, activation="gelu", batch_first=True
        )
        # the container of the layers' weights; nested tensors are off (a fast path with no export)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if not torch.jit.is_tracing() and length > self.max_len:
            raise ValueError(f"sequence length {length} is over max_len {self.max_len}")
        pad = tokens == PAD_ID
        # A row of nothing but padding would mask every key, and softmax over no keys is NaN:
        # such a row attends to everything instead, and the pooling below still ignores it.
        attend_mask = pad & ~pad.all(dim=1, keepdim=True)
        positions = torch.arange(length, device=tokens.device)
        x = self.dropout(self.embed_norm(self.embed(tokens) + self.position(positions)))
        for layer in self.encoder.layers:
            x = _encoder_layer(layer, x, attend_mask)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "lstm_text": LSTMText,
    "embedding_bag_text": EmbeddingBagText,
    "transformer_text": TransformerText,
}


def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters alike: what the weights file holds, buffers aside."""
    return sum(p.numel() for p in model.parameters())


def parameter_count(arch: str, params: dict[str, Any]) -> int:
    """The parameter count of a zoo config, without allocating or training it: the model is
    built on torch's ``meta`` device, so even a BERT-base config answers in milliseconds.
    Bad params raise what ``build_model`` raises."""
    with torch.device("meta"):
        model = build_model({"arch": arch, "params": params})
    return count_parameters(model)


def check_factory(path: str, allowed: Sequence[str]) -> None:
    """Refuse a factory outside the allowed module prefixes, without importing anything.

    A prefix covers its module and the modules below it: ``pkg.models`` allows
    ``pkg.models:make`` and ``pkg.models.big:make``, not ``pkg.models_old:make``.
    """
    match = _FACTORY.match(path)
    if match is None:
        raise InvalidArgument(f"factory {path!r} must look like 'package.module:function'")
    module = match.group(1)
    prefixes = [p.strip() for p in allowed if p.strip()]
    if not any(module == p or module.startswith(p + ".") for p in prefixes):
        listed = ", ".join(prefixes) if prefixes else "none"
        raise PermissionDenied(
            f"factory {path!r} is not allowed here (allowed module prefixes: {listed}); job specs name "
            f"zoo architectures ({', '.join(sorted(ARCHITECTURES))}) unless the operator allows "
            "factories with --allowed-factories"
        )


def load_factory(path: str, allowed: Sequence[str]) -> Callable[..., nn.Module]:
    """Import an allowed ``package.module:function``; one that does not import is the spec's mistake."""
    check_factory(path, allowed)
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise InvalidArgument(f"factory {path!r} does not import: {err}") from err
    if not callable(factory):
        raise InvalidArgument(f"factory {path!r} is not callable")
    return factory


def build_model(entry: dict[str, Any], allowed_factories: Sequence[str] = ()) -> nn.Module:
    """Build the module a ``spec.json`` ``model`` entry describes; factories only when allowed."""
    params = dict(entry.get("params", {}))
    if "factory" in entry:
        model = load_factory(str(entry["factory"]), allowed_factories)(**params)
    else:
        arch = entry.get("arch")
        if arch not in ARCHITECTURES:
            raise InvalidArgument(f"unknown model {arch!r}; the zoo has {', '.join(sorted(ARCHITECTURES))}")
        try:
            model = ARCHITECTURES[arch](**params)
        except TypeError as err:
            raise InvalidArgument(f"model {arch!r}: bad parameters {params}: {err}") from err
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"model entry {entry} did not build a torch.nn.Module")
    return model
