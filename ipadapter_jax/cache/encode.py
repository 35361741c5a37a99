"""The frozen encoders' work done ahead of training for a latent cache: what ``train.step.encode_batch`` would
compute from pixels and token ids, minus the random parts (posterior sample, dropout), which stay in training.

``encode_for_cache(modules, params, batch, uses_hidden_states)`` maps a batch of processed examples (the
online batch layout of ``data.examples``: pixels, clip_pixels, input_ids[, input_ids_2]) to the members of
``cache.format``; ``encode_uncond`` gives the empty caption's text encodings and a dropped image's features
(the train step's ``frozen["image_uncond"]``), computed once per cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.cache.format import image_feature_shape
from ipadapter_jax.conditioning import encode_image_prompt, encode_text
from ipadapter_jax.models.vae import AutoencoderKL
from ipadapter_jax.train.frozen import FrozenModules

ENCODER_PARAMS = ("vae", "text_encoder", "text_encoder_2", "image_encoder")


def encoder_params(host_params: dict) -> dict:
    """The part of the frozen tree the cache writer needs (everything but the UNet)."""
    return {k: v for k, v in host_params.items() if k in ENCODER_PARAMS}


def encode_for_cache(modules: FrozenModules, params: dict, batch: dict, uses_hidden_states: bool) -> dict:
    """``{latent_mean, latent_logvar [B, h, w, C], text_context [B, T, D], (text_pooled [B, P]),
    image_features [B, E] | [B, N, H]}``, all float32; images are never dropped here."""
    mean, logvar = modules.vae.apply({"params": params["vae"]}, batch["pixels"], method=AutoencoderKL.encode)
    text = encode_text(modules.text_encoders, params, [batch["input_ids"], batch.get("input_ids_2")])
    keep = jnp.zeros(batch["clip_pixels"].shape[:1], jnp.bool_)
    out = {"latent_mean": mean, "latent_logvar": logvar, "text_context": text.context,
           "image_features": encode_image_prompt(modules.image_encoder, params["image_encoder"], batch["clip_pixels"],
                                                 keep, uses_hidden_states)}
    if text.pooled is not None:
        out["text_pooled"] = text.pooled
    return {k: v.astype(jnp.float32) for k, v in out.items()}


def encode_uncond(modules: FrozenModules, params: dict, empty_ids: np.ndarray, empty_ids_2: np.ndarray | None,
                  uses_hidden_states: bool) -> dict[str, np.ndarray]:
    """The empty caption's ``text_context`` [T, D] (and ``text_pooled`` [P]) and a dropped image's
    ``image_features``: zeros [E] for plain, the hidden states of an all-zero image [N, H] for Plus, as the
    online step computes them."""

    def encode(params, ids, ids_2):
        text = encode_text(modules.text_encoders, params, [ids, ids_2])
        out = {"text_context": text.context[0]}
        if text.pooled is not None:
            out["text_pooled"] = text.pooled[0]
        if uses_hidden_states:
            size = modules.clip_image_size
            zeros = jnp.zeros((1, size, size, 3), jnp.float32)
            out["image_features"] = encode_image_prompt(modules.image_encoder, params["image_encoder"], zeros,
                                                        jnp.ones((1,), jnp.bool_), True)[0]
        return {k: v.astype(jnp.float32) for k, v in out.items()}

    ids_2 = None if empty_ids_2 is None else jnp.asarray(empty_ids_2)[None]
    out = jax.device_get(jax.jit(encode)(params, jnp.asarray(empty_ids)[None], ids_2))
    if not uses_hidden_states:
        out["image_features"] = np.zeros(image_feature_shape(modules, False), np.float32)
    return {k: np.asarray(v) for k, v in out.items()}

