"""Streaming, exactly resumable training source over webdataset tar shards (host-side numpy).

Order: this process's shards (see `shards.shards_for_process`) are visited in a per-epoch
permutation ``shard_order(n, seed, epoch)``; samples inside a shard in stored order. There is no
sample-level shuffle buffer: mixing comes from the shard order, so write shards from a shuffled
list (``make_shards --shuffle``) and keep them small enough that there are many per host.

Resume: the state is a cursor (epoch, position in that epoch's shard order, samples already taken
from that shard), the number of batches emitted (it seeds conditioning dropout) and the counters.
Restoring re-opens the shard and skips the taken samples without decoding them, so the batches
after a restore equal those of an uninterrupted run. Decoding may run ahead in threads; the state
only ever reflects what went into emitted batches.

Every sample that cannot be used, and every shard that fails, is counted by reason in
``counters`` (see `counters.SKIP_REASONS`) and skipped; the source raises only if a whole epoch
yields nothing (all shards broken) or on configuration errors.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ipadapter_jax.data.counters import SampleCounters
from ipadapter_jax.data.examples import BatchCollator, Example, ExampleProcessor
from ipadapter_jax.data.image_ops import ImageDecodeError
from ipadapter_jax.data.shards import resolve_process, shards_for_process
from ipadapter_jax.data.tar_samples import ShardError, iter_shard_samples, sample_caption, sample_image_bytes

STATE_FORMAT = "ipadapter_jax.webdataset_source/1"
logger = logging.getLogger(__name__)


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Positions -> shard indices for one epoch: a permutation that is a function of (seed, epoch)."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(num_shards)


@dataclass(frozen=True)
class _Item:
    cursor_after: tuple[int, int, int]  # (epoch, shard_position, sample_index) once this is consumed
    kind: str  # "sample" or "shard_end"
    payload: Any  # raw sample dict, or the shard's failure reason (None when it ended cleanly)
    rng_key: tuple[int, int, int] | None = None


def process_raw_sample(
    processor: ExampleProcessor, json_field: str | None, sample: dict, rng: np.random.Generator
) -> Example | str:
    """One raw webdataset sample (member name -> bytes) as an ``Example``, or the reason to skip it (a counter
    name from ``data.counters``)."""
    image_bytes = sample_image_bytes(sample)
    if image_bytes is None:
        return "missing_image"
    caption, reason = sample_caption(sample, json_field)
    if reason is not None:
        return reason
    try:
        return processor.process(image_bytes, caption, sample["__key__"], rng)
    except ImageDecodeError as exc:
        return exc.reason


class WebDatasetSource:
    """Iterator of local batches (see `examples` for the batch layout) from webdataset shards.

    Args:
      shards: shard spec (see `shards.expand_shard_spec`).
      global_batch_size: batch over all processes; each process yields
        ``global_batch_size // process_count`` examples per batch (must divide).
      processor: image decoding / crops / CLIP preprocessing.
      collator: tokenisation and conditioning dropout.
      seed: shard-order and random-crop seed.
      shuffle_shards: permute the shard order every epoch.
      caption_json_field: take the caption from this field of the ``json`` member instead of ``txt``.
      num_epochs: stop after this many epochs (the last partial batch is dropped); None = forever.
      process_index, process_count: default to jax.process_index() / jax.process_count().
      equal_shard_counts: drop trailing shards so every process has the same number.
      num_decode_threads: threads decoding ahead of the consumer (0 = decode inline, on demand).
      lookahead: samples decoded ahead when threaded (default 2 local batches).
      state: a dict from `get_state` to continue from.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        global_batch_size: int,
        processor: ExampleProcessor,
        collator: BatchCollator,
        seed: int = 0,
        shuffle_shards: bool = True,
        caption_json_field: str | None = None,
        num_epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        equal_shard_counts: bool = False,
        num_decode_threads: int = 8,
        lookahead: int | None = None,
        state: dict | None = None,
    ):
        self.process_index, self.process_count = resolve_process(process_index, process_count)
        if global_batch_size % self.process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by process_count {self.process_count}"
            )
        self.local_batch_size = global_batch_size // self.process_count
        if self.local_batch_size < 1:
            raise ValueError("global_batch_size must be >= process_count")
        self.shards = shards_for_process(
            shards, self.process_index, self.process_count, equal_counts=equal_shard_counts
        )
        self.processor = processor
        self.collator = collator
        self.seed = int(seed)
        self.shuffle_shards = shuffle_shards
        self.caption_json_field = caption_json_field
        self.num_epochs = num_epochs
        self._threads = int(num_decode_threads)
        self._lookahead = int(lookahead) if lookahead is not None else 2 * self.local_batch_size
        self._executor = ThreadPoolExecutor(self._threads) if self._threads > 0 else None

        self._cursor = (0, 0, 0)
        self._batches_emitted = 0
        self.counters = SampleCounters()
        if state is not None:
            self._load_state(state)
        self._items: Iterator[_Item] | None = None
        self._pending: collections.deque = collections.deque()
        # Counts epoch boundaries crossed since the last usable sample; starting at an epoch start
        # counts as one, so a second crossing means a full epoch gave nothing.
        self._epochs_without_example = 1 if self._cursor[1:] == (0, 0) else 0

    # ----------------------------------------------------------------------------------- state
    def _fingerprint(self) -> dict:
        digest = hashlib.sha1("\n".join(self.shards).encode("utf-8")).hexdigest()
        return {
            "shards_sha1": digest,
            "num_shards": len(self.shards),
            "seed": self.seed,
            "shuffle_shards": self.shuffle_shards,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "local_batch_size": self.local_batch_size,
        }

    def get_state(self) -> dict:
        """JSON-serialisable position after the last emitted batch."""
        epoch, position, index = self._cursor
        return {
            "format": STATE_FORMAT,
            "epoch": epoch,
            "shard_position": position,
            "sample_index": index,
            "batches_emitted": self._batches_emitted,
            "counters": self.counters.to_dict(),
            "fingerprint": self._fingerprint(),
        }

    def _load_state(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a webdataset source state: format={state.get('format')!r}")
        expected, found = self._fingerprint(), state.get("fingerprint", {})
        diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
        if diff:
            raise ValueError(
                f"state was saved for a different shard list/seed/process layout: {diff} (saved, now)"
            )
        self._cursor = (int(state["epoch"]), int(state["shard_position"]), int(state["sample_index"]))
        self._batches_emitted = int(state["batches_emitted"])
        self.counters = SampleCounters.from_dict(state.get("counters", {}))

    @property
    def epoch(self) -> int:
        return self._cursor[0]

    @property
    def batches_emitted(self) -> int:
        return self._batches_emitted

    # -------------------------------------------------------------------------------- reading
    def _raw_items(self, start: tuple[int, int, int]) -> Iterator[_Item]:
        epoch, position, to_skip = start
        num_shards = len(self.shards)
        while self.num_epochs is None or epoch < self.num_epochs:
            order = shard_order(num_shards, self.seed, epoch, self.shuffle_shards)
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
                            yield _Item((epoch, position, index), "sample", sample, (epoch, position, index - 1))
                except ShardError as exc:
                    failure = exc.reason
                    logger.warning("skipping the rest of a shard: %s", exc)
                yield _Item(after, "shard_end", failure)
                to_skip = 0
                position += 1
            epoch, position = epoch + 1, 0

    def _work(self, item: _Item) -> Example | str:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, *item.rng_key, 0x5EED]))
        return process_raw_sample(self.processor, self.caption_json_field, item.payload, rng)

    def _fill(self) -> None:
        while len(self._pending) < max(1, self._lookahead):
            try:
                item = next(self._items)
            except StopIteration:
                return
            if item.kind == "sample" and self._executor is not None:
                self._pending.append((item, self._executor.submit(self._work, item)))
            else:
                self._pending.append((item, None))
            if self._executor is None:
                return

    def _next_outcome(self) -> tuple[_Item, Any]:
        if self._items is None:
            self._items = self._raw_items(self._cursor)
        if not self._pending:
            self._fill()
        if not self._pending:
            raise StopIteration
        item, future = self._pending.popleft()
        if self._executor is not None:
            self._fill()
        if item.kind != "sample":
            return item, item.payload
        result = future.result() if isinstance(future, Future) else self._work(item)
        return item, result

    def _consume(self, item: _Item, result: Any) -> Any:
        old_epoch = self._cursor[0]
        self._cursor = item.cursor_after
        example = None
        if item.kind == "shard_end":
            self.counters.shards_finished += 1
            if result is not None:
                self.counters.skip(result)
        elif isinstance(result, str):  # a skip reason
            self.counters.skip(result)
        else:  # an Example (or a subclass's decoded sample, e.g. `cached_source`)
            example = result
            self.counters.used += 1
            self.counters.convert(getattr(result, "conversion", ""))
            self._epochs_without_example = 0
        if self._cursor[0] != old_epoch:
            self._epochs_without_example += 1
            if self._epochs_without_example >= 2:
                raise RuntimeError(
                    f"a whole epoch over {len(self.shards)} shard(s) gave no usable sample; "
                    f"counters: {self.counters.to_dict()}"
                )
        return example

    def __iter__(self) -> "WebDatasetSource":
        return self

    def __next__(self) -> dict:
        examples: list = []
        while len(examples) < self.local_batch_size:
            item, result = self._next_outcome()
            example = self._consume(item, result)
            if example is not None:
                examples.append(example)
        batch = self.collator(examples, step=self._batches_emitted, process_index=self.process_index)
        self._batches_emitted += 1
        batch["counters"] = self.counters.to_dict()
        return batch

    def close(self) -> None:
        """Stop decode threads and close the open shard."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._items is not None:
            self._items.close()
        self._pending.clear()

    def __enter__(self) -> "WebDatasetSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
