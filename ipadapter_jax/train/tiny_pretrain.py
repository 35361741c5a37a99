"""A short text-conditioned pretraining of the tiny world's UNet (part of ``tiny_world``, replaced with it).

Why: with a random UNet the noise prediction is unrelated to the noisy input, and an image prompt cannot
help predict a target that is only recoverable from the noisy latents (the adapter then only learns an
image-independent correction). After a few hundred steps of ordinary diffusion training on the synthetic
shapes the UNet denoises, and what the caption leaves out (background colour, position, size) is exactly
what an image prompt can add: the adapter has something to learn that a test can measure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ipadapter_jax.diffusion.noise_schedule import NoiseSchedule, add_noise, training_target
from ipadapter_jax.models.unet import UNet2DConditionModel


def pretrain_unet(unet: UNet2DConditionModel, params: dict, latents: np.ndarray, contexts: np.ndarray,
                  empty_context: np.ndarray, schedule: NoiseSchedule, *, steps: int, seed: int,
                  batch_size: int = 16, learning_rate: float = 1e-3, drop_text: float = 0.1) -> dict:
    """Full-parameter diffusion training of ``unet`` on precomputed ``latents [N, h, w, C]`` with text
    ``contexts [N, T, D]`` (replaced by ``empty_context [T, D]`` with probability ``drop_text``, so the
    model also works unconditionally). Returns float32 numpy params."""
    tx = optax.adam(learning_rate)
    latents, contexts, empty = jnp.asarray(latents), jnp.asarray(contexts), jnp.asarray(empty_context)

    def loss_fn(p, key):
        k_index, k_noise, k_time, k_drop = jax.random.split(key, 4)
        index = jax.random.randint(k_index, (batch_size,), 0, latents.shape[0])
        x0, context = latents[index], contexts[index]
        dropped = jax.random.uniform(k_drop, (batch_size, 1, 1)) < drop_text
        context = jnp.where(dropped, empty[None], context)
        noise = jax.random.normal(k_noise, x0.shape)
        t = jax.random.randint(k_time, (batch_size,), 0, schedule.num_train_timesteps)
        pred = unet.apply({"params": p}, add_noise(schedule, x0, noise, t), t, context)
        return jnp.mean(jnp.square(pred - training_target(schedule, x0, noise, t)))

    # The step index is folded into the key inside the program: an eager fold_in per step compiles a
    # program per Python int (0.1 s each, a third of the whole build on a small CPU).
    @jax.jit
    def step(p, opt_state, key, i):
        loss, grads = jax.value_and_grad(loss_fn)(p, jax.random.fold_in(key, i))
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    params = jax.tree.map(jnp.asarray, params)
    opt_state = tx.init(params)
    key = jax.random.key(seed)
    for i in range(steps):
        params, opt_state, _ = step(params, opt_state, key, np.int32(i))
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)
