"""Text and image-prompt conditioning, computed the way diffusers' SD / SDXL pipelines compute it.

SD: the text encoder's last hidden state. SDXL: the penultimate hidden states of both encoders
concatenated, the second encoder's projected pooled output as ``text_embeds``, and ``time_ids`` =
(original size, crop top-left, target size); an absent negative prompt is all zeros
(``force_zeros_for_empty_prompt``). The negative image prompt is a zero embedding for plain adapters and the
encoder's hidden states of a zero image otherwise.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.data.clip_image_processing import clip_preprocess
from ipadapter_jax.models.image_projection import ProjectionConfig
from ipadapter_jax.pipeline.components import SDXL, BaseModel, Encoder, ImageEncoder


@functools.partial(jax.jit, static_argnames=("module",))
def _run_text_encoder(module, params, input_ids):
    out = module.apply({"params": params}, input_ids, output_hidden_states=True)
    pooled = out.text_embeds if out.text_embeds is not None else out.pooler_output
    return out.last_hidden_state, out.hidden_states[-2], pooled


@functools.partial(jax.jit, static_argnames=("module", "hidden_states"))
def _run_image_encoder(module, params, pixels, hidden_states: bool):
    out = module.apply({"params": params}, pixels, output_hidden_states=hidden_states)
    return out.hidden_states[-2] if hidden_states else out.image_embeds


def _encode_prompts(base: BaseModel, prompts: Sequence[str]):
    last, penultimate, pooled = [], [], None
    for tokenizer, encoder in zip(base.tokenizers, base.text_encoders):
        ids = jnp.asarray(tokenizer(list(prompts)))
        h_last, h_pen, pooled = _run_text_encoder(encoder.module, encoder.params, ids)
        last.append(h_last)
        penultimate.append(h_pen)
    if base.kind == SDXL:
        return jnp.concatenate(penultimate, axis=-1), pooled
    return last[0], None


def encode_text(base: BaseModel, prompts: Sequence[str], negative_prompts: Sequence[str] | None, guided: bool,
                height: int, width: int):
    """``(context [copies*B, T, C], added_cond or None)``, negative half first when ``guided``."""
    context, pooled = _encode_prompts(base, prompts)
    added = None
    if base.kind == SDXL:
        time_ids = jnp.tile(jnp.asarray([[height, width, 0, 0, height, width]], jnp.float32), (len(prompts), 1))
        added = {"text_embeds": pooled, "time_ids": time_ids}
    if not guided:
        return context, added
    if negative_prompts is None and base.kind == SDXL and base.force_zeros_for_empty_prompt:
        neg_context, neg_pooled = jnp.zeros_like(context), (None if pooled is None else jnp.zeros_like(pooled))
    else:
        neg_context, neg_pooled = _encode_prompts(base, negative_prompts or [""] * len(prompts))
    context = jnp.concatenate([neg_context, context])
    if added is not None:
        added = {"text_embeds": jnp.concatenate([neg_pooled, pooled]),
                 "time_ids": jnp.concatenate([added["time_ids"]] * 2)}
    return context, added


def encode_image_prompt(image_encoder: ImageEncoder, projection: ProjectionConfig, images: Sequence,
                        guided: bool) -> jax.Array:
    """The features ``projection`` takes for the reference image(s), ``[copies * n_images, ...]``, negative
    first when ``guided``. Images: PIL images or HWC uint8/float arrays."""
    pixels = jnp.asarray(clip_preprocess(list(images), image_encoder.processing))
    encoder: Encoder = image_encoder.encoder
    hidden = projection.uses_hidden_states
    features = _run_image_encoder(encoder.module, encoder.params, pixels, hidden)
    if not guided:
        return features
    negative = (_run_image_encoder(encoder.module, encoder.params, jnp.zeros_like(pixels), True) if hidden
                else jnp.zeros_like(features))
    return jnp.concatenate([negative, features])


def as_image_list(images) -> list:
    """One image or a list; numpy arrays and PIL images both accepted."""
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def pil_or_array(image):
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return image
