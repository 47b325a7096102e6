"""Text: validate, tokenize with SentencePiece, serialise to ``.txt`` + ``.tokens.npy``.

The tokenizer is either a given ``.model`` file or trained on the input's
texts. Training is made deterministic by feeding sentences from an iterator
in input order (no sampling, one thread) and writing the model to memory,
so no file path ends up inside the model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import sentencepiece as spm

from mmdata.config import require, require_choice
from mmdata.schema import TEXT, TOKENS, SampleError


@dataclass
class TextConfig:
    tokenizer: str | None = None   # path/URL of a SentencePiece .model; None trains one on the input
    vocab_size: int = 4000
    model_type: str = "unigram"    # unigram | bpe | char | word
    character_coverage: float = 0.9995
    train_samples: int = 200_000   # texts used for training: the first N non-empty texts of the input
    max_tokens: int = 128          # token ids are truncated to this many (BOS/EOS included)
    add_bos: bool = True
    add_eos: bool = True
    max_chars: int = 20_000        # longer texts are bad input (reason text_too_long)
    on_error: str = "drop_modality"  # drop_modality | reject_sample

    def validate(self) -> None:
        # upper limits: the driver holds the training sample, and every model and batch holds vocabularies
        # and token rows of these sizes
        require(8 <= self.vocab_size <= 1_000_000, "vocab_size", f"must be between 8 and 1000000; got {self.vocab_size}")
        require_choice(self.model_type, "model_type", ("unigram", "bpe", "char", "word"))
        require(0.9 <= self.character_coverage <= 1.0, "character_coverage",
                f"must be between 0.9 and 1.0; got {self.character_coverage}")
        require(0 < self.train_samples <= 10_000_000, "train_samples",
                f"must be between 1 and 10000000; got {self.train_samples}")
        require(1 + self.add_bos + self.add_eos <= self.max_tokens <= 1_000_000, "max_tokens",
                f"must leave room for a token after BOS/EOS and be at most 1000000; got {self.max_tokens}")
        require(0 < self.max_chars <= 10_000_000, "max_chars", f"must be between 1 and 10000000; got {self.max_chars}")
        require_choice(self.on_error, "on_error", ("drop_modality", "reject_sample"))


def train_tokenizer(texts: Iterable[str], config: TextConfig) -> bytes:
    """Train a SentencePiece model on ``texts``; returns the serialised model."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=config.vocab_size,
        model_type=config.model_type,
        character_coverage=config.character_coverage,
        hard_vocab_limit=False,    # small corpora cannot fill a big vocabulary; don't fail on them
        input_sentence_size=0,     # use every sentence given: no random sampling
        shuffle_input_sentence=False,
        num_threads=1,
        max_sentence_length=1 << 16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        minloglevel=2,
    )
    return model.getvalue()


def load_tokenizer(model: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model)


def check_text(value: object) -> str:
    """The text as ``str``, or SampleError: invalid UTF-8, empty, not a string."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleError("invalid_utf8", f"text is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    if not isinstance(value, str):
        raise SampleError("invalid_text", f"text must be a string; got {type(value).__name__} {value!r:.40}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: undecodable bytes smuggled in by the reader
        raise SampleError("invalid_utf8", f"text is not valid UTF-8 (character {e.start})") from None
    if not value.strip():
        raise SampleError("empty_text", "text is empty or only whitespace")
    return value


def encode_text(value: object, config: TextConfig,
                tokenizer: spm.SentencePieceProcessor) -> tuple[dict[str, bytes], dict]:
    """Returns members ``{txt, tokens.npy}`` and info ``{n_tokens, truncated}``."""
    text = check_text(value)
    if len(text) > config.max_chars:
        raise SampleError("text_too_long", f"text has {len(text)} characters, over text.max_chars={config.max_chars}")
    ids = tokenizer.encode(text)
    room = config.max_tokens - config.add_bos - config.add_eos
    truncated = len(ids) > room
    ids = ([tokenizer.bos_id()] if config.add_bos else []) + ids[:room] + ([tokenizer.eos_id()] if config.add_eos else [])
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=np.int32), allow_pickle=False)
    members = {TEXT: text.encode("utf-8"), TOKENS: buf.getvalue()}
    return members, {"n_tokens": len(ids), "truncated": truncated}
