"""The train step's side of a latent cache (``data.cache_latents``): the batch it reads and the frozen tree it
takes instead of pixels, token ids and the encoders.

A cached batch carries the members of ``cache.format`` with a leading batch axis ``B`` (``text_context``
already holds the empty caption's for dropped captions, swapped in on the host by ``cache.source``), plus
``drop_image`` bool [B]. A dropped image becomes ``frozen["image_uncond"]``, one example's features: zeros
``[E]`` for plain (the online zero embedding) and the hidden states of an all-zero image ``[N, H]`` for Plus
(what the online path encodes), computed once by the cache writer (``cache.encode.encode_uncond``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ipadapter_jax.cache.format import FLOAT_KEYS, SDXL_KEYS, cached_example_shapes, image_feature_shape


def cached_batch_keys(modules: Any) -> tuple[str, ...]:
    keys = ("latent_mean", "latent_logvar", "text_context", "image_features", "drop_image")
    return keys + (SDXL_KEYS if modules.is_sdxl else ())


def abstract_cached_batch(modules: Any, batch_size: int, resolution: int,
                          uses_hidden_states: bool) -> dict[str, jax.ShapeDtypeStruct]:
    shapes = cached_example_shapes(modules, resolution, uses_hidden_states)
    out = {k: jax.ShapeDtypeStruct((batch_size, *s), jnp.float32 if k in FLOAT_KEYS else jnp.int32)
           for k, s in shapes.items()}
    out["drop_image"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_)
    return {k: out[k] for k in cached_batch_keys(modules)}


def cached_frozen(frozen: dict, image_uncond: Any, keep_encoders: bool = False) -> dict:
    """The frozen tree the cached step takes: ``frozen``'s UNet (all of ``frozen`` with ``keep_encoders``, for
    validation, which still encodes its prompts and decodes its samples) and ``image_uncond``. Works on arrays
    and on ``ShapeDtypeStruct`` (a plan); see ``abstract_image_uncond``."""
    kept = frozen if keep_encoders else {"unet": frozen["unet"]}
    return {**kept, "image_uncond": image_uncond}


def abstract_image_uncond(modules: Any, uses_hidden_states: bool) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(image_feature_shape(modules, uses_hidden_states), jnp.float32)


def cached_image_features(features: jax.Array, drop_image: jax.Array, frozen: dict) -> jax.Array:
    """``features`` [B, ...] with the dropped rows replaced by ``frozen["image_uncond"]``, float32."""
    uncond = frozen["image_uncond"].astype(jnp.float32)
    drop = drop_image.reshape(-1, *([1] * (features.ndim - 1)))
    return jnp.where(drop, uncond[None], features.astype(jnp.float32))
