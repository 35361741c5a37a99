"""A CLIP-format BPE tokenizer folder whose merges turn each toy-world word into one token.

CLIP's tokenizer is byte-level BPE with ``</w>`` marking the end of a word: ``vocab.json`` maps tokens to ids
and ``merges.txt`` lists merges in priority order. Here the base vocabulary is every printable ASCII
character (with and without ``</w>``), so any text tokenizes, and the merges are built word by word so that
each word of ``WORDS`` ends as a single token; a word-level vocabulary keeps the mini text encoder's job
easy. ``<|startoftext|>`` and ``<|endoftext|>`` take the two highest ids, as in OpenAI's CLIP, so pooling at
the first EOS and pooling at the highest id (transformers' legacy rule) agree.

The folder also gets ``tokenizer_config.json`` (``model_max_length`` 77: diffusers pads prompts to it) and
``special_tokens_map.json``; it loads with transformers' ``CLIPTokenizer.from_pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ipadapter_jax.toy.shapes_dataset import BACKGROUNDS, COLOURS, SHAPES

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_EXTRA_WORDS = ("a", "an", "the", "shape", "on", "of", "and", "with", "in", "photo", "picture", "background",
                "small", "big", "large", "left", "right", "top", "bottom", "centre", "center", "gray")
WORDS = tuple(dict.fromkeys(
    [*_EXTRA_WORDS, *COLOURS, *SHAPES, *(w for name in BACKGROUNDS for w in name.split())]))
# Printable ASCII except space: the pre-tokenizer splits on whitespace, and these bytes map to themselves
# in CLIP's byte-to-unicode table.
_BASE_CHARS = tuple(chr(c) for c in range(33, 127))


def _symbols(word: str) -> list[str]:
    return [*word[:-1], word[-1] + "</w>"]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as the tokenizers library runs it: repeatedly merge the adjacent pair of lowest rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Merges are appended word by word, each after all earlier ones, so a new merge can only fire once the
    earlier merges are exhausted: words already single tokens stay so."""
    vocab: dict[str, int] = {}
    for char in _BASE_CHARS:
        vocab[char] = len(vocab)
    for char in _BASE_CHARS:
        vocab[char + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_merges(_symbols(word), ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols[0:2] = [pair[0] + pair[1]]
            vocab.setdefault(symbols[0], len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_toy_tokenizer(folder: str | os.PathLike, words=WORDS) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
              "clean_up_tokenization_spaces": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def vocab_size(words=WORDS) -> int:
    return len(build_vocab_and_merges(words)[0])
