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


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "lstm_text": LSTMText,
    "embedding_bag_text": EmbeddingBagText,
}


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
