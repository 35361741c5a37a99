"""Building the CLIP encoders from transformers model folders (``config.json`` + ``model.safetensors``).

Two key layouts exist for the same text encoder: checkpoints written by transformers 4 (every SD / SDXL
release) prefix the body with ``text_model.``, transformers 5 writes a bare ``CLIPTextModel`` without it
(likewise ``vision_model.`` for ``CLIPVisionModel``). Our modules always carry the prefix, so a bare file is
prefixed before conversion. Old files also persist the ``position_ids`` buffer, which is not a parameter.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models.clip import (
    CLIPTextEncoderConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionEncoderConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from ipadapter_jax.weights.safetensors_io import WeightFileError, read_json, read_model_folder
from ipadapter_jax.weights.torch_layout import torch_to_flax

_TEXT_ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}
_VISION_ARCHITECTURES = {"CLIPVisionModel": False, "CLIPVisionModelWithProjection": True}


def _with_projection(config: Mapping[str, Any], known: Mapping[str, bool], what: str) -> bool | None:
    """From ``config["architectures"]``; None when the config names none."""
    architectures = config.get("architectures") or []
    if not architectures:
        return None
    for name in architectures:
        if name in known:
            return known[name]
    raise ValueError(f"{what}: architectures {architectures} name none of {sorted(known)}")


def _as_config_dict(config: Mapping[str, Any] | Any) -> dict:
    return dict(config) if isinstance(config, Mapping) else {}


def _dummy_text_inputs(cfg: CLIPTextEncoderConfig) -> tuple[jax.ShapeDtypeStruct]:
    return (jax.ShapeDtypeStruct((1, cfg.max_position_embeddings), jnp.int32),)


def _dummy_vision_inputs(cfg: CLIPVisionEncoderConfig) -> tuple[jax.ShapeDtypeStruct]:
    return (jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)


def _init(module, inputs, key, dtype, shapes_only: bool) -> dict:
    def init():
        params = module.init(key, *(jnp.zeros(x.shape, x.dtype) for x in inputs), output_hidden_states=False)
        return jax.tree.map(lambda p: p.astype(dtype), params["params"])

    # Eager rather than jitted: one compiled init of ~400 truncated-normal leaves takes longer than running
    # them one by one (same-shape ops of every layer share one compiled kernel).
    return jax.eval_shape(init) if shapes_only else init()


def build_clip_text_encoder(config: Mapping[str, Any] | CLIPTextEncoderConfig, *,
                            with_projection: bool | None = None, dtype: Any = "float32",
                            implementation: str = "xla"):
    """The module (no params) for a text encoder ``config.json`` dict or config. ``with_projection`` None:
    from ``config["architectures"]``. ``dtype`` is the compute dtype. Returns ``(module, config)``."""
    cfg = config if isinstance(config, CLIPTextEncoderConfig) else CLIPTextEncoderConfig.from_dict(config)
    if with_projection is None:
        with_projection = _with_projection(_as_config_dict(config), _TEXT_ARCHITECTURES, "CLIP text encoder")
    if with_projection is None:
        raise ValueError("CLIP text encoder: config names no architectures; pass with_projection")
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg, dtype=jnp.dtype(dtype), implementation=implementation), cfg


def build_clip_vision_encoder(config: Mapping[str, Any] | CLIPVisionEncoderConfig, *,
                              with_projection: bool | None = None, dtype: Any = "float32",
                              implementation: str = "xla"):
    """As ``build_clip_text_encoder``, for image encoders. Returns ``(module, config)``."""
    cfg = config if isinstance(config, CLIPVisionEncoderConfig) else CLIPVisionEncoderConfig.from_dict(config)
    if with_projection is None:
        with_projection = _with_projection(_as_config_dict(config), _VISION_ARCHITECTURES, "CLIP image encoder")
    if with_projection is None:
        raise ValueError("CLIP image encoder: config names no architectures; pass with_projection")
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    return cls(cfg, dtype=jnp.dtype(dtype), implementation=implementation), cfg


def init_clip_text_encoder(config: Mapping[str, Any] | CLIPTextEncoderConfig, *,
                           with_projection: bool | None = None, dtype: Any = "float32",
                           key: jax.Array | None = None, shapes_only: bool = False):
    """Random params for a text encoder config, no weights read. ``shapes_only``: ``jax.ShapeDtypeStruct``
    leaves via ``jax.eval_shape`` (nothing allocated). Returns ``(module, params)``."""
    module, cfg = build_clip_text_encoder(config, with_projection=with_projection, dtype=dtype)
    key = jax.random.key(0) if key is None else key
    return module, _init(module, _dummy_text_inputs(cfg), key, jnp.dtype(dtype), shapes_only)


def init_clip_vision_encoder(config: Mapping[str, Any] | CLIPVisionEncoderConfig, *,
                             with_projection: bool | None = None, dtype: Any = "float32",
                             key: jax.Array | None = None, shapes_only: bool = False):
    """As ``init_clip_text_encoder``, for image encoders. Returns ``(module, params)``."""
    module, cfg = build_clip_vision_encoder(config, with_projection=with_projection, dtype=dtype)
    key = jax.random.key(0) if key is None else key
    return module, _init(module, _dummy_vision_inputs(cfg), key, jnp.dtype(dtype), shapes_only)


def _normalise_keys(state_dict: Mapping[str, np.ndarray], body: str) -> dict[str, np.ndarray]:
    """Drop ``position_ids`` buffers; prefix a bare transformers-5 ``CLIP{Text,Vision}Model`` file."""
    tensors = {k: v for k, v in state_dict.items() if not k.endswith(".position_ids")}
    if tensors and not any(k.startswith(body + ".") for k in tensors):
        tensors = {f"{body}.{k}": v for k, v in tensors.items()}
    return tensors


def _load(folder, dtype, build, dummy_inputs, known, body: str, projection_key: str, what: str):
    folder = os.fspath(folder)
    config = read_json(os.path.join(folder, "config.json"))
    state_dict = read_model_folder(folder, "model")
    with_projection = _with_projection(config, known, f"{folder}: {what}")
    if with_projection is None:  # older configs may omit architectures; the weights tell
        with_projection = projection_key in state_dict
    module, cfg = build(config, with_projection=with_projection, dtype=dtype)
    expected = _init(module, dummy_inputs(cfg), jax.random.key(0), jnp.dtype(dtype), shapes_only=True)
    params = torch_to_flax(_normalise_keys(state_dict, body), expected,
                           what=f"{folder} ({type(module).__name__})", dtype=jnp.dtype(dtype))
    return module, jax.tree.map(jnp.asarray, params), cfg


def load_clip_text_encoder(folder: str | os.PathLike, dtype: Any = "float32"):
    """A transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` folder -> ``(module, params, config)``.

    The class comes from ``config["architectures"]``; params are cast to ``dtype``, which is also the module's
    compute dtype. Raises ``WeightFileError`` listing every missing, unexpected or mis-shaped tensor.
    """
    return _load(folder, dtype, build_clip_text_encoder, _dummy_text_inputs, _TEXT_ARCHITECTURES,
                 "text_model", "text_projection.weight", "CLIP text encoder")


def load_clip_vision_encoder(folder: str | os.PathLike, dtype: Any = "float32"):
    """A transformers ``CLIPVisionModelWithProjection`` (or ``CLIPVisionModel``) folder, e.g. IP-Adapter's
    ``image_encoder`` -> ``(module, params, config)``. As ``load_clip_text_encoder`` otherwise."""
    return _load(folder, dtype, build_clip_vision_encoder, _dummy_vision_inputs, _VISION_ARCHITECTURES,
                 "vision_model", "visual_projection.weight", "CLIP image encoder")


__all__ = [
    "WeightFileError",
    "build_clip_text_encoder",
    "build_clip_vision_encoder",
    "init_clip_text_encoder",
    "init_clip_vision_encoder",
    "load_clip_text_encoder",
    "load_clip_vision_encoder",
]
