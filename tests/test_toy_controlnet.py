"""The toy ControlNet's trainer (``ipadapter_jax/toy/controlnet.py``): edge maps, and a miniature run on the
shipped toy base whose output diffusers loads and computes the same residuals from."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ipadapter_jax.toy.controlnet import (ToyControlNetSettings, controlnet_generator, edge_f1, edge_map,
                                          train_toy_controlnet)
from ipadapter_jax.toy.shapes_dataset import SUPERSAMPLE, ShapeSpec, render
from ipadapter_jax.toy_assets import ASSETS


def test_edge_map_marks_the_outline_of_each_picture_alone():
    s = SUPERSAMPLE
    square = render(ShapeSpec("red", "square", "white", left=8 * s, top=8 * s, size=16 * s))  # pixels 8..23
    circle = render(ShapeSpec("blue", "circle", "black", left=4 * s, top=10 * s, size=14 * s))
    edges = edge_map(np.stack([square, circle]))
    assert edges.shape == (2, 32, 32, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255} and (edges == edges[..., :1]).all()
    mask = edges[0, ..., 0] > 0
    ring = np.zeros((32, 32), bool)
    ring[7:25, 7:25] = True
    ring[9:23, 9:23] = False  # one pixel either side of the square's outline
    assert mask[ring].mean() > 0.9 and not mask[~ring].any()
    # Each picture on its own: no bleeding across the batch.
    np.testing.assert_array_equal(edges[1], edge_map(circle))
    assert edge_f1(square[None], edges[:1])[0] == 1.0 and edge_f1(circle[None], edges[:1])[0] < 0.5


@pytest.mark.slow  # about 55 s of CPU: compiling the training step and the sampling loop
def test_miniature_training_gives_a_controlnet_diffusers_loads(tmp_path):
    from diffusers import ControlNetModel as TorchControlNet

    from ipadapter_jax.pipeline.components import load_base_model
    from ipadapter_jax.weights.load_controlnet import load_controlnet, save_controlnet

    base = load_base_model(ASSETS / "base")
    settings = ToyControlNetSettings.miniature()
    trained = train_toy_controlnet(base, settings, log=lambda _: None)
    assert np.isfinite(trained.final_loss)
    assert trained.config.control_image_factor == base.vae_scale_factor
    save_controlnet(trained.params, trained.config, tmp_path / "controlnet")
    module, params, config = load_controlnet(tmp_path / "controlnet")
    torch_net = TorchControlNet.from_pretrained(tmp_path / "controlnet").eval()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    text = rng.standard_normal((2, 77, config.cross_attention_dim)).astype(np.float32)
    control = edge_map(render(ShapeSpec("red", "square", "white", 32, 32, 64))[None].repeat(2, 0))
    with torch.no_grad():
        down, mid = torch_net(torch.from_numpy(x), torch.tensor([10, 900]), torch.from_numpy(text),
                              torch.from_numpy(control.transpose(0, 3, 1, 2) / 255.0).float(), return_dict=False)
    ours = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray([10, 900]),
                        jnp.asarray(text), jnp.asarray(control / 255.0, jnp.float32))
    for a, b in zip((*ours.down_block_residuals, ours.mid_block_residual), (*down, mid)):
        assert np.abs(np.asarray(a).transpose(0, 3, 1, 2) - b.numpy()).max() <= 1e-4
    assert max(float(jnp.abs(r).max()) for r in ours.down_block_residuals) > 0  # two steps moved the zero convs

    generate = controlnet_generator(base, config, steps=2, guidance=4.0)
    images = generate(params, ["a red square", ""], control, 1.0, seed=0)
    assert images.shape == (2, 32, 32, 3) and 0.0 <= images.min() and images.max() <= 1.0
    # Conditioning scale 0 is the base alone: the ControlNet's contribution is what differs.
    assert np.abs(generate(params, ["a red square", ""], control, 0.0, seed=0) - images).max() > 0


SHIPPED = ASSETS / "controlnet"


def test_shipped_controlnet_fits_the_toy_base_and_loads_in_diffusers():
    from diffusers import ControlNetModel as TorchControlNet

    from ipadapter_jax.models.controlnet import ControlNetConfig
    from ipadapter_jax.weights.load_controlnet import load_controlnet
    from ipadapter_jax.weights.load_unet import load_unet

    module, params, config = load_controlnet(SHIPPED)
    _, _, unet_config = load_unet(ASSETS / "base" / "unet")
    assert config == ControlNetConfig.from_unet(unet_config, conditioning_embedding_out_channels=(16, 32, 64))
    torch_net = TorchControlNet.from_pretrained(SHIPPED).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    text = rng.standard_normal((1, 77, config.cross_attention_dim)).astype(np.float32)
    control = edge_map(render(ShapeSpec("green", "triangle", "black", 24, 20, 72)))[None]
    with torch.no_grad():
        down, mid = torch_net(torch.from_numpy(x), torch.tensor([500]), torch.from_numpy(text),
                              torch.from_numpy(control.transpose(0, 3, 1, 2) / 255.0).float(), return_dict=False)
    ours = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray([500]),
                        jnp.asarray(text), jnp.asarray(control / 255.0, jnp.float32))
    for a, b in zip((*ours.down_block_residuals, ours.mid_block_residual), (*down, mid)):
        assert np.abs(np.asarray(a).transpose(0, 3, 1, 2) - b.numpy()).max() <= 1e-4


@pytest.mark.slow
def test_shipped_controlnet_controls_structure():
    """Edges alone (empty caption) decide where and what the base draws: with the shipped ControlNet the
    generations' edges match the control edges far better than the base's alone (same seeds)."""
    from ipadapter_jax.pipeline.components import load_base_model
    from ipadapter_jax.toy.controlnet import CHECK_STREAM
    from ipadapter_jax.toy.shapes_dataset import make_examples
    from ipadapter_jax.weights.load_controlnet import load_controlnet

    base = load_base_model(ASSETS / "base")
    _, params, config = load_controlnet(SHIPPED)
    data = make_examples(8, 0, CHECK_STREAM, partial_captions=False)
    control = edge_map(data.images)
    generate = controlnet_generator(base, config, steps=10, guidance=4.0)
    without = edge_f1(generate(params, [""] * 8, control, 0.0, seed=0), control).mean()
    with_controlnet = edge_f1(generate(params, [""] * 8, control, 1.0, seed=0), control).mean()
    assert with_controlnet > 0.8 and with_controlnet > without + 0.3, (with_controlnet, without)
