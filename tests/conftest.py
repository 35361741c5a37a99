"""Shared fixtures: tiny random diffusers UNets saved to disk, and random IP-Adapter files in the
published layout, built independently of our own writer (from the torch model's processor names)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from ipadapter_jax.testing.random_weights import (  # noqa: F401 (re-exported for tests)
    random_ip_adapter_state, randomize_, torch_cross_attention_widths, write_ip_adapter_state)

TINY_SD15 = dict(
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, layers_per_block=2,
    attention_head_dim=4, norm_num_groups=8, sample_size=16,
)
TINY_SDXL = dict(
    block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=48,
    layers_per_block=2, attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8, sample_size=16,
)
TINY_UNETS = {"sd15": TINY_SD15, "sdxl": TINY_SDXL}


@pytest.fixture(scope="session")
def tiny_unet_dirs(tmp_path_factory):
    """``{"sd15": path, "sdxl": path}``: diffusers UNet folders with random weights."""
    import torch
    from diffusers import UNet2DConditionModel

    out = {}
    for name, config in TINY_UNETS.items():
        torch.manual_seed(0)
        unet = randomize_(UNet2DConditionModel(**config).eval(), seed=1)
        path = tmp_path_factory.mktemp(f"unet_{name}")
        unet.save_pretrained(path)
        out[name] = path
    return out
