"""CaptionTokenizer over a tiny locally written CLIP BPE tokenizer."""

import numpy as np
import pytest

from ipadapter_jax.data.synthetic import write_tiny_clip_tokenizer
from ipadapter_jax.data.tokenize import CaptionTokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CaptionTokenizer(write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


def test_shape_dtype_bos_eos_and_padding(tokenizer):
    ids = tokenizer(["a cat and the dog", ""])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    vocab = tokenizer.tokenizer.get_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tokens = tokenizer.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert tokens[:7] == ["<|startoftext|>", "a</w>", "cat</w>", "a", "n", "d</w>", "the</w>"]
    assert tokens[7:9] == ["dog</w>", "<|endoftext|>"]
    # CLIP pads with <|endoftext|>.
    assert (ids[0, 8:] == eos).all()
    assert ids[1, 0] == bos and (ids[1, 1:] == eos).all()
    np.testing.assert_array_equal(tokenizer.empty_ids, ids[1])


def test_case_and_whitespace_normalised_like_clip(tokenizer):
    a, b = tokenizer(["A  Cat\n", "a cat"])
    np.testing.assert_array_equal(a, b)


def test_truncation_keeps_eos_last(tokenizer):
    ids = tokenizer(["cat " * 200])[0]
    eos = tokenizer.tokenizer.get_vocab()["<|endoftext|>"]
    assert ids.shape == (77,) and ids[-1] == eos
    assert (ids[1:-1] == tokenizer.tokenizer.get_vocab()["cat</w>"]).all()


def test_matches_the_transformers_tokenizer_directly(tokenizer):
    captions = ["the red dog!", "cat, cat? 42"]
    expected = tokenizer.tokenizer(captions, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(tokenizer(captions), np.asarray(expected, np.int32))


def test_other_max_length_and_errors(tmp_path):
    short = CaptionTokenizer(write_tiny_clip_tokenizer(tmp_path / "t"), max_length=8)
    assert short(["a cat"]).shape == (1, 8)
    assert short([]).shape == (0, 8)
    with pytest.raises(TypeError):
        short("a cat")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "vocab.json").write_text("{}")
        CaptionTokenizer(tmp_path / "empty")
