"""Tokenizers that travel with a model version: fitted by the trainer, used by the worker.

A text model reads token ids, so a client that tokenizes differently from the trainer gets
wrong answers without any error. Ferry keeps the tokenizer in the model version instead
(``tokenizer.json``, the Hugging Face ``tokenizers`` format): the trainer fits it on the
training texts (``fit_tokenizer``), the exporter publishes it beside ``model.onnx``, and the
worker turns raw texts into ids with it (``TextEncoder``). Everything runs offline.

Fitting is not reproducible: the WordPiece trainer numbers tokens of equal frequency in a
different order in each process. So a tokenizer is fitted once per job and saved, and every
later step (the job's ranks, a resume, the exporter, the worker) loads that file.

The ids follow one convention, the one ``ferry.zoo``'s text models read: ``[PAD]`` is id 0,
and a text is ``[CLS] tokens [SEP]``. Pure apart from reading a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferry.core.errors import InvalidArgument

TOKENIZER_FILE = "tokenizer.json"
KINDS = ("wordpiece", "bpe")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # in id order: [PAD] is 0
PAD_ID = 0
MAX_TOKENIZER_BYTES = 64 << 20  # a BERT-base vocabulary is under 1 MiB
MAX_VOCAB = 1_000_000
MIN_VOCAB = len(SPECIALS) + 1


def blank_text(name: str, row: int) -> str:
    """The one message for a text with nothing to classify, wherever it is found."""
    return f"input {name!r}: text {row} has nothing to classify (it is empty or only whitespace)"


def find_tokenizer(version_dir: Path) -> Path | None:
    """A version's ``tokenizer.json``: its own, else its model's (one shared by every version)."""
    return next(
        (d / TOKENIZER_FILE for d in (version_dir, version_dir.parent) if (d / TOKENIZER_FILE).is_file()),
        None,
    )


@dataclass(frozen=True)
class TokenizerConfig:
    """How a job's tokenizer is fitted; ``vocab_size`` is an upper bound (a small corpus gives fewer)."""

    kind: str = "wordpiece"
    vocab_size: int = 8000
    lowercase: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "lowercase": self.lowercase}


def tokenizer_config(raw: dict[str, Any] | None) -> TokenizerConfig:
    """A job spec's ``tokenizer`` entry, checked; absent or zero fields take the defaults."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise InvalidArgument(f"tokenizer must be a JSON object, not {type(raw).__name__}")
    unknown = sorted(set(raw) - {"kind", "vocab_size", "lowercase"})
    if unknown:
        raise InvalidArgument(
            f"tokenizer has unknown field(s) {unknown}; it takes kind, vocab_size, lowercase"
        )
    kind = raw.get("kind") or TokenizerConfig.kind
    if kind not in KINDS:
        raise InvalidArgument(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    vocab = raw.get("vocab_size") or TokenizerConfig.vocab_size
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not MIN_VOCAB <= vocab <= MAX_VOCAB:
        raise InvalidArgument(
            f"tokenizer vocab_size must be an integer in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab!r}"
        )
    lowercase = raw.get("lowercase", True)
    if not isinstance(lowercase, bool):
        raise InvalidArgument(f"tokenizer lowercase must be true or false, got {lowercase!r}")
    return TokenizerConfig(kind, vocab, lowercase)


def fit_tokenizer(texts: Sequence[str], config: TokenizerConfig) -> Any:
    """A tokenizer fitted on ``texts`` (a ``tokenizers.Tokenizer``), in Ferry's id convention."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = list(SPECIALS)
    tokenizer: Any
    trainer: Any
    if config.kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(
            vocab_size=config.vocab_size, special_tokens=specials, show_progress=False
        )
        tokenizer.decoder = decoders.WordPiece()
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size, special_tokens=specials, show_progress=False
        )
        tokenizer.decoder = decoders.BPEDecoder()
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=config.lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tokenizer


def read_tokenizer(path: Path) -> Any:
    """Load ``tokenizer.json``; a missing, oversized or unreadable file is INVALID_ARGUMENT naming
    the file and the problem (the worker reports its version UNAVAILABLE with that reason)."""
    from tokenizers import Tokenizer

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InvalidArgument(f"{path.name} is missing (looked for {path})") from None
    if size > MAX_TOKENIZER_BYTES:
        raise InvalidArgument(f"{path.name} is {size} bytes, over the limit of {MAX_TOKENIZER_BYTES}")
    try:
        return Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"{path.name} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except Exception as err:  # the library raises a bare Exception with serde's message
        raise InvalidArgument(f"{path.name} is not a readable tokenizer: {str(err)[:300]}") from err


@dataclass(frozen=True)
class Encoded:
    """A batch of texts as a model reads them, padded on the right to the longest."""

    ids: np.ndarray  # [rows, length] int64
    mask: np.ndarray  # [rows, length] int64: 1 for a token, 0 for padding
    type_ids: np.ndarray  # [rows, length] int64, zeros for a single text
    truncated: tuple[int, ...]  # rows cut to max_length


class TextEncoder:
    """One loaded tokenizer, set to truncate at ``max_length`` and pad to the batch's longest text.

    ``encode`` is safe from several threads at once (the tokenizer is only configured here), and
    ``encode_batch`` spreads a batch over the library's own native threads with the GIL released.
    """

    def __init__(self, tokenizer: Any, max_length: int, pad_id: int | None = None) -> None:
        if max_length < 2:
            raise InvalidArgument(
                f"a text's max_length must be at least 2 ([CLS] and [SEP]), got {max_length}"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        found = tokenizer.token_to_id("[PAD]") if pad_id is None else pad_id
        self.pad_id = PAD_ID if found is None else int(found)
        tokenizer.enable_truncation(max_length)
        pad_token = tokenizer.id_to_token(self.pad_id) or "[PAD]"
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad_token)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, texts: Sequence[str], name: str = "text") -> Encoded:
        """Token ids of ``texts``; a text with no token but the specials (empty, only spaces or only
        characters the normaliser drops) is INVALID_ARGUMENT naming its row, since its answer would
        be the model's bias alone."""
        if not texts:
            raise InvalidArgument(f"input {name!r} holds no text")
        encodings = self.tokenizer.encode_batch(list(texts))
        rows, length = len(encodings), len(encodings[0].ids)
        ids = np.empty((rows, length), dtype=np.int64)
        mask = np.empty((rows, length), dtype=np.int64)
        type_ids = np.empty((rows, length), dtype=np.int64)
        truncated = []
        for r, enc in enumerate(encodings):
            ids[r] = enc.ids
            mask[r] = enc.attention_mask
            type_ids[r] = enc.type_ids
            if not any(m == 0 for m in enc.special_tokens_mask):
                raise InvalidArgument(blank_text(name, r))
            if enc.overflowing:
                truncated.append(r)
        return Encoded(ids, mask, type_ids, tuple(truncated))

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded ids per text, truncated as ``encode`` truncates (for datasets and tests)."""
        encoded = self.encode(texts)
        return [row[: int(m.sum())].tolist() for row, m in zip(encoded.ids, encoded.mask, strict=True)]
