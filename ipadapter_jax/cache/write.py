"""Writing a latent cache (format: ``cache.format``): every source shard of a training config through the
online path's example processing, then the frozen encoders (``cache.encode``: jitted, batched over this host's
devices).

Each process writes the source shards ``i`` with ``i % process_count == process_index`` (the online source's
split), one cache shard per source shard, each published whole (``atomic_files``) once complete, so a
preempted writer re-run with the same arguments continues with the shards it had not finished. Process 0 writes
``uncond.npz`` and, when its own shards are done, ``manifest.json``; every process writes its
``counts-*.json``. Unusable samples and broken shards are skipped and counted by the same reasons as online.

A cached random crop is drawn once per image (the online path draws a new one every epoch), so caches are
normally written with centre crops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ipadapter_jax.atomic_files import atomic_path, write_atomic
from ipadapter_jax.cache.encode import encode_for_cache, encode_uncond, encoder_params
from ipadapter_jax.cache.format import (FLOAT_KEYS, FORMAT, MANIFEST_NAME, STORAGE_DTYPES, UNCOND_NAME, counts_name,
                                        npy_bytes, shard_name, uncond_bytes)
from ipadapter_jax.cache.manifest import cache_identity
from ipadapter_jax.data.counters import SampleCounters
from ipadapter_jax.data.examples import Example, ExampleProcessor
from ipadapter_jax.data.shards import expand_shard_spec, resolve_process
from ipadapter_jax.data.tar_samples import ShardError, add_member, iter_shard_samples
from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.data.webdataset_source import process_raw_sample
from ipadapter_jax.train.frozen import image_encoder_folder, load_frozen_models

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CacheSummary:
    out_dir: Path
    shards_written: list[str]  # this process's shards written now
    shards_reused: list[str]  # this process's shards found complete from an earlier run
    counters: dict  # this process's sample counters (SampleCounters.to_dict)


class _ShardEncoder:
    """Batches processed examples of one shard, encodes them and writes the cache shard."""

    def __init__(self, modules, params, batch_size: int, uses_hidden: bool, storage_dtype: str):
        devices = jax.local_devices()
        self.batch_size = -(-batch_size // len(devices)) * len(devices)  # a multiple of the local devices
        mesh = Mesh(np.asarray(devices), ("batch",))
        self._batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        self._params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self._encode = jax.jit(functools.partial(encode_for_cache, modules, uses_hidden_states=uses_hidden))
        self._tokenizer = CaptionTokenizer(modules.tokenizer_dir, max_length=modules.text_length)
        self._tokenizer_2 = (CaptionTokenizer(modules.tokenizer_2_dir, max_length=modules.text_length)
                             if modules.tokenizer_2_dir else None)
        self._sdxl = modules.is_sdxl
        self._storage = np.dtype(storage_dtype)

    def encode(self, examples: list[Example]) -> list[dict[str, bytes]]:
        n = len(examples)
        padded = examples + [examples[-1]] * (self.batch_size - n)  # one compiled shape for every batch
        captions = [e.caption for e in padded]
        batch = {"pixels": np.stack([e.pixels for e in padded]),
                 "clip_pixels": np.stack([e.clip_pixels for e in padded]),
                 "input_ids": self._tokenizer(captions)}
        if self._tokenizer_2 is not None:
            batch["input_ids_2"] = self._tokenizer_2(captions)
        with jax.set_mesh(self._batch_sharding.mesh):  # Pallas attention (auto on TPU) runs per device under it
            out = jax.device_get(self._encode(self._params, jax.device_put(batch, self._batch_sharding)))
        members = []
        for i, example in enumerate(examples):
            sample = {f"{k}.npy": npy_bytes(np.asarray(v[i]).astype(self._storage if k in FLOAT_KEYS else v.dtype))
                      for k, v in out.items()}
            if self._sdxl:
                sample["original_size.npy"] = npy_bytes(np.asarray(example.original_size, np.int32))
                sample["crop_top_left.npy"] = npy_bytes(np.asarray(example.crop_top_left, np.int32))
            sample["txt"] = example.caption.encode("utf-8")
            members.append(sample)
        return members


def _shard_examples(url: str, index: int, processor: ExampleProcessor, caption_field: str | None, seed: int,
                    counters: SampleCounters) -> Iterator[Example]:
    """The usable examples of one source shard, in order; the rest counted by reason as online."""
    try:
        with contextlib.closing(iter_shard_samples(url)) as samples:
            for position, sample in enumerate(samples):
                rng = np.random.default_rng(np.random.SeedSequence([seed, index, position, 0x5EED]))
                result = process_raw_sample(processor, caption_field, sample, rng)
                if isinstance(result, str):
                    counters.skip(result)
                    continue
                counters.used += 1
                counters.convert(result.conversion)
                yield result
    except ShardError as exc:
        counters.skip(exc.reason)
        logger.warning("skipping the rest of a shard: %s", exc)
    counters.shards_finished += 1


def _write_shard(url: str, index: int, out: Path, encoder: _ShardEncoder, processor: ExampleProcessor,
                 caption_field: str | None, seed: int) -> SampleCounters:
    counters = SampleCounters()
    examples = _shard_examples(url, index, processor, caption_field, seed, counters)
    with atomic_path(out) as tmp:
        with tarfile.open(tmp, "w") as tar:
            while batch := list(itertools.islice(examples, encoder.batch_size)):
                for example, sample in zip(batch, encoder.encode(batch)):
                    for ext, data in sample.items():
                        add_member(tar, f"{example.key}.{ext}", data)
        # Before the shard gets its name, which is what says it is complete (``write_latent_cache`` reuses it).
        _write_json(out.with_suffix(".json"), counters.to_dict())
    return counters


def _write_json(path: Path, content: Any) -> None:
    write_atomic(path, json.dumps(content, indent=1, sort_keys=True))


def write_latent_cache(config: Any, out_dir: str | Path, *, batch_size: int = 0, storage_dtype: str = "float32",
                       process_index: int | None = None, process_count: int | None = None) -> CacheSummary:
    """Encode ``config``'s training data (a ``TrainConfig``) into a latent cache in the local folder ``out_dir``
    (a mounted bucket works). ``batch_size``: examples per encoder call on this host (0: the config's batch
    size); ``storage_dtype``: float32 or float16 for the float members."""
    from ipadapter_jax.train.setup import model_and_shards

    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype={storage_dtype!r}: choose one of {STORAGE_DTYPES}")
    process_index, process_count = resolve_process(process_index, process_count)
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir, source = model_and_shards(config, out_dir)
    image_encoder_dir = image_encoder_folder(model_dir, config.model.image_encoder_dir)
    frozen_models = load_frozen_models(model_dir, image_encoder_dir, compute_dtype=config.model.compute_dtype,
                                       attention_implementation=config.model.attention_implementation)
    modules = frozen_models.modules
    uses_hidden = config.adapter.variant == "plus"
    params = encoder_params(frozen_models.params_in(config.model.compute_dtype))
    urls = expand_shard_spec(source)
    if process_index == 0:
        empty_2 = (CaptionTokenizer(modules.tokenizer_2_dir, modules.text_length).empty_ids
                   if modules.tokenizer_2_dir else None)
        empty = CaptionTokenizer(modules.tokenizer_dir, modules.text_length).empty_ids
        write_atomic(out_dir / UNCOND_NAME, uncond_bytes(encode_uncond(modules, params, empty, empty_2, uses_hidden)))

    encoder = _ShardEncoder(modules, params, batch_size or config.batch_size, uses_hidden, storage_dtype)
    processor = ExampleProcessor(config.data.resolution, clip_config=modules.clip_image_config,
                                 random_crop=config.data.random_crop)
    summary = CacheSummary(out_dir, [], [], {})
    total = SampleCounters()
    for index in range(process_index, len(urls), process_count):
        out = out_dir / shard_name(index)
        if out.is_file() and out.with_suffix(".json").is_file():
            counters = SampleCounters.from_dict(json.loads(out.with_suffix(".json").read_text()))
            summary.shards_reused.append(out.name)
        else:
            counters = _write_shard(urls[index], index, out, encoder, processor, config.data.caption_field or None,
                                    config.seed)
            summary.shards_written.append(out.name)
            logger.info("%s <- %s: %d samples, skipped %s", out.name, urls[index], counters.used, counters.skipped)
        total.add(counters)
    summary.counters = total.to_dict()
    _write_json(out_dir / counts_name(process_index, process_count), summary.counters)
    if process_index == 0:
        manifest = {"format": FORMAT, **cache_identity(config, model_dir, image_encoder_dir, modules),
                    "model_dir": str(model_dir),
                    "image_encoder_dir": config.model.image_encoder_dir or str(model_dir / "image_encoder"),
                    "source_shards": source if isinstance(source, str) else list(source),
                    "shards": [shard_name(i) for i in range(len(urls))], "random_crop": config.data.random_crop,
                    "caption_field": config.data.caption_field, "encode_dtype": config.model.compute_dtype,
                    "storage_dtype": storage_dtype, "process_count": process_count,
                    "counts": [counts_name(i, process_count) for i in range(process_count)]}
        _write_json(out_dir / MANIFEST_NAME, manifest)
    return summary

