"""Image prompts: the CLIP preprocessing a base model asks for, and the image encoder's features that an
adapter's projection net takes.

Plain adapters take the projected ``image_embeds [B, E]``; Plus (and full-face) adapters the penultimate
hidden states ``[B, N, H]``. A dropped image (training's image dropout, the negative half of guidance) is, as
in the paper and the reference scripts, a zero ``image_embeds`` for plain adapters and the hidden states of
an all-zero image otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.data.clip_image_processing import ClipImageProcessingConfig, clip_preprocess
from ipadapter_jax.weights.safetensors_io import read_json

PREPROCESSOR_CONFIG = "preprocessor_config.json"


def clip_processing_config(image_encoder_dir: str | Path, image_size: int,
                           base_dir: str | Path | None = None) -> ClipImageProcessingConfig:
    """The preprocessing diffusers' pipelines use for an image prompt (so training sees what inference will):
    the base model's ``feature_extractor/``, else the encoder folder's ``preprocessor_config.json``, else
    ``CLIPImageProcessor``'s defaults at the encoder's input size."""
    folders = ([Path(base_dir) / "feature_extractor"] if base_dir is not None else []) + [Path(image_encoder_dir)]
    for folder in folders:
        if (folder / PREPROCESSOR_CONFIG).is_file():
            return ClipImageProcessingConfig.from_dict(read_json(folder / PREPROCESSOR_CONFIG))
    return ClipImageProcessingConfig(shortest_edge=image_size, crop_height=image_size, crop_width=image_size)


def encode_image_prompt(encoder: nn.Module, params: Any, clip_pixels: jax.Array, drop_image: jax.Array,
                        uses_hidden_states: bool) -> jax.Array:
    """CLIP pixels ``[B, S, S, 3]`` -> the projection net's input features (float32), with the images where
    ``drop_image [B]`` is set dropped (see module docstring)."""
    drop = drop_image.reshape(-1, *([1] * (clip_pixels.ndim - 1)))
    if uses_hidden_states:
        pixels = jnp.where(drop, 0.0, clip_pixels)
        return encoder.apply({"params": params}, pixels).hidden_states[-2].astype(jnp.float32)
    out = encoder.apply({"params": params}, clip_pixels, output_hidden_states=False)
    return jnp.where(drop_image[:, None], 0.0, out.image_embeds.astype(jnp.float32))


def _pil_or_uint8(image: Any) -> Any:
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return image


_encode_image_prompt = jax.jit(encode_image_prompt, static_argnames=("encoder", "uses_hidden_states"))


def image_prompt_features(encoder: nn.Module, params: Any, processing: ClipImageProcessingConfig,
                          images: Sequence[Any], uses_hidden_states: bool, guided: bool) -> jax.Array:
    """The features for reference images, ``[copies * n, ...]``: with ``guided`` the dropped-image negative
    first, then the images. Images: PIL, HWC uint8 arrays, or HWC float arrays in [0, 1]."""
    pixels = clip_preprocess([_pil_or_uint8(image) for image in images], processing)
    drop = np.zeros(len(pixels), bool)
    if guided:
        pixels, drop = np.concatenate([pixels, pixels]), np.concatenate([~drop, drop])
    return _encode_image_prompt(encoder, params, jnp.asarray(pixels), jnp.asarray(drop),
                                uses_hidden_states=uses_hidden_states)
