"""Feeding the train step: this process's training source (webdataset, TFDS or latent cache; any
``data.source.Source``), prefetched in a thread, assembled into global batches, each paired with the source's
state *after* it, so a checkpoint taken after step N stores exactly the position of N consumed batches however
far the prefetcher has read ahead.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, NamedTuple, Sequence

import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ipadapter_jax.cache.manifest import LatentCache
from ipadapter_jax.cache.source import CachedBatchCollator, CachedSource
from ipadapter_jax.data.conditioning_dropout import DropoutRates
from ipadapter_jax.data.examples import BatchCollator, ExampleProcessor
from ipadapter_jax.data.global_batch import make_global_batch
from ipadapter_jax.data.source import Source
from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.data.webdataset_source import WebDatasetSource
from ipadapter_jax.train.config import TrainConfig
from ipadapter_jax.train.frozen import FrozenModules


class FedBatch(NamedTuple):
    batch: dict  # global jax.Arrays, only the keys the step reads
    data_state: dict  # this process's source state after this batch
    counters: dict  # this process's sample counters after this batch (used / skipped by reason / ...)


def make_source(config: TrainConfig, modules: FrozenModules, shards: str | Sequence[str],
                state: dict | None = None, cache: LatentCache | None = None, **overrides: Any) -> Source:
    """This process's training source over ``shards``: a ``WebDatasetSource``; with an opened latent ``cache``, a
    ``CachedSource`` over the cache's shards; with ``data.tfds_name``, a ``TfdsSource`` over that prepared TFDS
    dataset (``shards`` is ignored in both; TensorFlow is imported only then). ``overrides`` go to the source."""
    data = config.data
    rates = DropoutRates(text=data.drop_text, image=data.drop_image, both=data.drop_both)
    common = dict(global_batch_size=config.batch_size, seed=config.seed, num_decode_threads=data.decode_threads,
                  state=state)
    if cache is not None:
        collator = CachedBatchCollator(cache.uncond_text, rates, dropout_seed=config.seed)
        return CachedSource(cache.shards, shapes=cache.shapes, collator=collator,
                            **{**common, "shuffle_shards": data.shuffle_shards, **overrides})
    tokenizer = CaptionTokenizer(modules.tokenizer_dir, max_length=modules.text_length)
    tokenizer_2 = (CaptionTokenizer(modules.tokenizer_2_dir, max_length=modules.text_length)
                   if modules.tokenizer_2_dir else None)
    common["collator"] = BatchCollator(tokenizer, tokenizer_2, rates, dropout_seed=config.seed)
    common["processor"] = ExampleProcessor(data.resolution, clip_config=modules.clip_image_config,
                                           random_crop=data.random_crop)
    if data.tfds_name:
        from ipadapter_jax.data.tfds_source import TfdsSource

        return TfdsSource(data.tfds_name, **{**common, "split": data.tfds_split,
                                             "data_dir": data.tfds_data_dir or None, "image_key": data.tfds_image_key,
                                             "caption_key": data.tfds_caption_key, **overrides})
    return WebDatasetSource(shards, **{**common, "shuffle_shards": data.shuffle_shards,
                                       "caption_json_field": data.caption_field or None, **overrides})


class DataFeed:
    """Iterator of ``FedBatch``; a daemon thread reads up to ``prefetch`` batches ahead (0: read inline)."""

    def __init__(self, source: Source, mesh: Mesh, batch_spec: PartitionSpec, keys: Sequence[str],
                 prefetch: int = 2):
        self.source = source
        self._mesh, self._spec, self._keys = mesh, batch_spec, tuple(keys)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread = None
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._fill, name="data-feed", daemon=True)
            self._thread.start()

    def _read_one(self) -> FedBatch:
        local = next(self.source)
        arrays = {k: np.asarray(local[k]) for k in self._keys}
        batch = make_global_batch(arrays, self._mesh, self._spec)
        return FedBatch(batch, self.source.get_state(), local["counters"])

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self._read_one()
            except BaseException as exc:  # handed to the consumer, which re-raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self) -> "DataFeed":
        return self

    def __next__(self) -> FedBatch:
        if self._queue is None:
            return self._read_one()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.source.close()
