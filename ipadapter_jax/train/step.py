"""The pure train step and its loss: ``train_step(state, frozen, batch, rng) -> (state, metrics)``.

Per step: the frozen models encode the batch (VAE posterior sample, text, CLIP image features; never
differentiated), noise and timesteps are drawn from ``fold_in(rng, state.step)``, and only the adapter
(projection net + to_k_ip/to_v_ip) is differentiated through the frozen UNet. The loss is the SD objective:
MSE against epsilon, v or x0 as the scheduler's ``prediction_type`` says, optionally min-SNR weighted, with
optional noise offset. Gradient accumulation runs ``grad_accum_steps`` micro-batches under ``lax.scan``
before one optimizer update.

Batch layout (global arrays, leading axis sharded over the mesh; see ``data.examples``):
  pixels [B, R, R, 3] f32 in [-1, 1]; clip_pixels [B, S, S, 3] f32; input_ids [B, T] i32;
  input_ids_2 [B, T] i32 (SDXL); original_size, crop_top_left [B, 2] i32 (SDXL); drop_image [B] bool.
With ``StepSettings.cached_latents`` the batch carries the encoders' outputs instead and ``frozen`` is
``cache.batch.cached_frozen``'s tree (see ``cache.batch``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from ipadapter_jax.cache.batch import abstract_cached_batch, cached_batch_keys, cached_image_features
from ipadapter_jax.conditioning import added_conditioning, encode_image_prompt, encode_text, sdxl_time_ids
from ipadapter_jax.conditioning.text import TextConditioning
from ipadapter_jax.diffusion.noise_schedule import add_noise, snr, training_target
from ipadapter_jax.models.adapter import adapter_variables
from ipadapter_jax.models.image_projection import ProjectionConfig, projection_module
from ipadapter_jax.models.vae import latents_from_moments
from ipadapter_jax.train.frozen import FrozenModules, encode_latents
from ipadapter_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static choices of the step (part of the compiled program)."""

    projection: ProjectionConfig
    resolution: int
    grad_accum_steps: int = 1
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    sample_posterior: bool = True
    cached_latents: bool = False  # the batch holds cached encodings (``cache.batch``), not pixels and ids


def batch_keys(modules: FrozenModules, cached_latents: bool = False) -> tuple[str, ...]:
    """The batch entries the step reads."""
    if cached_latents:
        return cached_batch_keys(modules)
    keys = ("pixels", "clip_pixels", "input_ids", "drop_image")
    if modules.is_sdxl:
        keys += ("input_ids_2", "original_size", "crop_top_left")
    return keys


def abstract_batch(modules: FrozenModules, batch_size: int, resolution: int,
                   settings: StepSettings | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes and dtypes of one batch (for ahead-of-time compilation); ``settings`` says whether it is
    a cached batch, and for which adapter variant."""
    if settings is not None and settings.cached_latents:
        return abstract_cached_batch(modules, batch_size, resolution, settings.projection.uses_hidden_states)
    s, t = modules.clip_image_size, modules.text_length
    shapes = {"pixels": ((batch_size, resolution, resolution, 3), jnp.float32),
              "clip_pixels": ((batch_size, s, s, 3), jnp.float32),
              "input_ids": ((batch_size, t), jnp.int32), "drop_image": ((batch_size,), jnp.bool_),
              "input_ids_2": ((batch_size, t), jnp.int32), "original_size": ((batch_size, 2), jnp.int32),
              "crop_top_left": ((batch_size, 2), jnp.int32)}
    return {k: jax.ShapeDtypeStruct(*shapes[k]) for k in batch_keys(modules)}


def draw_noise(rng: jax.Array, latent_shape: tuple[int, ...], num_train_timesteps: int,
               noise_offset: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(posterior_key, noise, t)`` for one batch: the key for the VAE posterior sample, the noise (plus
    ``noise_offset`` times one N(0, 1) per example and channel) and integer timesteps ``[B]``."""
    k_latent, k_noise, k_offset, k_time = jax.random.split(rng, 4)
    noise = jax.random.normal(k_noise, latent_shape, jnp.float32)
    if noise_offset:
        noise = noise + noise_offset * jax.random.normal(
            k_offset, (latent_shape[0], 1, 1, latent_shape[-1]), jnp.float32)
    t = jax.random.randint(k_time, (latent_shape[0],), 0, num_train_timesteps)
    return k_latent, noise, t


def latent_shape(modules: FrozenModules, batch_size: int, resolution: int) -> tuple[int, int, int, int]:
    side = resolution // modules.latent_downsample
    return (batch_size, side, side, modules.vae_config.latent_channels)


def encode_batch(modules: FrozenModules, frozen: dict, batch: dict, rng: jax.Array,
                 settings: StepSettings) -> dict:
    """Everything the adapter's loss needs that does not depend on the adapter: noisy latents, target,
    timesteps, text conditioning and image features."""
    schedule = modules.schedule
    shape = latent_shape(modules, batch["drop_image"].shape[0], settings.resolution)
    k_latent, noise, t = draw_noise(rng, shape, schedule.num_train_timesteps, settings.noise_offset)
    k_latent = k_latent if settings.sample_posterior else None
    if settings.cached_latents:
        latents = latents_from_moments(batch["latent_mean"], batch["latent_logvar"], k_latent, modules.vae_config)
        text = TextConditioning(batch["text_context"], batch.get("text_pooled"))
        features = cached_image_features(batch["image_features"], batch["drop_image"], frozen)
    else:
        latents = encode_latents(modules, frozen, batch["pixels"], k_latent)
        text = encode_text(modules.text_encoders, frozen, [batch["input_ids"], batch.get("input_ids_2")])
        features = encode_image_prompt(modules.image_encoder, frozen["image_encoder"], batch["clip_pixels"],
                                       batch["drop_image"], settings.projection.uses_hidden_states)
    time_ids = (sdxl_time_ids(batch["original_size"], batch["crop_top_left"], settings.resolution)
                if modules.is_sdxl else None)
    return {
        "noisy": add_noise(schedule, latents, noise, t),
        "target": training_target(schedule, latents, noise, t),
        "t": t,
        "context": text.context,
        "added": added_conditioning(text, time_ids),
        "features": features,
    }


def per_example_loss(params: dict, modules: FrozenModules, frozen: dict, encoded: dict,
                     settings: StepSettings) -> jax.Array:
    """``[B]`` float32 (weighted) MSE of the UNet + adapter prediction against the target."""
    tokens = projection_module(settings.projection).apply({"params": params["image_proj"]}, encoded["features"])
    variables = {"params": frozen["unet"], **adapter_variables(modules.unet_config, [params["layers"]])}
    pred = modules.unet.apply(variables, encoded["noisy"], encoded["t"], encoded["context"], encoded["added"],
                              image_tokens=[tokens])
    mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - encoded["target"]), axis=(1, 2, 3))
    if settings.min_snr_gamma:
        ratio = snr(modules.schedule, encoded["t"])
        clipped = jnp.minimum(ratio, settings.min_snr_gamma)
        # arXiv 2303.09556: the x0-space weight min(snr, gamma) expressed for the model's target.
        prediction_type = modules.schedule.prediction_type
        weight = {"epsilon": clipped / ratio, "v_prediction": clipped / (ratio + 1)}.get(prediction_type, clipped)
        mse = mse * weight
    return mse


