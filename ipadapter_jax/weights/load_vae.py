"""Reading and writing diffusers ``AutoencoderKL`` folders (``config.json`` +
``diffusion_pytorch_model.safetensors``) for ``ipadapter_jax.models.vae.AutoencoderKL``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig
from ipadapter_jax.weights.safetensors_io import read_json, read_model_folder, write_model_folder
from ipadapter_jax.weights.torch_layout import flax_to_torch, torch_to_flax

WEIGHTS_NAME = "diffusion_pytorch_model"

# Checkpoints saved before diffusers' attention refactor name the mid-block attention projections
# query/key/value/proj_attn; diffusers renames them on load, and so do we.
_OLD_ATTENTION_KEY = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
_NEW_ATTENTION_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_attention_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``...mid_block.attentions.0.query.weight`` -> ``...to_q.weight`` (likewise key, value, proj_attn).

    Their 1x1-conv ``[C, C, 1, 1]`` layout, found in some converted LDM checkpoints, is left for
    ``torch_to_flax``, which accepts a 1x1 conv where a Dense is expected.
    """
    out = {}
    for key, value in state_dict.items():
        m = _OLD_ATTENTION_KEY.match(key)
        if m:
            key = f"{m.group(1)}.{_NEW_ATTENTION_NAME[m.group(2)]}.{key[m.end():]}"
        out[key] = value
    return out


def _example_image(config: VAEConfig) -> jax.ShapeDtypeStruct:
    # The smallest image every downsampler accepts; param shapes do not depend on it.
    side = config.downsample_factor
    return jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)


def vae_param_shapes(config: VAEConfig) -> dict:
    """The param tree of ``AutoencoderKL(config)`` as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    module = AutoencoderKL(config)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), _example_image(config))["params"]


def init_vae_params(config: VAEConfig, rng: jax.Array) -> dict:
    """Randomly initialised float32 params for ``AutoencoderKL(config)`` (flax's initialisers)."""
    module = AutoencoderKL(config)
    example = _example_image(config)
    return jax.jit(module.init)(rng, jnp.zeros(example.shape, example.dtype))["params"]


def load_vae(
    folder: str | os.PathLike, dtype: str | jnp.dtype = "float32"
) -> tuple[AutoencoderKL, dict, VAEConfig]:
    """Load a diffusers ``AutoencoderKL`` folder (single or sharded safetensors).

    ``dtype`` is both the dtype the params are stored in and the module's compute dtype.
    Raises ``WeightFileError`` naming every missing / unexpected / mis-shaped tensor.
    """
    folder = Path(folder)
    config = VAEConfig.from_diffusers(read_json(folder / "config.json"))
    state_dict = rename_legacy_attention_keys(read_model_folder(folder, WEIGHTS_NAME))
    dtype = jnp.dtype(dtype)
    params = torch_to_flax(state_dict, vae_param_shapes(config), what=f"VAE {folder}", dtype=dtype)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return AutoencoderKL(config, dtype=dtype), params, config


def vae_to_diffusers_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our params -> a diffusers ``AutoencoderKL`` state dict (diffusers 0.42 names and layouts)."""
    return flax_to_torch(params)


def save_vae(config: VAEConfig, params: Mapping[str, Any], folder: str | os.PathLike) -> None:
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` in diffusers' layout, loadable by
    ``diffusers.AutoencoderKL.from_pretrained(folder)``."""
    # dtype=None: bfloat16 params are written as BF16 and so round-trip to torch.bfloat16.
    write_model_folder(vae_to_diffusers_state_dict(params), config.to_diffusers(), folder, WEIGHTS_NAME, dtype=None)
