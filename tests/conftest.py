"""Shared fixtures: tiny random diffusers UNets saved to disk, and random IP-Adapter files in the
published layout, built independently of our own writer (from the torch model's processor names)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

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


def randomize_(module, std: float = 0.1, seed: int = 0):
    """diffusers zero-initialises some layers (conv_out, proj_out); random weights exercise every path."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


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


def torch_cross_attention_widths(unet) -> list[int]:
    """Inner widths of the torch UNet's cross-attentions, in ``attn_processors`` order."""
    modules = dict(unet.named_modules())
    return [modules[name[: -len(".processor")]].to_k.weight.shape[0]
            for name in unet.attn_processors if name.endswith("attn2.processor")]


def random_ip_adapter_state(widths: list[int], cross_dim: int, variant: str, seed: int,
                            embed_dim: int = 16, hidden_dim: int = 128, depth: int = 4, queries: int = 6,
                            std: float = 0.2) -> dict[str, dict[str, np.ndarray]]:
    """A published-layout state dict ``{"image_proj": ..., "ip_adapter": ...}`` of random float32 arrays.

    Plus uses depth 4 and 64-wide heads: diffusers' loader builds exactly that whatever the file holds."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: (rng.standard_normal(shape) * std).astype(np.float32)  # noqa: E731
    if variant == "plain":
        proj = {"proj.weight": r(4 * cross_dim, embed_dim), "proj.bias": r(4 * cross_dim),
                "norm.weight": 1 + r(cross_dim), "norm.bias": r(cross_dim)}
    elif variant == "plus":
        proj = {"latents": r(1, queries, hidden_dim), "proj_in.weight": r(hidden_dim, embed_dim),
                "proj_in.bias": r(hidden_dim), "proj_out.weight": r(cross_dim, hidden_dim),
                "proj_out.bias": r(cross_dim), "norm_out.weight": 1 + r(cross_dim), "norm_out.bias": r(cross_dim)}
        for i in range(depth):
            p = f"layers.{i}"
            proj.update({
                f"{p}.0.norm1.weight": 1 + r(hidden_dim), f"{p}.0.norm1.bias": r(hidden_dim),
                f"{p}.0.norm2.weight": 1 + r(hidden_dim), f"{p}.0.norm2.bias": r(hidden_dim),
                f"{p}.0.to_q.weight": r(hidden_dim, hidden_dim), f"{p}.0.to_kv.weight": r(2 * hidden_dim, hidden_dim),
                f"{p}.0.to_out.weight": r(hidden_dim, hidden_dim),
                f"{p}.1.0.weight": 1 + r(hidden_dim), f"{p}.1.0.bias": r(hidden_dim),
                f"{p}.1.1.weight": r(4 * hidden_dim, hidden_dim), f"{p}.1.3.weight": r(hidden_dim, 4 * hidden_dim),
            })
    else:
        raise ValueError(variant)
    layers = {}
    for i, width in enumerate(widths):
        layers[f"{2 * i + 1}.to_k_ip.weight"] = r(width, cross_dim)
        layers[f"{2 * i + 1}.to_v_ip.weight"] = r(width, cross_dim)
    return {"image_proj": proj, "ip_adapter": layers}


def write_ip_adapter_state(state, path) -> None:
    from safetensors.numpy import save_file

    flat = {f"{part}.{k}": v for part in ("image_proj", "ip_adapter") for k, v in state[part].items()}
    save_file(flat, str(path))
