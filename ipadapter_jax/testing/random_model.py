"""Random-weights diffusers folders of the tiny models (``tiny_models``), for tests and benchmarks.

``write_random_model(folder, arch, seed, size, pretrain_steps)`` writes an SD1.5- or SDXL-layout folder with an
``image_encoder/`` through the one folder writer (``weights.pipeline_folder``), read by the same loaders as a
real model. Weights are drawn with numpy (no initialiser has to be compiled). Two adjustments make the random
world behave like a trained one where training needs it: the VAE's posterior is made narrow and its
``scaling_factor`` gives the latents of toy-world images unit variance, as the diffusion process assumes; and
``pretrain_steps`` of ordinary text-conditioned diffusion training on toy-world images (the toy world's own UNet
trainer, ``toy.tiny_unet.train_tiny_unet``, on this UNet at 64 px) make the UNet denoise, so that what a caption leaves out (background, position, size) is what an image prompt can
add: an adapter trained on this world has something to learn that a test can measure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig, encode_to_latents
from ipadapter_jax.testing.tiny_models import IMAGE_ENCODER, SCHEDULER, SIZES, TEXT_LENGTH, text_encoder_configs
from ipadapter_jax.toy.shapes_dataset import make_examples, render
from ipadapter_jax.toy.tiny_unet import TinyUnetSettings, train_tiny_unet
from ipadapter_jax.toy.tiny_vae import TinyVae
from ipadapter_jax.toy.toy_tokenizer import write_toy_tokenizer
from ipadapter_jax.weights.load_clip import build_clip_text_encoder, init_clip_text_encoder, init_clip_vision_encoder
from ipadapter_jax.weights.load_unet import unet_param_shapes
from ipadapter_jax.weights.load_vae import vae_param_shapes
from ipadapter_jax.weights.pipeline_folder import write_pipeline_folder

MARKER = "random_model.json"  # written last: a folder without it (or with other arguments) is rewritten
IMAGE_SIZE = 64  # the world's native image side: 8x8 latents, the tiny UNet's sample_size
PRETRAIN_IMAGES = 512
PROBE_STREAM = 900  # the toy make_examples stream of the VAE's scaling probe (disjoint from the toy build's)


def random_params(shapes: dict, rng: np.random.Generator) -> dict:
    """float32 numpy params for a tree of ``ShapeDtypeStruct``: kernels ``N(0, 1/fan_in)``, norm scales 1,
    biases 0, embeddings ``N(0, 0.02)``."""
    def draw(path, leaf):
        name, shape = path[-1].key, tuple(leaf.shape)
        if name == "scale":
            return np.ones(shape, np.float32)
        if name == "bias":
            return np.zeros(shape, np.float32)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def _random_vae(vae_raw: dict, rng: np.random.Generator, seed: int) -> tuple[VAEConfig, dict]:
    config = VAEConfig.from_diffusers(vae_raw)
    params = random_params(vae_param_shapes(config), rng)
    # A trained VAE's posterior is narrow; a random one's is wider than its mean's spread, which would bury
    # the images in sampling noise. Pin the log-variance at the clamp's floor (posterior std ~ 3e-7).
    latent = config.latent_channels
    params["quant_conv"]["kernel"][..., latent:] = 0.0
    params["quant_conv"]["bias"][latent:] = -30.0
    probe = np.stack([render(spec, IMAGE_SIZE) for spec in make_examples(16, seed, PROBE_STREAM).specs]) / 127.5 - 1
    unscaled = VAEConfig(**{**config.__dict__, "scaling_factor": 1.0})
    module = AutoencoderKL(config)
    latents = jax.jit(lambda p, x: encode_to_latents(module, p, x, None, unscaled))(params, jnp.asarray(probe))
    return VAEConfig(**{**config.__dict__, "scaling_factor": float(1.0 / np.std(np.asarray(latents)))}), params


def write_random_model(folder: str | os.PathLike, arch: str = "sd15", seed: int = 0, size: str = "tiny",
                       pretrain_steps: int = 0) -> Path:
    """A random diffusers-layout base model (``arch`` "sd15" or "sdxl", ``size`` a key of
    ``tiny_models.SIZES``) with ``image_encoder/`` in ``folder``; returns the folder. ``pretrain_steps``: see
    the module docstring (SD1.5 only). Deterministic in the arguments; reuses a complete folder written
    earlier with the same ones."""
    folder = Path(folder)
    marker = {"arch": arch, "seed": seed, "size": size, "pretrain_steps": pretrain_steps, "version": 2}
    if (folder / MARKER).is_file() and json.loads((folder / MARKER).read_text()) == marker:
        return folder
    if size not in SIZES or arch not in SIZES[size][0]:
        raise ValueError(f"random model {size!r} {arch!r}: choose from "
                         f"{[(s, a) for s, (unets, _) in SIZES.items() for a in unets]}")
    unet_raw, vae_raw = SIZES[size][0][arch], SIZES[size][1]
    (folder / MARKER).unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    tokenizer_dir = write_toy_tokenizer(folder / "tokenizer")
    text_encoders = [(c, random_params(init_clip_text_encoder(c, shapes_only=True)[1], rng))
                     for c in text_encoder_configs(unet_raw)]
    image_params = random_params(init_clip_vision_encoder(IMAGE_ENCODER, shapes_only=True)[1], rng)
    vae_config, vae_params = _random_vae(vae_raw, rng, seed)
    unet_config = UNetConfig.from_diffusers(unet_raw)
    unet_params = random_params(unet_param_shapes(unet_config), rng)
    if pretrain_steps:
        if unet_config.is_sdxl:
            raise ValueError("pretrain_steps: only the SD1.5-layout random model is pretrained")
        settings = TinyUnetSettings(num_images=PRETRAIN_IMAGES, steps=pretrain_steps, batch_size=16,
                                    warmup_steps=20, seed=seed)
        unet_params = train_tiny_unet(TinyVae(vae_config, vae_params, 0.0, 0.0),
                                      build_clip_text_encoder(text_encoders[0][0])[0], text_encoders[0][1],
                                      CaptionTokenizer(tokenizer_dir, TEXT_LENGTH), settings, log=lambda line: None,
                                      raw_config=unet_raw, params=unet_params, image_size=IMAGE_SIZE).params
    write_pipeline_folder(folder, unet=(unet_raw, unet_params), vae=(vae_config, vae_params),
                          text_encoders=text_encoders, tokenizer_dir=tokenizer_dir, scheduler_config=SCHEDULER,
                          image_encoder=(IMAGE_ENCODER, image_params))
    (folder / MARKER).write_text(json.dumps(marker))
    return folder
