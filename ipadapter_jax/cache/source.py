"""Training source over latent-cache shards: the webdataset source's ``ShardReader`` (shard order, exact
resume) and the shared ``BatchSource`` (counters, state, decode threads), with cached encodings decoded
instead of images.

Conditioning dropout is drawn exactly as ``examples.BatchCollator`` draws it (same seed, batch index and
process index, so the same examples lose their caption or image as on the online path): a dropped caption's
``text_context`` (and ``text_pooled``) become the empty caption's, here on the host, as the online collator
swaps in the empty caption's token ids; a dropped image is the ``drop_image`` flag the train step reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ipadapter_jax.cache.format import decode_cached_sample
from ipadapter_jax.data.conditioning_dropout import DropoutRates, sample_conditioning_drops
from ipadapter_jax.data.source import Record
from ipadapter_jax.data.webdataset_source import ShardSource


@dataclass(frozen=True)
class CachedExample:
    arrays: dict[str, np.ndarray]  # one example's cached members (see ``cache.format``)
    caption: str
    key: str


@dataclass(frozen=True)
class CachedBatchCollator:
    """Stacks cached examples and applies conditioning dropout. ``uncond_text``: ``text_context`` [T, D]
    (and SDXL's ``text_pooled`` [P]) of the empty caption."""

    uncond_text: dict[str, np.ndarray]
    dropout: DropoutRates | None = None
    dropout_seed: int = 0

    def __call__(self, examples: list[CachedExample], step: int, process_index: int = 0) -> dict:
        batch: dict[str, Any] = {k: np.stack([e.arrays[k] for e in examples]) for k in examples[0].arrays}
        batch["caption"] = [e.caption for e in examples]
        batch["key"] = [e.key for e in examples]
        n = len(examples)
        if self.dropout is None:
            drop_text, drop_image = np.zeros(n, bool), np.zeros(n, bool)
        else:
            drop_text, drop_image = sample_conditioning_drops(n, self.dropout, self.dropout_seed, step,
                                                              process_index)
        for name, empty in self.uncond_text.items():
            if name in batch:
                batch[name][drop_text] = empty
        batch["drop_text"], batch["drop_image"] = drop_text, drop_image
        return batch


class CachedSource(ShardSource):
    """Local cached batches from cache shards. ``shapes``: per-example shape of every member to read
    (``cache.format.cached_example_shapes``); a sample that does not match is skipped and counted as
    ``bad_cache_sample``. Other arguments as ``data.webdataset_source.ShardSource``."""

    def __init__(self, shards: str | Sequence[str], *, shapes: dict[str, tuple], collator: CachedBatchCollator,
                 **options: Any):
        shapes = {k: tuple(v) for k, v in shapes.items()}

        def decode(record: Record) -> CachedExample | str:
            arrays = decode_cached_sample(record.payload, shapes)
            if isinstance(arrays, str):
                return arrays
            return CachedExample(arrays, record.payload.get("txt", b"").decode("utf-8", errors="replace"), record.key)

        super().__init__(shards, decode, collator, **options)
