"""Deterministic DDIM sampling (eta = 0), matching diffusers' ``DDIMScheduler`` step for step.

The sampler's state is empty: each step maps ``(x_t, model_output)`` to ``x_prev`` through per-step
scalars computed on the host, so ``step`` can take a traced step index inside ``lax.fori_loop``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.diffusion.noise_schedule import NoiseSchedule, prediction_coefficients
from ipadapter_jax.diffusion.scheduler_config import (
    check_num_inference_steps,
    read_choice,
    read_flag,
    read_int,
    read_number,
    reject_flags,
)

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int
) -> np.ndarray:
    """The integer timesteps of ``DDIMScheduler.set_timesteps``, descending, int64 ``[num_inference_steps]``.

    ``steps_offset`` only shifts "leading" spacing, as in diffusers.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        stride = num_train_timesteps // num_inference_steps
        return (np.arange(num_inference_steps) * stride)[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        stride = num_train_timesteps / num_inference_steps
        return np.round(np.arange(num_train_timesteps, 0, -stride)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not one of {TIMESTEP_SPACINGS}")


@flax.struct.dataclass
class DDIMSampler:
    """DDIM with eta = 0. Build with ``DDIMSampler.from_config``.

    Attributes (tables indexed by the step index ``i``; ``S`` = number of inference steps):
      timesteps: int32 ``[S]``, what the UNet receives (diffusers' ``scheduler.timesteps``).
      x0_from_sample, x0_from_output, eps_from_sample, eps_from_output: float32 ``[S]``, the model output
        turned into predictions of x0 and of the noise at ``timesteps[i]``.
      next_alpha, next_sigma: float32 ``[S]``, ``sqrt(abar)`` and ``sqrt(1 - abar)`` at the step's target.
      clip_sample_range: x0 is clipped to ``[-r, r]``; None when ``clip_sample`` is false.
      init_noise_sigma: 1.0 (DDIM samples start from unit-variance noise).
    """

    timesteps: jax.Array
    x0_from_sample: jax.Array
    x0_from_output: jax.Array
    eps_from_sample: jax.Array
    eps_from_output: jax.Array
    next_alpha: jax.Array
    next_sigma: jax.Array
    clip_sample_range: float | None = flax.struct.field(pytree_node=False, default=None)
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], num_inference_steps: int) -> DDIMSampler:
        """Equivalent of ``DDIMScheduler.from_config(config)`` + ``set_timesteps(num_inference_steps)``.

        Reads, with DDIMScheduler's defaults: the noise-schedule keys (see ``NoiseSchedule.from_config``),
        ``timestep_spacing`` ("leading"), ``steps_offset`` (0), ``set_alpha_to_one`` (true),
        ``clip_sample`` (true; SD configs set false), ``clip_sample_range`` (1.0) and ``thresholding``
        (only false). Other keys are ignored.
        """
        what = "DDIM sampler config"
        schedule = NoiseSchedule.from_config(config)
        check_num_inference_steps(num_inference_steps, schedule.num_train_timesteps)
        spacing = read_choice(config, "timestep_spacing", "leading", TIMESTEP_SPACINGS, what)
        steps_offset = read_int(config, "steps_offset", 0, what)
        set_alpha_to_one = read_flag(config, "set_alpha_to_one", True, what)
        clip_sample = read_flag(config, "clip_sample", True, what)
        clip_sample_range = read_number(config, "clip_sample_range", 1.0, what)
        reject_flags(config, ("thresholding",), what)

        timesteps = ddim_timesteps(schedule.num_train_timesteps, num_inference_steps, spacing, steps_offset)
        if timesteps.min() < 0 or timesteps.max() >= schedule.num_train_timesteps:
            raise ValueError(f"{what}: timesteps {timesteps.tolist()} fall outside the training schedule")
        alphas_cumprod = schedule.alphas_cumprod.astype(np.float64)
        # diffusers steps to t - T // S whatever the spacing (for "linspace"/"trailing" that is not always
        # the next timestep in the list); below 0 it uses the final alpha.
        final_alphas_cumprod = 1.0 if set_alpha_to_one else alphas_cumprod[0]
        targets = timesteps - schedule.num_train_timesteps // num_inference_steps
        target_alphas_cumprod = np.where(
            targets >= 0, alphas_cumprod[np.maximum(targets, 0)], final_alphas_cumprod
        )

        current = alphas_cumprod[timesteps]
        coefficients = prediction_coefficients(schedule.prediction_type, np.sqrt(current), np.sqrt(1 - current))
        if not all(np.isfinite(c).all() for c in coefficients):
            raise ValueError(
                f"{what}: prediction_type={schedule.prediction_type!r} cannot recover x0 and the noise at "
                f"every timestep (zero terminal SNR needs v_prediction)"
            )
        f32 = lambda values: jnp.asarray(values, dtype=jnp.float32)  # noqa: E731
        return cls(
            timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
            x0_from_sample=f32(coefficients.x0_from_sample),
            x0_from_output=f32(coefficients.x0_from_output),
            eps_from_sample=f32(coefficients.eps_from_sample),
            eps_from_output=f32(coefficients.eps_from_output),
            next_alpha=f32(np.sqrt(target_alphas_cumprod)),
            next_sigma=f32(np.sqrt(1 - target_alphas_cumprod)),
            clip_sample_range=clip_sample_range if clip_sample else None,
        )

    def init_state(self, latents: jax.Array) -> tuple[()]:
        del latents  # DDIM keeps nothing between steps.
        return ()

    def scale_model_input(self, latents: jax.Array, i: jax.Array) -> jax.Array:
        del i  # DDIM feeds the sample to the UNet unscaled.
        return latents

    def step(self, state: tuple[()], model_output: jax.Array, i: jax.Array, latents: jax.Array):
        """One DDIM update from ``timesteps[i]``; returns ``(latents, state)``, latents in their input dtype."""
        x = latents.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        x0 = self.x0_from_sample[i] * x + self.x0_from_output[i] * out
        eps = self.eps_from_sample[i] * x + self.eps_from_output[i] * out
        if self.clip_sample_range is not None:
            # The noise estimate stays the unclipped one (diffusers' use_clipped_model_output=False).
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        x_prev = self.next_alpha[i] * x0 + self.next_sigma[i] * eps
        return x_prev.astype(latents.dtype), state
