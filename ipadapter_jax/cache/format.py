"""The on-disk format of a latent cache and the per-example members it holds.

A cache folder holds

    manifest.json                  what the cache was made from (model, resolution, variant, shapes) and its
                                   shard names, written by process 0
    counts-PPPPP-of-NNNNN.json     one per writing process: samples used / skipped by reason, as the online
                                   source counts them
    uncond.npz                     ``text_context`` [T, D] (+ ``text_pooled`` [P]) of the empty caption and
                                   ``image_features`` of a dropped image: zeros [E] (plain) or the hidden
                                   states of an all-zero image [N, H] (Plus)
    cache-XXXXXX.tar               webdataset shards, one per source shard (``XXXXXX`` is the source shard's
                                   position in the expanded shard spec), samples in the source's order

Each sample is ``<key>.<member>.npy`` for every member below (float members in the manifest's
``storage_dtype``, int32 SDXL ids) plus ``<key>.txt``, the caption (for inspection only). Per example:

    latent_mean, latent_logvar   float32 [R/f, R/f, C]   the VAE posterior's moments (before scaling)
    text_context                 float32 [T, D]          the UNet's text conditioning
    text_pooled                  float32 [P]             SDXL only: text_encoder_2's pooled projection
    image_features               float32 [E] | [N, H]    plain: image_embeds; Plus: penultimate hidden states
    original_size, crop_top_left int32   [2]             SDXL only

The moments are stored rather than a latent so the train step still draws the posterior sample with its own
key, exactly as the online path does.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

FORMAT = "ipadapter_jax.latent_cache/1"
MANIFEST_NAME = "manifest.json"
UNCOND_NAME = "uncond.npz"
STORAGE_DTYPES = ("float32", "float16")
FLOAT_KEYS = ("latent_mean", "latent_logvar", "text_context", "text_pooled", "image_features")
SDXL_KEYS = ("text_pooled", "original_size", "crop_top_left")
WRITE_COMMAND = "python -m ipadapter_jax.cache"


class CacheError(ValueError):
    """The latent cache is missing, unreadable, or was made for another model / resolution / variant."""


def cache_url(cache_dir: str, name: str) -> str:
    """``name`` inside ``cache_dir`` (a local folder or any URL the shard reader opens)."""
    return str(cache_dir).rstrip("/") + "/" + name


def shard_name(index: int) -> str:
    return f"cache-{index:06d}.tar"


def counts_name(process_index: int, process_count: int) -> str:
    return f"counts-{process_index:05d}-of-{process_count:05d}.json"


def image_feature_shape(modules: Any, uses_hidden_states: bool) -> tuple[int, ...]:
    """One example's adapter input: ``(N, H)`` hidden states (Plus) or ``(E,)`` image_embeds (plain)."""
    return (modules.image_tokens, modules.image_hidden_dim) if uses_hidden_states else (modules.image_embed_dim,)


def cached_example_shapes(modules: Any, resolution: int, uses_hidden_states: bool) -> dict[str, tuple]:
    """Per-example shape of every cached member (a batch adds a leading axis); ``modules``: the frozen
    models' ``FrozenModules``."""
    side = resolution // modules.latent_downsample
    latent = (side, side, modules.vae_config.latent_channels)
    shapes = {"latent_mean": latent, "latent_logvar": latent,
              "text_context": (modules.text_length, modules.unet_config.cross_attention_dim),
              "image_features": image_feature_shape(modules, uses_hidden_states)}
    if modules.is_sdxl:
        shapes["text_pooled"] = (modules.text_encoder_2.config.projection_dim,)
        shapes["original_size"] = shapes["crop_top_left"] = (2,)
    return shapes


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def uncond_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``uncond.npz``'s content: every array as float32."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
    return buffer.getvalue()


def decode_cached_sample(sample: dict[str, Any], shapes: dict[str, tuple]) -> dict[str, np.ndarray] | str:
    """A cache shard's raw sample -> ``{member: array}`` with float members as float32, or the skip reason
    ``bad_cache_sample`` (a member missing, unreadable or of the wrong shape)."""
    out = {}
    for name, shape in shapes.items():
        raw = sample.get(f"{name}.npy")
        if raw is None:
            return "bad_cache_sample"
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception:
            return "bad_cache_sample"
        if tuple(array.shape) != tuple(shape):
            return "bad_cache_sample"
        out[name] = array.astype(np.int32 if array.dtype.kind in "iu" else np.float32, copy=False)
    return out
