"""Caption tokenisation: a thin wrapper over transformers' ``CLIPTokenizer`` read from a local folder.

The folder is a diffusers ``tokenizer/`` (or ``tokenizer_2/``) folder: ``vocab.json`` + ``merges.txt``
(+ optional ``tokenizer_config.json`` / ``special_tokens_map.json``, which set e.g. SDXL
tokenizer_2's ``!`` pad token). Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from os import PathLike

import numpy as np

CLIP_MAX_LENGTH = 77
_NO_TORCH_NOTICE = "PyTorch was not found."


class _DropNoTorchNotice(logging.Filter):
    """Drops transformers' import-time "PyTorch was not found. Models won't be available ..." notice: we use
    transformers for its tokenizer only, so torch's absence is expected and the notice reads like a broken
    install. Every other transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NO_TORCH_NOTICE)


def _import_clip_tokenizer():
    # transformers logs the notice on its package logger while ``import transformers`` runs, so the filter
    # goes on that logger before the import (logging.getLogger hands transformers the same object later).
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropNoTorchNotice) for f in logger.filters):
        logger.addFilter(_DropNoTorchNotice())
    from transformers import CLIPTokenizer

    return CLIPTokenizer


class CaptionTokenizer:
    """Captions -> int32 token ids ``[B, max_length]``: BOS ... EOS, padded with the pad token and
    truncated to ``max_length`` (EOS kept as the last token), like diffusers' training scripts."""

    def __init__(self, folder: str | PathLike, max_length: int = CLIP_MAX_LENGTH):
        CLIPTokenizer = _import_clip_tokenizer()
        folder = os.fspath(folder)
        has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
        # transformers 4 wrote vocab.json + merges.txt; transformers 5 may write tokenizer.json alone.
        if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
            raise FileNotFoundError(f"tokenizer folder {folder!r} has neither tokenizer.json nor vocab.json + merges.txt")
        self.folder = folder
        self.max_length = int(max_length)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        self._empty_ids = self._encode([""])[0]
        self._empty_ids.setflags(write=False)

    def _encode(self, captions: Sequence[str]) -> np.ndarray:
        encoded = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="np",
        )
        return np.asarray(encoded["input_ids"], dtype=np.int32)

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        """int32 ``[len(captions), max_length]``."""
        if isinstance(captions, str):
            raise TypeError("pass a sequence of captions, not a single string")
        if len(captions) == 0:
            return np.zeros((0, self.max_length), np.int32)
        return self._encode(captions)

    @property
    def empty_ids(self) -> np.ndarray:
        """Ids of the empty caption ``""`` (``[max_length]`` int32): what a dropped caption becomes."""
        return self._empty_ids

    def __repr__(self) -> str:
        return f"CaptionTokenizer({self.folder!r}, max_length={self.max_length})"
