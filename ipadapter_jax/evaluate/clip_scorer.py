"""CLIP embeddings for evaluation, from any transformers ``CLIPModel`` folder (``config.json`` +
``model.safetensors`` or a sharded index, the tokenizer files and ``preprocessor_config.json``): the toy
world's mini CLIP, or e.g. ``openai/clip-vit-large-patch14`` (the model the IP-Adapter paper evaluates with)
downloaded by the user.

CLIP-I of a generation = cosine similarity of its image embedding and the reference's.
CLIPScore (Hessel et al. 2021) of an image and a caption = ``2.5 * max(cos(image, text), 0)``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.data.clip_image_processing import ClipImageProcessingConfig, clip_preprocess
from ipadapter_jax.weights.load_clip import init_clip_text_encoder, init_clip_vision_encoder
from ipadapter_jax.weights.safetensors_io import WeightFileError, read_json, read_model_folder
from ipadapter_jax.weights.torch_layout import torch_to_flax

CLIPSCORE_WEIGHT = 2.5
_BATCH = 16  # images / captions per compiled call (the last batch is padded, so one compilation serves all)


def _as_uint8(image) -> np.ndarray:
    """PIL image, uint8 HWC array or float HWC array in [0, 1] -> uint8 HWC RGB."""
    if not isinstance(image, np.ndarray):
        return np.asarray(image.convert("RGB"), np.uint8)
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _split_state(state: dict, tower: str, projection: str) -> dict:
    return {k: v for k, v in state.items()
            if (k.startswith(tower + ".") or k == projection + ".weight") and not k.endswith("position_ids")}


@functools.partial(jax.jit, static_argnames=("module",))
def _image_embeds(module, params, pixels):
    return module.apply({"params": params}, pixels, output_hidden_states=False).image_embeds


@functools.partial(jax.jit, static_argnames=("module",))
def _text_embeds(module, params, ids):
    return module.apply({"params": params}, ids, output_hidden_states=False).text_embeds


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class ClipScorer:
    """``image_embeddings`` / ``text_embeddings`` return L2-normalised float32 numpy ``[N, projection_dim]``."""

    def __init__(self, folder: str | os.PathLike):
        from ipadapter_jax.data.tokenize import CaptionTokenizer

        folder = Path(folder)
        config = read_json(folder / "config.json")
        if "text_config" not in config or "vision_config" not in config:
            raise WeightFileError(f"{folder}: not a CLIPModel folder (config.json has no text_config / "
                                  f"vision_config); CLIP-I and CLIP-T need both towers and their projections")
        state = read_model_folder(folder, "model")
        self.folder = folder
        self.text_module, text_shapes = init_clip_text_encoder(config, with_projection=True, shapes_only=True)
        self.vision_module, vision_shapes = init_clip_vision_encoder(config, with_projection=True,
                                                                     shapes_only=True)
        self.text_params = self._convert(state, "text_model", "text_projection", text_shapes)
        self.vision_params = self._convert(state, "vision_model", "visual_projection", vision_shapes)
        self.text_config, self.vision_config = self.text_module.config, self.vision_module.config
        self.tokenizer = CaptionTokenizer(folder, max_length=self.text_config.max_position_embeddings)
        size = self.vision_config.image_size
        processor = folder / "preprocessor_config.json"
        self.processing = (ClipImageProcessingConfig.from_json(processor) if processor.is_file() else
                           ClipImageProcessingConfig(shortest_edge=size, crop_height=size, crop_width=size))

    def _convert(self, state: dict, tower: str, projection: str, shapes: Any) -> dict:
        params = torch_to_flax(_split_state(state, tower, projection), shapes,
                               what=f"{self.folder} ({tower} + {projection})", dtype=np.float32)
        return jax.tree.map(jnp.asarray, params)

    def image_embeddings(self, images: Sequence) -> np.ndarray:
        pixels = clip_preprocess([_as_uint8(image) for image in images], self.processing)
        return _normalise(self._batched(lambda x: _image_embeds(self.vision_module, self.vision_params, x), pixels))

    def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(captions))
        return _normalise(self._batched(lambda x: _text_embeds(self.text_module, self.text_params, x), ids))

    @staticmethod
    def _batched(fn, inputs: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(inputs), _BATCH):
            chunk = inputs[start:start + _BATCH]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], _BATCH - len(chunk), 0)]) if len(chunk) < _BATCH \
                else chunk
            outputs.append(np.asarray(fn(jnp.asarray(padded)), np.float32)[:len(chunk)])
        return np.concatenate(outputs)

    def clip_i(self, generated: Sequence, reference) -> np.ndarray:
        """Cosine similarity of each generated image with the reference image, ``[N]``."""
        return self.image_embeddings(generated) @ self.image_embeddings([reference])[0]

    def clip_score(self, images: Sequence, caption: str) -> tuple[np.ndarray, np.ndarray]:
        """``(CLIPScore [N], cosine [N])`` of each image with one caption."""
        cosine = self.image_embeddings(images) @ self.text_embeddings([caption])[0]
        return CLIPSCORE_WEIGHT * np.maximum(cosine, 0.0), cosine
