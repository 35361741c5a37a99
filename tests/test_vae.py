"""Parity of our Flax AutoencoderKL with diffusers' (PyTorch) on tiny random models, and the diffusers
folder round trip. Tolerance metric: max abs difference, fp32."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.numpy import load_file, save_file

from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig, decode_latents, encode_to_latents
from ipadapter_jax.weights.load_vae import (
    init_vae_params,
    load_vae,
    save_vae,
    vae_param_shapes,
    vae_to_diffusers_state_dict,
)
from ipadapter_jax.weights.safetensors_io import WeightFileError

TOL = 1e-4
SD15_VAE_CONFIG = "/work/shared/reference/configs/sd15_vae.json"

TINY = dict(
    block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4,
)
# Exercises the optional paths: three levels, two resnets, shift, no quant convs, no mid attention.
VARIANT = dict(
    block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=4, latent_channels=3,
    in_channels=2, out_channels=5, scaling_factor=0.5, shift_factor=0.1, use_quant_conv=False,
    use_post_quant_conv=False, mid_block_add_attention=False,
)


def nchw_to_nhwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


def nhwc_to_nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def jitted(module, method):
    # One XLA compile per graph is several times faster on CPU than op-by-op dispatch of a whole VAE.
    return jax.jit(lambda params, x: module.apply({"params": params}, x, method=method))


def make_torch_vae(seed: int = 0, **config) -> TorchAutoencoderKL:
    torch.manual_seed(seed)
    vae = TorchAutoencoderKL(**config).eval()
    # diffusers initialises norms to identity and some biases to zero; perturb every tensor so that a
    # swapped scale/bias or a wrong layout cannot hide.
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    vae = make_torch_vae(**TINY)
    folder = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(folder)
    return vae, folder


def assert_matches_torch(module, params, torch_vae, in_channels, latent_channels, size=32):
    torch.manual_seed(1)
    x = torch.rand(2, in_channels, size, size) * 2 - 1
    f = module.config.downsample_factor
    z = torch.randn(2, latent_channels, size // f, size // f)
    with torch.no_grad():
        dist = torch_vae.encode(x).latent_dist
        decoded = torch_vae.decode(z).sample
    mean, logvar = jitted(module, AutoencoderKL.encode)(params, nchw_to_nhwc(x))
    out = jitted(module, AutoencoderKL.decode)(params, nchw_to_nhwc(z))
    diffs = {
        "mean": max_abs(mean, nchw_to_nhwc(dist.mean)),
        "logvar": max_abs(logvar, nchw_to_nhwc(dist.logvar)),
        "decode": max_abs(out, nchw_to_nhwc(decoded)),
    }
    assert mean.shape == (2, size // f, size // f, latent_channels)
    assert out.shape == (2, size, size, torch_vae.config.out_channels)
    print("max abs diff vs diffusers:", diffs)
    assert all(d <= TOL for d in diffs.values()), diffs
    return diffs


def test_config_from_diffusers_defaults_and_validation():
    cfg = VAEConfig.from_diffusers(json.load(open(SD15_VAE_CONFIG)))
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.layers_per_block == 2
    assert cfg.scaling_factor == 0.18215 and cfg.shift_factor is None
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention
    assert cfg.downsample_factor == 8
    assert VAEConfig.from_diffusers({"shift_factor": 0.0609, "force_upcast": False}).shift_factor == 0.0609
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_diffusers({"act_fn": "gelu"})
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_diffusers({"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig.from_diffusers({"block_out_channels": [8, 12], "norm_num_groups": 8})
    assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg


def test_tiny_vae_matches_diffusers(tiny):
    torch_vae, folder = tiny
    module, params, config = load_vae(folder)
    assert config.block_out_channels == (8, 16)
    assert_matches_torch(module, params, torch_vae, in_channels=3, latent_channels=4)


def test_variant_config_matches_diffusers(tmp_path):
    torch_vae = make_torch_vae(seed=3, **VARIANT)
    torch_vae.save_pretrained(tmp_path)
    module, params, config = load_vae(tmp_path)
    assert config.shift_factor == 0.1 and not config.use_quant_conv and "quant_conv" not in params
    assert "attentions_0" not in params["encoder"]["mid_block"]
    assert_matches_torch(module, params, torch_vae, in_channels=2, latent_channels=3)


def test_latent_helpers_match_diffusers_pipeline_scaling(tmp_path):
    torch_vae = make_torch_vae(seed=4, **{**TINY, "shift_factor": 0.2, "scaling_factor": 0.7})
    torch_vae.save_pretrained(tmp_path)
    module, params, config = load_vae(tmp_path)
    torch.manual_seed(5)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    rng = jax.random.PRNGKey(7)
    with torch.no_grad():
        dist = torch_vae.encode(x).latent_dist
        eps = torch.from_numpy(np.array(jax.random.normal(rng, (1, 8, 8, 4)))).permute(0, 3, 1, 2)
        sampled = (dist.mean + dist.std * eps - 0.2) * 0.7
        mode = (dist.mode() - 0.2) * 0.7
        images = torch_vae.decode(mode / 0.7 + 0.2).sample.clamp(-1, 1)
    latents = jax.jit(lambda p, x, r: encode_to_latents(module, p, x, rng=r))(params, nchw_to_nhwc(x), rng)
    assert max_abs(latents, nchw_to_nhwc(sampled)) <= TOL
    latents_mode = jax.jit(lambda p, x: encode_to_latents(module, p, x, config=config))(params, nchw_to_nhwc(x))
    assert max_abs(latents_mode, nchw_to_nhwc(mode)) <= TOL
    decoded = jax.jit(lambda p, z: decode_latents(module, p, z))(params, latents_mode)
    assert decoded.dtype == jnp.float32 and float(jnp.abs(decoded).max()) <= 1.0
    assert max_abs(decoded, nchw_to_nhwc(images)) <= TOL


def test_legacy_attention_names_and_sharded_folder(tiny, tmp_path):
    torch_vae, folder = tiny
    _, params, _ = load_vae(folder)
    new = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in new.items():
        for new_name, old_name in old_names.items():
            key = key.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        legacy[key] = value[:, :, None, None] if key.endswith("query.weight") else value  # 1x1-conv layout
    assert any(".proj_attn." in k for k in legacy)
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    save_file(legacy, str(legacy_dir / "diffusion_pytorch_model.safetensors"))
    (legacy_dir / "config.json").write_text((folder / "config.json").read_text())
    _, legacy_params, _ = load_vae(legacy_dir)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, legacy_params, params))

    sharded_dir = tmp_path / "sharded"
    torch_vae.save_pretrained(sharded_dir, max_shard_size="20KB")
    assert (sharded_dir / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _, sharded_params, _ = load_vae(sharded_dir)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, sharded_params, params))


def test_wrong_checkpoint_is_reported(tiny, tmp_path):
    _, folder = tiny
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del tensors["decoder.conv_out.weight"]
    tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightFileError, match=r"(?s)missing keys.*decoder\.conv_out\.weight.*decoder\.extra"):
        load_vae(tmp_path)


def test_saved_vae_loads_in_diffusers_with_same_outputs(tmp_path):
    config = VAEConfig.from_diffusers({**TINY, "shift_factor": 0.3})
    # Random values in every tensor (init_vae_params would give identity norms and zero biases, and its
    # compile dominates this file's time; it is exercised by the full-size test).
    noise = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.3 * noise.standard_normal(s.shape, np.float32)), vae_param_shapes(config))
    save_vae(config, params, tmp_path)
    torch_vae = TorchAutoencoderKL.from_pretrained(tmp_path).eval()
    assert torch_vae.config.shift_factor == 0.3
    assert_matches_torch(AutoencoderKL(config), params, torch_vae, in_channels=3, latent_channels=4)
    _, reloaded, reloaded_config = load_vae(tmp_path)
    assert reloaded_config == config
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, reloaded, params))


def test_bfloat16_load_runs_close_to_float32(tiny):
    _, folder = tiny
    module32, params32, _ = load_vae(folder)
    module16, params16, _ = load_vae(folder, dtype="bfloat16")
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(params16))
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 16, 16, 3), minval=-1, maxval=1)
    out32 = jitted(module32, AutoencoderKL.__call__)(params32, x)
    out16 = jitted(module16, AutoencoderKL.__call__)(params16, x)
    assert out16.dtype == jnp.bfloat16
    # A sanity bound, not parity: bf16 params and activations through the whole encode+decode measured
    # ~5% of the output range at worst and ~0.5% on average.
    scale = float(jnp.abs(out32).max())
    mean_abs = float(jnp.abs(out16.astype(jnp.float32) - out32).mean())
    assert max_abs(out16, out32) <= 0.1 * scale and mean_abs <= 0.01 * scale, (max_abs(out16, out32), scale)


@pytest.mark.slow
def test_sd15_vae_full_size():
    diffusers_config = json.load(open(SD15_VAE_CONFIG))
    config = VAEConfig.from_diffusers(diffusers_config)
    with torch.device("meta"):
        torch_vae = TorchAutoencoderKL.from_config(diffusers_config)
    torch_count = sum(p.numel() for p in torch_vae.parameters())
    ours = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(vae_param_shapes(config)))
    assert ours == torch_count == 83_653_863

    params = init_vae_params(config, jax.random.PRNGKey(0))
    torch_vae = TorchAutoencoderKL.from_config(diffusers_config).eval()
    state = {k: torch.tensor(v) for k, v in vae_to_diffusers_state_dict(params).items()}
    missing, unexpected = torch_vae.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    module = AutoencoderKL(config)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    mean, logvar = jitted(module, AutoencoderKL.encode)(params, nchw_to_nhwc(x))
    decoded = jitted(module, AutoencoderKL.decode)(params, mean)
    assert decoded.shape == (1, 64, 64, 3) and bool(jnp.isfinite(decoded).all())
    with torch.no_grad():
        dist = torch_vae.encode(x).latent_dist
        torch_decoded = torch_vae.decode(dist.mean).sample
    scale = max(1.0, float(torch_decoded.abs().max()))
    print("sd15 size: mean diff", max_abs(mean, nchw_to_nhwc(dist.mean)), "decode diff",
          max_abs(decoded, nchw_to_nhwc(torch_decoded)), "decode scale", scale)
    assert max_abs(mean, nchw_to_nhwc(dist.mean)) <= 1e-4 * max(1.0, float(dist.mean.abs().max()))
    assert max_abs(logvar, nchw_to_nhwc(dist.logvar)) <= 1e-4 * max(1.0, float(dist.logvar.abs().max()))
    assert max_abs(decoded, nchw_to_nhwc(torch_decoded)) <= 1e-4 * scale
