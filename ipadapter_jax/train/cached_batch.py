"""The train step's inputs when the frozen encoders ran ahead of training (``data.cache_latents``).

A cached batch carries what the encoders would have produced inside the step, per example:

    latent_mean, latent_logvar  float32 [B, R/f, R/f, C]   the VAE posterior's moments (before scaling)
    text_context                float32 [B, T, D]          the UNet's text conditioning (dropped text already
                                                           replaced by the empty caption's, on the host)
    text_pooled                 float32 [B, P]             SDXL only: text_encoder_2's pooled projection
    image_features              float32 [B, E] | [B, N, H] plain: image_embeds; Plus: penultimate hidden states
    original_size, crop_top_left int32  [B, 2]             SDXL only
    drop_image                  bool    [B]

The moments are stored rather than a latent so the step still draws the posterior sample with its own key,
exactly as the online path does (``latents_from_moments`` repeats ``vae.encode_to_latents``' arithmetic).
A dropped image becomes ``frozen["image_uncond"]``: zeros ``[E]`` for plain (the online zero embedding) and
the hidden states of an all-zero image ``[N, H]`` for Plus (what the online path encodes), computed once by
the cache writer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models.vae import VAEConfig

FLOAT_KEYS = ("latent_mean", "latent_logvar", "text_context", "text_pooled", "image_features")
SDXL_KEYS = ("text_pooled", "original_size", "crop_top_left")


def image_feature_shape(modules: Any, uses_hidden_states: bool) -> tuple[int, ...]:
    """One example's adapter input: ``(N, H)`` hidden states (Plus) or ``(E,)`` image_embeds (plain)."""
    return (modules.image_tokens, modules.image_hidden_dim) if uses_hidden_states else (modules.image_embed_dim,)


def cached_example_shapes(modules: Any, resolution: int, uses_hidden_states: bool) -> dict[str, tuple]:
    """Per-example shape of every cached member (the batch adds a leading axis)."""
    side = resolution // modules.latent_downsample
    latent = (side, side, modules.vae_config.latent_channels)
    shapes = {"latent_mean": latent, "latent_logvar": latent,
              "text_context": (modules.text_length, modules.unet_config.cross_attention_dim),
              "image_features": image_feature_shape(modules, uses_hidden_states)}
    if modules.is_sdxl:
        shapes["text_pooled"] = (modules.text_encoder_2.config.projection_dim,)
        shapes["original_size"] = shapes["crop_top_left"] = (2,)
    return shapes


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


def latents_from_moments(mean: jax.Array, logvar: jax.Array, rng: jax.Array | None,
                         config: VAEConfig) -> jax.Array:
    """Scaled latents from the posterior's moments: a sample when ``rng`` is given, else the mean; the same
    arithmetic as ``vae.encode_to_latents`` so one key gives the same latents on both paths."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    if config.shift_factor is not None:
        z = z - config.shift_factor
    return z * config.scaling_factor


def cached_image_features(features: jax.Array, drop_image: jax.Array, uncond: jax.Array) -> jax.Array:
    """``features`` with the dropped rows replaced by ``uncond`` (one example's features), float32."""
    drop = drop_image.reshape(-1, *([1] * (features.ndim - 1)))
    return jnp.where(drop, uncond.astype(jnp.float32)[None], features.astype(jnp.float32))


def abstract_cached_frozen(modules: Any, uses_hidden_states: bool, unet: Any) -> dict:
    """The frozen tree the cached step takes: the UNet's params and the dropped-image features."""
    shape = image_feature_shape(modules, uses_hidden_states)
    return {"unet": unet, "image_uncond": jax.ShapeDtypeStruct(shape, jnp.float32)}


def host_cached_frozen(unet_params: Any, image_uncond: np.ndarray) -> dict:
    return {"unet": unet_params, "image_uncond": np.asarray(image_uncond, np.float32)}
