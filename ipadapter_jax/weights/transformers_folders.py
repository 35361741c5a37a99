"""Writing trained CLIP towers as transformers model folders (``config.json`` + ``model.safetensors``).

Key layout: ``text_model.*`` / ``vision_model.*`` prefixes, as in every published SD text encoder and
IP-Adapter image encoder, which transformers 4 and 5 both load; our Flax param trees are already named that
way (see ``ipadapter_jax.models.clip``), so ``flax_to_torch`` gives the names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ipadapter_jax.weights.safetensors_io import write_model_folder
from ipadapter_jax.weights.torch_layout import flax_to_torch

TRANSFORMERS_VERSION = "4.45.0"  # the oldest transformers our pyproject accepts; both 4.x and 5.x read these
_ACT = "quick_gelu"


def text_config(vocab_size: int, bos_token_id: int, eos_token_id: int, *, hidden_size: int, layers: int,
                heads: int, intermediate_size: int, projection_dim: int, max_position_embeddings: int = 77,
                with_projection: bool = False) -> dict:
    """A ``CLIPTextConfig`` dict (pad = EOS, as CLIP's tokenizer pads)."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "projection_dim": projection_dim, "num_hidden_layers": layers,
        "num_attention_heads": heads, "max_position_embeddings": max_position_embeddings, "hidden_act": _ACT,
        "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02,
        "initializer_factor": 1.0, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id, "torch_dtype": "float32", "transformers_version": TRANSFORMERS_VERSION,
    }


def vision_config(*, image_size: int, patch_size: int, hidden_size: int, layers: int, heads: int,
                  intermediate_size: int, projection_dim: int, with_projection: bool = True) -> dict:
    """A ``CLIPVisionConfig`` dict."""
    return {
        "architectures": ["CLIPVisionModelWithProjection" if with_projection else "CLIPVisionModel"],
        "model_type": "clip_vision_model", "image_size": image_size, "patch_size": patch_size,
        "num_channels": 3, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "projection_dim": projection_dim, "num_hidden_layers": layers, "num_attention_heads": heads,
        "hidden_act": _ACT, "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0, "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
    }


def clip_model_config(text: Mapping[str, Any], vision: Mapping[str, Any], projection_dim: int,
                      logit_scale_init_value: float) -> dict:
    """A full ``CLIPConfig`` dict (``CLIPModel``: both towers, both projections, ``logit_scale``)."""
    strip = ("architectures", "transformers_version", "torch_dtype")
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": projection_dim,
        "logit_scale_init_value": logit_scale_init_value, "initializer_factor": 1.0,
        "text_config": {k: v for k, v in text.items() if k not in strip},
        "vision_config": {k: v for k, v in vision.items() if k not in strip},
        "torch_dtype": "float32", "transformers_version": TRANSFORMERS_VERSION,
    }


def clip_image_processor_config(image_size: int) -> dict:
    """``preprocessor_config.json`` of a ``CLIPImageProcessor`` for ``image_size`` inputs (OpenAI's mean/std)."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": image_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def write_transformers_folder(folder: str | os.PathLike, config: Mapping[str, Any], params: Mapping[str, Any],
                              extra_tensors: Mapping[str, np.ndarray] | None = None) -> Path:
    """``config.json`` + ``model.safetensors`` (float32) from a Flax param tree named after transformers."""
    tensors = {**flax_to_torch(params), **(extra_tensors or {})}
    return write_model_folder(tensors, config, folder, "model")
