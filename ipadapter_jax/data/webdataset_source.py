"""Streaming, exactly resumable training source over webdataset tar shards (host-side numpy).

Order: this process's shards (see `shards.shards_for_process`) are visited in a per-epoch
permutation ``shard_order(n, seed, epoch)``; samples inside a shard in stored order. There is no
sample-level shuffle buffer: mixing comes from the shard order, so write shards from a shuffled
list (``make_shards --shuffle``) and keep them small enough that there are many per host.

Resume: the state is a cursor (epoch, position in that epoch's shard order, samples already taken
from that shard), the number of batches emitted (it seeds conditioning dropout) and the counters.
Restoring re-opens the shard and skips the taken samples without decoding them, so the batches
after a restore equal those of an uninterrupted run. Decoding ahead in threads, the counters and the
state are ``source.BatchSource``'s, shared with the TFDS and latent-cache sources; ``ShardReader`` (also the
latent cache's reader) is the webdataset part.

Every sample that cannot be used, and every shard that fails, is counted by reason in
``counters`` (see `counters.SKIP_REASONS`) and skipped; the source raises only if a whole epoch
yields nothing (all shards broken) or on configuration errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ipadapter_jax.data.examples import BatchCollator, Example, ExampleProcessor
from ipadapter_jax.data.shards import shards_for_process
from ipadapter_jax.data.source import BatchSource, Record, process_share, record_rng
from ipadapter_jax.data.tar_samples import ShardError, iter_shard_samples, sample_caption, sample_image_bytes

STATE_FORMAT = "ipadapter_jax.webdataset_source/1"
logger = logging.getLogger(__name__)


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Positions -> shard indices for one epoch: a permutation that is a function of (seed, epoch)."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(num_shards)


def process_raw_sample(
    processor: ExampleProcessor, json_field: str | None, sample: dict, rng: np.random.Generator
) -> Example | str:
    """One raw webdataset sample (member name -> bytes) as an ``Example``, or the reason to skip it (a counter
    name from ``data.counters``)."""
    image_bytes = sample_image_bytes(sample)
    if image_bytes is None:
        return "missing_image"
    caption, reason = sample_caption(sample, json_field)
    return reason or processor.process_or_skip(image_bytes, caption, sample["__key__"], rng)


class ShardReader:
    """The records of this process's shards: ``(epoch, shard_position, sample_index)`` positions, each shard's
    samples in stored order followed by a shard-end record (carrying the reason when the shard failed).
    Starting mid-shard re-opens it and skips the samples already taken without decoding them."""

    state_format = STATE_FORMAT
    position_fields = ("epoch", "shard_position", "sample_index")

    def __init__(self, shards: list[str], seed: int, shuffle: bool, num_epochs: int | None):
        self.shards, self.seed, self.shuffle, self.num_epochs = shards, int(seed), shuffle, num_epochs
        self.description = f"{len(shards)} shard(s)"

    def fingerprint(self) -> dict:
        return {"shards_sha1": hashlib.sha1("\n".join(self.shards).encode("utf-8")).hexdigest(),
                "num_shards": len(self.shards), "seed": self.seed, "shuffle_shards": self.shuffle}

    def records(self, start: tuple[int, ...]) -> Iterator[Record]:
        epoch, position, to_skip = start
        num_shards = len(self.shards)
        while self.num_epochs is None or epoch < self.num_epochs:
            order = shard_order(num_shards, self.seed, epoch, self.shuffle)
            while position < num_shards:
                url = self.shards[order[position]]
                after = (epoch, position + 1, 0) if position + 1 < num_shards else (epoch + 1, 0, 0)
                index, failure = 0, None
                try:
                    with contextlib.closing(iter_shard_samples(url)) as samples:
                        for sample in samples:
                            index += 1
                            if index <= to_skip:
                                continue
                            yield Record((epoch, position, index), sample, sample["__key__"],
                                         (epoch, position, index - 1))
                except ShardError as exc:
                    failure = exc.reason
                    logger.warning("skipping the rest of a shard: %s", exc)
                yield Record(after, shard_end=True, failure=failure)
                to_skip = 0
                position += 1
            epoch, position = epoch + 1, 0


class ShardSource(BatchSource):
    """A ``BatchSource`` over this process's share of the shard spec ``shards`` (``shards.shards_for_process``,
    read by a ``ShardReader``), each sample turned into an example by ``decode(record)``.

    Args:
      shards: shard spec (see `shards.expand_shard_spec`).
      decode: raw sample record -> example, or the reason to skip it (a counter name from ``data.counters``).
      collator: examples -> local batch (see `examples` for the online layout).
      global_batch_size: batch over all processes; each process yields
        ``global_batch_size // process_count`` examples per batch (must divide).
      seed: shard-order seed.
      shuffle_shards: permute the shard order every epoch.
      num_epochs: stop after this many epochs (the last partial batch is dropped); None = forever.
      process_index, process_count: default to jax.process_index() / jax.process_count().
      equal_shard_counts: drop trailing shards so every process has the same number.
      num_decode_threads: threads decoding ahead of the consumer (0 = decode inline, on demand).
      lookahead: samples decoded ahead when threaded (default 2 local batches).
      state: a dict from `get_state` to continue from.
    """

    def __init__(self, shards: str | Sequence[str], decode: Callable[[Record], Any], collator: Callable[..., dict],
                 *, global_batch_size: int, seed: int = 0, shuffle_shards: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 equal_shard_counts: bool = False, num_decode_threads: int = 8, lookahead: int | None = None,
                 state: dict | None = None):
        process_index, process_count, local = process_share(global_batch_size, process_index, process_count)
        self.shards = shards_for_process(shards, process_index, process_count, equal_counts=equal_shard_counts)
        super().__init__(ShardReader(self.shards, seed, shuffle_shards, num_epochs), decode, collator,
                         local_batch_size=local, process_index=process_index, process_count=process_count,
                         num_decode_threads=num_decode_threads, lookahead=lookahead, state=state)


class WebDatasetSource(ShardSource):
    """Local batches (see `examples` for the layout) from webdataset shards of images and captions: a
    ``ShardSource`` decoding with ``process_raw_sample``. ``processor``: image decoding, crops and CLIP
    preprocessing; ``collator``: tokenisation and conditioning dropout; ``seed`` also seeds the random crops;
    ``caption_json_field``: take the caption from this field of the ``json`` member instead of ``txt``. Other
    arguments as ``ShardSource``."""

    def __init__(self, shards: str | Sequence[str], *, processor: ExampleProcessor, collator: BatchCollator,
                 seed: int = 0, caption_json_field: str | None = None, **options: Any):
        def decode(record: Record) -> Example | str:
            return process_raw_sample(processor, caption_json_field, record.payload, record_rng(seed, record))

        super().__init__(shards, decode, collator, seed=seed, **options)
