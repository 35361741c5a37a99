"""A tiny ``AutoencoderKL`` for the toy world: 32x32 images <-> 8x8x4 latents (two downsamplings).

Trained as SD's VAE is in spirit, on a budget: reconstruction (L1 + MSE in [-1, 1], and L1 of the image
gradients for sharp edges) of a posterior sample
plus a small KL term that keeps the latents smooth; no perceptual or adversarial loss (flat-coloured shapes
need none). ``scaling_factor`` is then set, as SD's 0.18215 was, so the scaled latents of the data have unit
standard deviation, which the diffusion noise schedule assumes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig, decode_latents, encode_to_latents
from ipadapter_jax.toy.shapes_dataset import IMAGE_SIZE, make_examples
from ipadapter_jax.weights.load_vae import init_vae_params

VAE_STREAM, VAE_EVAL_STREAM = 20, 21  # make_examples streams of the training and held-out images


@dataclasses.dataclass(frozen=True)
class TinyVaeSettings:
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    num_images: int = 4096
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 30
    kl_weight: float = 1e-5
    edge_weight: float = 1.0
    seed: int = 0

    def config(self, scaling_factor: float = 1.0) -> VAEConfig:
        return VAEConfig(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                         latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
                         sample_size=IMAGE_SIZE, scaling_factor=scaling_factor)


@dataclasses.dataclass
class TinyVae:
    """``config`` carries the measured ``scaling_factor``; ``reconstruction_mae``: mean absolute error in
    [0, 255] pixel units of held-out reconstructions (posterior mean, clipped)."""

    config: VAEConfig
    params: dict
    reconstruction_mae: float
    seconds: float


def to_signed(images_uint8) -> jax.Array:
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def train_tiny_vae(settings: TinyVaeSettings = TinyVaeSettings(), log: Callable[[str], None] = print) -> TinyVae:
    started = time.time()
    s = settings
    config = s.config()
    module = AutoencoderKL(config)
    key = jax.random.key(s.seed)
    k_init, k_train = jax.random.split(key)
    params = init_vae_params(config, k_init)
    images = jnp.asarray(make_examples(s.num_images, s.seed, VAE_STREAM).images)

    def loss_fn(params, x, key):
        mean, logvar = module.apply({"params": params}, x, method=AutoencoderKL.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = module.apply({"params": params}, z, method=AutoencoderKL.decode)
        error = recon - x
        # L1 on the image gradients as well: plain L1/L2 leave the shapes' edges (what tells a circle from a
        # square at 32x32) blurred for many more steps.
        edges = (jnp.mean(jnp.abs(jnp.diff(error, axis=1))) + jnp.mean(jnp.abs(jnp.diff(error, axis=2))))
        reconstruction = jnp.mean(jnp.abs(error)) + jnp.mean(jnp.square(error)) + s.edge_weight * edges
        kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        return reconstruction + s.kl_weight * kl, (reconstruction, kl)

    schedule = optax.warmup_cosine_decay_schedule(0.0, s.learning_rate, s.warmup_steps, s.steps, 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, i):
        k_batch, k_noise = jax.random.split(jax.random.fold_in(k_train, i))
        index = jax.random.choice(k_batch, images.shape[0], (s.batch_size,), replace=False)
        x = images[index].astype(jnp.float32) / 127.5 - 1.0
        (loss, (reconstruction, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, k_noise)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, reconstruction, kl

    for i in range(s.steps):
        params, opt_state, reconstruction, kl = step(params, opt_state, i)
        if (i + 1) % max(1, s.steps // 5) == 0 or i == 0:
            log(f"  VAE step {i + 1}/{s.steps}: reconstruction {float(reconstruction):.4f}, KL {float(kl):.1f}")

    probe = to_signed(make_examples(256, s.seed, VAE_EVAL_STREAM).images)
    latents = encode_to_latents(module, params, probe, None, config)
    scaling = float(1.0 / np.std(np.asarray(latents)))
    config = s.config(scaling_factor=scaling)
    recon = decode_latents(module, params, latents * scaling, config)
    mae = float(np.mean(np.abs(np.asarray(recon) - np.asarray(probe)))) * 127.5
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return TinyVae(config, params, mae, time.time() - started)
