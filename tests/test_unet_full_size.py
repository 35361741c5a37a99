"""The real SD1.5 and SDXL UNet configs (shared/reference/configs) with random weights: parameter counts
equal diffusers', a new SD1.5 adapter has the published size, and (slow) a full-size forward matches
diffusers at a small latent size."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ipadapter_jax.models.adapter import new_ip_adapter
from ipadapter_jax.models.image_projection import ProjectionConfig
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.weights.load_unet import unet_param_shapes

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs"
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "ipadapter_jax" / "reference_configs"


def _config(name: str) -> dict:
    for folder in (REPO_CONFIGS, CONFIGS):
        if (folder / f"{name}.json").is_file():
            return json.loads((folder / f"{name}.json").read_text())
    raise FileNotFoundError(name)


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _diffusers_count(config: dict) -> int:
    from diffusers import UNet2DConditionModel as TorchUNet

    with torch.device("meta"):
        unet = TorchUNet.from_config(config)
    return sum(p.numel() for p in unet.parameters())


@pytest.mark.parametrize("name,expected", [("sd15_unet", 859_520_964), ("sdxl_unet", 2_567_463_684)])
def test_parameter_count_equals_diffusers(name, expected):
    raw = _config(name)
    ours = _count(unet_param_shapes(UNetConfig.from_diffusers(raw)))
    assert ours == _diffusers_count(raw) == expected


def test_new_sd15_adapter_has_the_published_size():
    config = UNetConfig.from_diffusers(_config("sd15_unet"))
    assert len(config.cross_attention_layers()) == 16
    projection = ProjectionConfig("plain", embed_dim=1024, cross_attention_dim=768, num_tokens=4)
    shapes = jax.eval_shape(lambda p: new_ip_adapter(config, p, projection, jax.random.key(0)).params,
                            unet_param_shapes(config))
    assert _count(shapes) == 22_319_616  # the paper's "about 22M": 3.15M projection + 19.17M k/v


def test_sdxl_adapter_layer_count():
    assert len(UNetConfig.from_diffusers(_config("sdxl_unet")).cross_attention_layers()) == 70


def test_full_size_forward_shapes_trace():
    """Abstract evaluation of full-size forwards (with an adapter): shapes and dtypes without the memory."""
    for name in ("sd15_unet", "sdxl_unet"):
        config = UNetConfig.from_diffusers(_config(name))
        module = UNet2DConditionModel(config, dtype=jnp.bfloat16)
        sample, t, text, added = module.dummy_inputs(latent_size=16, batch=2)
        out = jax.eval_shape(lambda p: module.apply({"params": p}, sample, t, text, added),
                             unet_param_shapes(config))
        assert out.shape == (2, 16, 16, 4) and out.dtype == jnp.bfloat16


@pytest.mark.slow
def test_full_size_sd15_matches_diffusers_at_small_latents():
    from diffusers import UNet2DConditionModel as TorchUNet

    from ipadapter_jax.testing.random_weights import randomize_
    from ipadapter_jax.weights.torch_layout import torch_to_flax

    raw = _config("sd15_unet")
    torch.manual_seed(0)
    unet = randomize_(TorchUNet.from_config(raw).eval(), std=0.02)
    config = UNetConfig.from_diffusers(raw)
    params = torch_to_flax({k: v.numpy() for k, v in unet.state_dict().items()}, unet_param_shapes(config))
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 768)
    with torch.no_grad():
        ref = unet(x, t, text).sample.numpy()
    del unet
    out = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                                                      jnp.asarray(t.numpy()), jnp.asarray(text.numpy()))
    err = np.abs(np.asarray(out).transpose(0, 3, 1, 2) - ref).max()
    assert err <= 1e-3 * max(1.0, np.abs(ref).max()), err
