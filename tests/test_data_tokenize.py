"""CaptionTokenizer over a tiny locally written CLIP BPE tokenizer (the toy tokenizer writer, four words)."""

import numpy as np
import pytest

from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.toy.toy_tokenizer import write_toy_tokenizer

WORDS = ("cat", "dog", "the", "red")  # whole-word tokens; every other word splits into characters


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CaptionTokenizer(write_toy_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", WORDS))


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
    short = CaptionTokenizer(write_toy_tokenizer(tmp_path / "t", WORDS), max_length=8)
    assert short(["a cat"]).shape == (1, 8)
    assert short([]).shape == (0, 8)
    with pytest.raises(TypeError):
        short("a cat")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "vocab.json").write_text("{}")
        CaptionTokenizer(tmp_path / "empty")


# Runs with torch hidden (sys.modules["torch"] = None makes ``import torch`` fail, as on a machine without
# it) and prints what stderr got; the first variant imports transformers the way CaptionTokenizer does.
_WITHOUT_TORCH = r"""
import sys
sys.modules["torch"] = None
if sys.argv[1] == "ours":
    from ipadapter_jax.data.tokenize import CaptionTokenizer
    ids = CaptionTokenizer("ipadapter_jax/assets/toy/base/tokenizer")(["a red circle"])
    assert ids.shape == (1, 77), ids.shape
    import transformers.utils.logging as tl
    tl.get_logger("transformers").warning("another transformers warning")  # must still show
else:
    import transformers
"""


@pytest.mark.parametrize("how", ["ours", "plain"])
def test_no_torch_notice_is_silenced_and_nothing_else(how):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, how], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if how == "ours":
        assert "PyTorch was not found" not in proc.stderr, proc.stderr
        assert "another transformers warning" in proc.stderr, proc.stderr  # the filter is that narrow
    else:  # the control: without our import path transformers does print it, so the check above can fail
        assert "PyTorch was not found" in proc.stderr, proc.stderr
