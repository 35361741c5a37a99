"""Our ControlNet against diffusers' ``ControlNetModel`` (PyTorch, CPU, fp32), and the UNet's residual inputs
against diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``.

Tiny random ControlNets are made as diffusers makes them (``ControlNetModel.from_unet`` of the tiny test
UNets), saved with ``save_pretrained`` and loaded from disk on both sides. Metric: max |ours - diffusers|
over every residual (or the UNet's output), <= 1e-4.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import TINY_UNETS
from ipadapter_jax.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_params_from_unet
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.testing.random_weights import randomize_
from ipadapter_jax.weights.load_controlnet import controlnet_param_shapes, load_controlnet, save_controlnet
from ipadapter_jax.weights.load_unet import load_unet
from ipadapter_jax.weights.safetensors_io import WeightFileError, read_safetensors, write_safetensors
from test_unet_full_size import _config as reference_config, _count

TOL = 1e-4
BATCH = 2
LATENT = 8
# name -> (tiny UNet it is made from, from_unet options, config changes from_unet cannot make)
CONTROLNETS = {
    "sd15": ("sd15", {"conditioning_embedding_out_channels": (4, 8, 8, 16)}, {}),
    "sdxl": ("sdxl", {"conditioning_embedding_out_channels": (4, 8, 8, 16)}, {}),
    # Old-style options: BGR control images with a 4th channel, one coarse stage (2x), pooled residuals.
    "sd15_pooled_bgr": ("sd15", {"conditioning_embedding_out_channels": (8, 16), "conditioning_channels": 4,
                                 "controlnet_conditioning_channel_order": "bgr"}, {"global_pool_conditions": True}),
}


def _nhwc(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def _nchw(a) -> np.ndarray:
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def controlnet_dirs(tmp_path_factory):
    """``{name: folder}``: diffusers ControlNets with random weights, saved with ``save_pretrained``."""
    from diffusers import ControlNetModel as TorchControlNet, UNet2DConditionModel as TorchUNet

    out = {}
    for seed, (name, (unet_name, options, changes)) in enumerate(CONTROLNETS.items()):
        torch.manual_seed(0)
        net = TorchControlNet.from_unet(TorchUNet(**TINY_UNETS[unet_name]), **options)
        if changes:  # (without the "_" keys: "_use_default_values" would undo the changes)
            config = {k: v for k, v in net.config.items() if not k.startswith("_")}
            net = TorchControlNet.from_config({**config, **changes})
            assert all(net.config[k] == v for k, v in changes.items())
        net = randomize_(net.eval(), seed=10 + seed)
        out[name] = tmp_path_factory.mktemp(f"controlnet_{name}")
        net.save_pretrained(out[name])
    return out


class Setup:
    """diffusers' ControlNet and ours, loaded from the same folder, and one set of inputs."""

    def __init__(self, name, folder):
        from diffusers import ControlNetModel as TorchControlNet

        self.name, self.unet_name = name, CONTROLNETS[name][0]
        self.torch_net = TorchControlNet.from_pretrained(folder).eval()
        self.module, self.params, self.config = load_controlnet(folder)
        gen = torch.Generator().manual_seed(0)
        f = self.config.control_image_factor
        self.x = torch.randn(BATCH, 4, LATENT, LATENT, generator=gen)
        self.t = torch.tensor([3, 700])
        self.text = torch.randn(BATCH, 7, self.config.cross_attention_dim, generator=gen)
        self.cond = torch.rand(BATCH, self.config.conditioning_channels, LATENT * f, LATENT * f, generator=gen)
        self.torch_added, self.added = {}, None
        if self.config.addition_embed_type == "text_time":
            self.torch_added = {"text_embeds": torch.randn(BATCH, 16, generator=gen),
                                "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128], [96, 160, 8, 0, 128, 128]])}
            self.added = {k: jnp.asarray(v.numpy()) for k, v in self.torch_added.items()}

        @functools.partial(jax.jit, static_argnames="guess_mode")
        def run(params, x, t, text, cond, scale, added, guess_mode):
            return self.module.apply({"params": params}, x, t, text, cond, scale, added, guess_mode=guess_mode)

        self._run = run

    def run_torch(self, scale, guess_mode):
        with torch.no_grad():
            down, mid = self.torch_net(self.x, self.t, self.text, self.cond, conditioning_scale=scale,
                                       added_cond_kwargs=self.torch_added, guess_mode=guess_mode, return_dict=False)
        return [d.numpy() for d in down], mid.numpy()

    def run_ours(self, scale, guess_mode):
        out = self._run(self.params, _nhwc(self.x), jnp.asarray(self.t.numpy()), jnp.asarray(self.text.numpy()),
                        _nhwc(self.cond), scale, self.added, guess_mode=guess_mode)
        return [_nchw(d) for d in out.down_block_residuals], _nchw(out.mid_block_residual)


@pytest.fixture(scope="module", params=list(CONTROLNETS))
def setup(request, controlnet_dirs):
    return Setup(request.param, controlnet_dirs[request.param])


def test_residuals_match_diffusers(setup):
    outputs = {}
    for scale, guess_mode in ((1.0, False), (0.8, False), (0.8, True)):
        ref_down, ref_mid = setup.run_torch(scale, guess_mode)
        down, mid = setup.run_ours(scale, guess_mode)
        assert len(down) == len(ref_down)
        for i, (a, b) in enumerate(zip(down + [mid], ref_down + [ref_mid])):
            assert a.shape == b.shape, (i, a.shape, b.shape)
            err = np.abs(a - b).max()
            assert err <= TOL, f"{setup.name} scale={scale} guess={guess_mode} residual {i}: max abs diff {err:.2e}"
        outputs[(scale, guess_mode)] = (down, mid)
    # The residuals carry signal, and scale and guess mode change them as they should.
    down, mid = outputs[(1.0, False)]
    assert min(np.abs(d).max() for d in down + [mid]) > 1e-3
    np.testing.assert_allclose(outputs[(0.8, False)][1], 0.8 * mid, rtol=1e-5, atol=1e-6)
    if not setup.config.global_pool_conditions:
        np.testing.assert_allclose(outputs[(0.8, True)][0][0], 0.08 * down[0], rtol=1e-5, atol=1e-6)
    else:
        assert all(d.shape[2:] == (1, 1) for d in down + [mid])


def test_unet_with_residuals_matches_diffusers(setup, tiny_unet_dirs):
    """diffusers' residuals into diffusers' UNet and ours (same weights): the residual inputs alone."""
    from diffusers import UNet2DConditionModel as TorchUNet

    folder = tiny_unet_dirs[setup.unet_name]
    torch_unet = TorchUNet.from_pretrained(folder).eval()
    module, params, _ = load_unet(folder)
    down, mid = setup.run_torch(0.8, False)
    with torch.no_grad():
        ref = torch_unet(setup.x, setup.t, setup.text, added_cond_kwargs=setup.torch_added,
                         down_block_additional_residuals=[torch.from_numpy(d) for d in down],
                         mid_block_additional_residual=torch.from_numpy(mid)).sample.numpy()
        plain = torch_unet(setup.x, setup.t, setup.text, added_cond_kwargs=setup.torch_added).sample.numpy()
    ours = jax.jit(module.apply)({"params": params}, _nhwc(setup.x), jnp.asarray(setup.t.numpy()),
                                 jnp.asarray(setup.text.numpy()), setup.added,
                                 down_block_additional_residuals=[jnp.asarray(d.transpose(0, 2, 3, 1)) for d in down],
                                 mid_block_additional_residual=jnp.asarray(mid.transpose(0, 2, 3, 1)))
    err = np.abs(_nchw(ours) - ref).max()
    assert err <= TOL, f"{setup.name}: max abs diff {err:.2e}"
    assert np.abs(ref - plain).max() > 1e-2  # the residuals really move the prediction


def test_unet_residual_arguments_are_checked(tiny_unet_dirs):
    module, params, config = load_unet(tiny_unet_dirs["sd15"])
    x, t, text, added = module.dummy_inputs(latent_size=LATENT, text_tokens=7, batch=1)
    shapes = [s.shape for s in jax.eval_shape(lambda: _encoder_skips(config, LATENT))]
    residuals = [jnp.zeros(s) for s in shapes]
    mid = jnp.zeros((1, LATENT // 2, LATENT // 2, config.block_out_channels[-1]))
    apply = lambda **kw: jax.eval_shape(lambda: module.apply({"params": params}, x, t, text, added, **kw))  # noqa: E731
    assert apply(down_block_additional_residuals=residuals, mid_block_additional_residual=mid).shape == x.shape
    with pytest.raises(ValueError, match="give both or neither"):
        apply(down_block_additional_residuals=residuals)
    with pytest.raises(ValueError, match=f"{len(residuals) - 1} arrays for {len(residuals)} states"):
        apply(down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=mid)
    with pytest.raises(ValueError, match=r"mid_block_additional_residual\[0\]: shape"):
        apply(down_block_additional_residuals=residuals, mid_block_additional_residual=residuals[0])


def _encoder_skips(config: UNetConfig, latent: int):
    """The UNet's skip-state shapes, as a ControlNet of it produces them."""
    net = ControlNetModel(ControlNetConfig.from_unet(config))
    inputs = net.dummy_inputs(latent, text_tokens=7)
    out = net.apply({"params": net.init_params(jax.random.key(0), latent, 7)}, *inputs)
    return out.down_block_residuals


def test_control_image_shape_is_checked(setup):
    bad = jnp.zeros((BATCH, LATENT, LATENT, setup.config.conditioning_channels))
    with pytest.raises(ValueError, match="controlnet_cond: shape"):
        jax.eval_shape(lambda: setup.module.apply({"params": setup.params}, _nhwc(setup.x), 0,
                                                  jnp.asarray(setup.text.numpy()), bad, 1.0, setup.added))


def test_new_controlnet_from_unet_matches_diffusers_from_unet(tiny_unet_dirs):
    """``ControlNetConfig.from_unet`` + ``controlnet_params_from_unet`` make what diffusers'
    ``ControlNetModel.from_unet`` makes, up to the control-image embedding's random stages."""
    from diffusers import ControlNetModel as TorchControlNet, UNet2DConditionModel as TorchUNet

    from ipadapter_jax.weights.torch_layout import flax_to_torch

    folder = tiny_unet_dirs["sdxl"]
    torch_net = TorchControlNet.from_unet(TorchUNet.from_pretrained(folder))
    _, unet_params, unet_config = load_unet(folder)
    config = ControlNetConfig.from_unet(unet_config)
    assert config == ControlNetConfig.from_diffusers(dict(torch_net.config))
    ours = flax_to_torch(controlnet_params_from_unet(config, unet_params, jax.random.key(0)))
    theirs = {k: v.numpy() for k, v in torch_net.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    random_stages = [k for k in theirs if k.startswith("controlnet_cond_embedding.")
                     and not k.startswith("controlnet_cond_embedding.conv_out.")]
    for key in sorted(set(theirs) - set(random_stages)):
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    assert all(not ours[k].any() for k in ours if k.startswith(("controlnet_down", "controlnet_mid")))


def test_save_controlnet_round_trips_through_diffusers(setup, tmp_path):
    from diffusers import ControlNetModel as TorchControlNet

    save_controlnet(setup.params, setup.config, tmp_path)
    reloaded = TorchControlNet.from_pretrained(tmp_path)
    assert ControlNetConfig.from_diffusers(dict(reloaded.config)) == setup.config
    theirs = setup.torch_net.state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)


def _controlnet_config_like_from_unet(unet: dict) -> dict:
    """The config diffusers' ``ControlNetModel.from_unet`` gives a UNet with this config (its defaults for
    the ControlNet's own options)."""
    keys = ("transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type",
            "addition_time_embed_dim", "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
            "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
            "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
            "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
            "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
            "projection_class_embeddings_input_dim", "mid_block_type")
    return {k: unet[k] for k in keys if k in unet}


@pytest.mark.parametrize("name,expected", [("sd15_unet", 361_279_120), ("sdxl_unet", 1_251_014_160)])
def test_parameter_count_equals_diffusers(name, expected):
    from diffusers import ControlNetModel as TorchControlNet

    unet_raw = reference_config(name)
    raw = _controlnet_config_like_from_unet(unet_raw)
    config = ControlNetConfig.from_diffusers(raw)
    assert config == ControlNetConfig.from_unet(UNetConfig.from_diffusers(unet_raw))
    assert ControlNetConfig.from_diffusers(config.to_diffusers()) == config
    ours = _count(controlnet_param_shapes(config))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in TorchControlNet.from_config(raw).parameters())
        rebuilt = sum(p.numel() for p in TorchControlNet.from_config(config.to_diffusers()).parameters())
    assert ours == theirs == rebuilt == expected


def test_load_errors_are_one_line(controlnet_dirs, tiny_unet_dirs, tmp_path):
    good = controlnet_dirs["sd15"]
    with pytest.raises(WeightFileError, match="config.json: no such file"):
        load_controlnet(tmp_path / "absent")
    with pytest.raises(WeightFileError, match="a UNet2DConditionModel config, not a ControlNetModel"):
        load_controlnet(tiny_unet_dirs["sd15"])

    raw = json.loads((good / "config.json").read_text())
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text(json.dumps({**raw, "addition_embed_type": "text"}))
    with pytest.raises(WeightFileError, match=r"config.json: controlnet config: addition_embed_type='text'"):
        load_controlnet(bad_config)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(raw))
    with pytest.raises(WeightFileError, match="expected diffusion_pytorch_model.safetensors"):
        load_controlnet(no_weights)

    state = read_safetensors(good / "diffusion_pytorch_model.safetensors")
    state.pop("controlnet_mid_block.weight")
    state["controlnet_extra.weight"] = np.zeros((1,), np.float32)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text(json.dumps(raw))
    write_safetensors(state, damaged / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightFileError) as err:
        load_controlnet(damaged)
    message = str(err.value)
    assert "missing keys (1): controlnet_mid_block.weight" in message
    assert "unexpected keys (1): controlnet_extra.weight" in message


@pytest.mark.slow
def test_full_size_sd15_controlnet_matches_diffusers_at_small_latents():
    from diffusers import ControlNetModel as TorchControlNet

    from ipadapter_jax.weights.torch_layout import torch_to_flax

    raw = _controlnet_config_like_from_unet(reference_config("sd15_unet"))
    torch.manual_seed(0)
    net = randomize_(TorchControlNet.from_config(raw).eval(), std=0.02)
    config = ControlNetConfig.from_diffusers(raw)
    params = torch_to_flax({k: v.numpy() for k, v in net.state_dict().items()}, controlnet_param_shapes(config))
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 768)
    cond = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref_down, ref_mid = net(x, t, text, cond, conditioning_scale=0.8, return_dict=False)
        ref = [r.numpy() for r in (*ref_down, ref_mid)]
    del net
    out = jax.jit(ControlNetModel(config).apply)({"params": params}, _nhwc(x), jnp.asarray(t.numpy()),
                                                 jnp.asarray(text.numpy()), _nhwc(cond), 0.8)
    ours = [_nchw(r) for r in (*out.down_block_residuals, out.mid_block_residual)]
    assert len(ours) == len(ref) == 13
    for i, (a, b) in enumerate(zip(ours, ref)):
        err = np.abs(a - b).max()
        assert err <= 1e-3 * max(1.0, np.abs(b).max()), (i, err)
