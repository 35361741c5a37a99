"""Reading a diffusers ``unet/`` folder into our Flax UNet, and writing one back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.weights.safetensors_io import read_json, read_model_folder, write_model_folder
from ipadapter_jax.weights.torch_layout import flax_to_torch, torch_to_flax

WEIGHTS_NAME = "diffusion_pytorch_model"


def unet_param_shapes(config: UNetConfig) -> Any:
    """The param tree's shapes, computed without allocating (works for full-size configs)."""
    module = UNet2DConditionModel(config)
    return jax.eval_shape(lambda: module.init_params(jax.random.key(0)))


def load_unet(folder: str | os.PathLike, dtype: Any = jnp.float32, **module_kwargs):
    """``folder`` holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or a sharded index).

    Returns ``(module, params, config)``; params are cast to ``dtype`` and the module computes in it.
    Raises ``WeightFileError`` naming every missing/unexpected key and shape mismatch.
    """
    folder = Path(folder)
    raw_config = read_json(folder / "config.json")
    config = UNetConfig.from_diffusers(raw_config)
    state = read_model_folder(folder, WEIGHTS_NAME)
    params = torch_to_flax(state, unet_param_shapes(config), what=f"UNet at {folder}", dtype=dtype)
    params = jax.tree.map(jnp.asarray, params)
    module = UNet2DConditionModel(config, dtype=dtype, **module_kwargs)
    return module, params, config


def save_unet(params: Any, raw_config: dict, folder: str | os.PathLike) -> None:
    """Write a diffusers-format ``unet/`` folder (config.json + safetensors) that diffusers loads."""
    write_model_folder(flax_to_torch(params), {"_class_name": "UNet2DConditionModel", **raw_config}, folder,
                       WEIGHTS_NAME)
