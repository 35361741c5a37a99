"""Reading a diffusers ``ControlNetModel`` folder into our Flax ControlNet, and writing one back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ipadapter_jax.models.controlnet import ControlNetConfig, ControlNetModel
from ipadapter_jax.weights.load_unet import WEIGHTS_NAME
from ipadapter_jax.weights.safetensors_io import WeightFileError, read_json, read_model_folder, write_model_folder
from ipadapter_jax.weights.torch_layout import flax_to_torch, torch_to_flax

CLASS_NAME = "ControlNetModel"


def controlnet_param_shapes(config: ControlNetConfig) -> Any:
    """The param tree's shapes, computed without allocating (works for full-size configs)."""
    module = ControlNetModel(config)
    return jax.eval_shape(lambda: module.init_params(jax.random.key(0)))


def read_controlnet_config(folder: str | os.PathLike) -> ControlNetConfig:
    """``folder/config.json`` as a ``ControlNetConfig``; a missing file, another model's config or options
    this implementation does not build are one-line ``ValueError``s naming the file."""
    path = Path(folder) / "config.json"
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise WeightFileError(f"{path}: a JSON {type(raw).__name__}, not a config object")
    name = raw.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise WeightFileError(f"{path}: a {name} config, not a {CLASS_NAME} (is this the ControlNet folder?)")
    try:
        return ControlNetConfig.from_diffusers(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise WeightFileError(f"{path}: {e}") from None


def load_controlnet(folder: str | os.PathLike, dtype: Any = jnp.float32, **module_kwargs):
    """``folder`` holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or a sharded index), as
    diffusers' ``ControlNetModel.save_pretrained`` writes them.

    Returns ``(module, params, config)``; params are cast to ``dtype`` and the module computes in it.
    Raises ``WeightFileError`` naming every missing/unexpected key and shape mismatch.
    """
    folder = Path(folder)
    config = read_controlnet_config(folder)
    state = read_model_folder(folder, WEIGHTS_NAME)
    params = torch_to_flax(state, controlnet_param_shapes(config), what=f"ControlNet at {folder}", dtype=dtype)
    params = jax.tree.map(jnp.asarray, params)
    return ControlNetModel(config, dtype=dtype, **module_kwargs), params, config


def save_controlnet(params: Any, config: ControlNetConfig, folder: str | os.PathLike) -> None:
    """Write a diffusers ``ControlNetModel`` folder (config.json + float32 safetensors) that diffusers loads."""
    write_model_folder(flax_to_torch(params), config.to_diffusers(), folder, WEIGHTS_NAME)
