"""Euler sampling of the probability-flow ODE in sigma space, matching diffusers' ``EulerDiscreteScheduler``.

Latents live in "variance exploding" form ``x = x0 + sigma * eps`` (``sigma = sqrt((1 - abar) / abar)``):
they start at ``init_noise_sigma`` times unit noise and are divided by ``sqrt(sigma**2 + 1)`` before the
UNet, which was trained on variance-preserving inputs. Deterministic (s_churn = 0) only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.diffusion.noise_schedule import NoiseSchedule, prediction_coefficients, sigma_table
from ipadapter_jax.diffusion.scheduler_config import (
    check_num_inference_steps,
    read_choice,
    read_int,
    reject_flags,
)

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMA_TYPES = ("zero", "sigma_min")


def euler_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int
) -> np.ndarray:
    """The float32 timesteps of ``EulerDiscreteScheduler.set_timesteps``, descending ``[S]``.

    "linspace" gives fractional timesteps (e.g. 978.6122); diffusers passes them to the UNet as they are.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        stride = num_train_timesteps // num_inference_steps
        return (np.arange(num_inference_steps) * stride)[::-1].astype(np.float32) + np.float32(steps_offset)
    if spacing == "trailing":
        stride = num_train_timesteps / num_inference_steps
        return np.arange(num_train_timesteps, 0, -stride).round().astype(np.float32) - np.float32(1)
    raise ValueError(f"timestep_spacing={spacing!r} is not one of {TIMESTEP_SPACINGS}")


@flax.struct.dataclass
class EulerSampler:
    """Deterministic Euler. Build with ``EulerSampler.from_config``.

    Attributes (``S`` = number of inference steps, indexed by the step index ``i``):
      timesteps: float32 ``[S]``, what diffusers passes to the UNet.
      sigmas: float32 ``[S + 1]``; the last is 0 (or the smallest training sigma for "sigma_min").
      input_divisor: float32 ``[S]``, ``sqrt(sigmas[i]**2 + 1)``: the UNet sees ``latents / input_divisor``.
      x0_from_sample, x0_from_output: float32 ``[S]``, prediction of x0 from the (unscaled) latents and
        the model output.
      sample_weight: float32 ``[S]``, ``sigmas[i + 1] / sigmas[i]``; the step is
        ``x_next = sample_weight * x + (1 - sample_weight) * x0``.
      init_noise_sigma: what unit noise is multiplied by to start (diffusers' ``init_noise_sigma``).
    """

    timesteps: jax.Array
    sigmas: jax.Array
    input_divisor: jax.Array
    x0_from_sample: jax.Array
    x0_from_output: jax.Array
    sample_weight: jax.Array
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], num_inference_steps: int) -> EulerSampler:
        """Equivalent of ``EulerDiscreteScheduler.from_config(config)`` + ``set_timesteps(num_inference_steps)``.

        Reads, with EulerDiscreteScheduler's defaults: the noise-schedule keys (see
        ``NoiseSchedule.from_config``), ``timestep_spacing`` ("linspace"), ``steps_offset`` (0),
        ``final_sigmas_type`` ("zero" or "sigma_min"), ``interpolation_type`` (only "linear"),
        ``timestep_type`` (only "discrete") and ``use_karras_sigmas`` / ``use_exponential_sigmas`` /
        ``use_beta_sigmas`` (only false). Other keys are ignored.
        """
        what = "Euler sampler config"
        schedule = NoiseSchedule.from_config(config)
        num_train_timesteps = schedule.num_train_timesteps
        check_num_inference_steps(num_inference_steps, num_train_timesteps)
        spacing = read_choice(config, "timestep_spacing", "linspace", TIMESTEP_SPACINGS, what)
        steps_offset = read_int(config, "steps_offset", 0, what)
        final_sigma_type = read_choice(config, "final_sigmas_type", "zero", FINAL_SIGMA_TYPES, what)
        read_choice(config, "interpolation_type", "linear", ("linear",), what)
        read_choice(config, "timestep_type", "discrete", ("discrete",), what)
        reject_flags(config, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"), what)

        timesteps = euler_timesteps(num_train_timesteps, num_inference_steps, spacing, steps_offset)
        if timesteps.min() < 0 or timesteps.max() > num_train_timesteps - 1:
            raise ValueError(f"{what}: timesteps {timesteps.tolist()} fall outside the training schedule")
        train_sigmas = sigma_table(schedule)
        step_sigmas = np.interp(timesteps, np.arange(num_train_timesteps), train_sigmas)
        final_sigma = 0.0 if final_sigma_type == "zero" else train_sigmas[0]
        sigmas = np.append(step_sigmas, final_sigma).astype(np.float32)

        max_sigma = sigmas.max()
        # diffusers: "linspace"/"trailing" start at the largest sigma itself, "leading" one step noisier.
        init_noise_sigma = max_sigma if spacing in ("linspace", "trailing") else np.sqrt(max_sigma**2 + 1)

        sigma = sigmas[:-1].astype(np.float64)
        alpha_vp = 1 / np.sqrt(sigma**2 + 1)
        coefficients = prediction_coefficients(schedule.prediction_type, alpha_vp, sigma * alpha_vp)
        # The coefficients act on the variance-preserving sample, which is alpha_vp * latents.
        return cls(
            timesteps=jnp.asarray(timesteps, dtype=jnp.float32),
            sigmas=jnp.asarray(sigmas),
            input_divisor=jnp.asarray(np.sqrt(sigmas[:-1] ** 2 + np.float32(1))),
            x0_from_sample=jnp.asarray(coefficients.x0_from_sample * alpha_vp, dtype=jnp.float32),
            x0_from_output=jnp.asarray(coefficients.x0_from_output, dtype=jnp.float32),
            sample_weight=jnp.asarray(sigmas[1:].astype(np.float64) / sigma, dtype=jnp.float32),
            init_noise_sigma=float(np.float32(init_noise_sigma)),
        )

    def init_state(self, latents: jax.Array) -> tuple[()]:
        del latents  # Euler keeps nothing between steps.
        return ()

    def scale_model_input(self, latents: jax.Array, i: jax.Array) -> jax.Array:
        return (latents.astype(jnp.float32) / self.input_divisor[i]).astype(latents.dtype)

    def step(self, state: tuple[()], model_output: jax.Array, i: jax.Array, latents: jax.Array):
        """One Euler step from ``sigmas[i]`` to ``sigmas[i + 1]``; returns ``(latents, state)``."""
        x = latents.astype(jnp.float32)
        x0 = self.x0_from_sample[i] * x + self.x0_from_output[i] * model_output.astype(jnp.float32)
        # x + (x - x0) / sigma * (sigma_next - sigma), regrouped so a large first sigma (4096 under zero
        # terminal SNR) does not cancel catastrophically in float32.
        x_next = self.sample_weight[i] * x + (1 - self.sample_weight[i]) * x0
        return x_next.astype(latents.dtype), state
