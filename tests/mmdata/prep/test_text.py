"""Text: deterministic SentencePiece training, BOS/EOS, truncation, bad text reasons."""

import io

import numpy as np
import pytest

from mmdata.schema import SampleError
from mmdata.prep.text import TextConfig, encode_text, load_tokenizer, train_tokenizer

TEXTS = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "square")
         for p in ("left", "right", "top")] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(train_tokenizer(TEXTS, TextConfig(vocab_size=64)))


def test_training_is_deterministic():
    config = TextConfig(vocab_size=64)
    assert train_tokenizer(TEXTS, config) == train_tokenizer(TEXTS, config)
    assert train_tokenizer(TEXTS, config) != train_tokenizer(TEXTS + ["purple hexagon"], config)


def test_tokens_are_int32_npy_with_bos_and_eos(tokenizer):
    members, info = encode_text("a red circle on the left", TextConfig(), tokenizer)
    ids = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids[0] == tokenizer.bos_id() and ids[-1] == tokenizer.eos_id()
    assert info == {"n_tokens": len(ids), "truncated": False}
    assert members["txt"] == b"a red circle on the left"
    assert tokenizer.decode(ids[1:-1].tolist()) == "a red circle on the left"


def test_long_texts_are_truncated_to_max_tokens_keeping_eos(tokenizer):
    config = TextConfig(max_tokens=6)
    members, info = encode_text(" ".join(TEXTS[:5]), config, tokenizer)
    ids = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
    assert len(ids) == 6 and info["truncated"] and ids[-1] == tokenizer.eos_id()


def test_bos_eos_can_be_switched_off(tokenizer):
    members, _ = encode_text("blue square", TextConfig(add_bos=False, add_eos=False), tokenizer)
    ids = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
    assert tokenizer.bos_id() not in ids and tokenizer.eos_id() not in ids


@pytest.mark.parametrize("value, reason", [
    (b"caf\xe9 au lait", "invalid_utf8"),
    ("bad \udce9 surrogate", "invalid_utf8"),
    ("   ", "empty_text"),
    ("", "empty_text"),
    (42, "invalid_text"),
    ("x" * 50, "text_too_long"),
])
def test_bad_text_has_a_reason(tokenizer, value, reason):
    with pytest.raises(SampleError) as info:
        encode_text(value, TextConfig(max_chars=40), tokenizer)
    assert info.value.reason == reason


def test_non_ascii_text_survives(tokenizer):
    members, _ = encode_text("ünïcode ✓ 文字", TextConfig(), tokenizer)
    assert members["txt"].decode("utf-8") == "ünïcode ✓ 文字"