def skip_nonfinite_update(loss: jax.Array, grad_norm: jax.Array, updated: Any, previous: Any
                          ) -> tuple[Any, Any, jax.Array]:
    """``(params, opt_state, finite)``: the ``updated`` pair when the loss and the gradient norm are finite,
    else the ``previous`` one, so a NaN/Inf (bad data, an overflow) reaches neither the weights nor Adam's
    moments. ``finite`` is the scalar bool that decided."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, previous)
    return params, opt_state, finite


def make_train_step(modules: FrozenModules, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    settings: StepSettings, micro_batch_sharding: Callable[[int], NamedSharding] | None = None):
    """The pure step. ``micro_batch_sharding(ndim)`` (optional) pins each micro-batch's layout when
    accumulating, so every device keeps an equal share of every micro-batch."""

    def loss_and_grads(params, frozen, batch, rng):
        encoded = encode_batch(modules, frozen, batch, rng, settings)

        def loss_fn(p):
            return jnp.mean(per_example_loss(p, modules, frozen, encoded, settings))

        return jax.value_and_grad(loss_fn)(params)

    def train_step(state: TrainState, frozen: dict, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(rng, state.step)
        batch = {k: batch[k] for k in batch_keys(modules, settings.cached_latents)}
        n = settings.grad_accum_steps
        if n == 1:
            loss, grads = loss_and_grads(state.params, frozen, batch, rng)
        else:
            # Micro-batch i takes rows i, i+n, i+2n, ...: with the batch split into contiguous blocks
            # over the devices, a strided split keeps every micro-batch spread over all of them.
            def split(x):
                x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
                return x

            micro = jax.tree.map(split, batch)

            def accumulate(carry, inputs):
                index, mb = inputs
                if micro_batch_sharding is not None:
                    mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, micro_batch_sharding(x.ndim)), mb)
                loss, grads = loss_and_grads(state.params, frozen, mb, jax.random.fold_in(rng, index))
                total_loss, total_grads = carry
                return (total_loss + loss, jax.tree.map(jnp.add, total_grads, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                            (jnp.arange(n), micro))
            loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        params, opt_state, finite = skip_nonfinite_update(loss, grad_norm, (params, opt_state),
                                                          (state.params, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr_schedule(state.step),
                   "nonfinite": jnp.logical_not(finite).astype(jnp.int32)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_loss(modules: FrozenModules, settings: StepSettings):
    """``eval_loss(params, frozen, batch, rng) -> [B]`` per-example loss (no update), for held-out checks;
    ``batch["drop_image"]`` decides which examples see their image."""

    def eval_loss(params: dict, frozen: dict, batch: dict, rng: jax.Array) -> jax.Array:
        batch = {k: batch[k] for k in batch_keys(modules, settings.cached_latents)}
        encoded = encode_batch(modules, frozen, batch, rng, settings)
        return per_example_loss(params, modules, frozen, encoded, settings)

    return eval_loss
