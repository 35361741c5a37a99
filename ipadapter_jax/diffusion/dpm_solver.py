"""DPM-Solver++(2M) (arXiv 2211.01095), matching diffusers' ``DPMSolverMultistepScheduler`` with
``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``.

With ``lambda = log(alpha / sigma)`` and ``h = lambda_next - lambda_i``, each step is

    x_next = (sigma_next / sigma_i) x - alpha_next (e^-h - 1) (D0 + D1 / 2),
    D0 = x0_i,  D1 = (h / h_prev) (x0_i - x0_{i-1})

where ``x0_i`` is the model's data prediction. First-order steps (the first one, and the last under
``lower_order_final``/``euler_at_final``/``final_sigmas_type="zero"``) drop D1. Which steps are first
order is fixed on the host, so the jitted step has no branches: first-order steps get a zero D1 weight.
The only state is the previous data prediction.
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
    read_flag,
    read_int,
    read_number,
    reject_flags,
)

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMA_TYPES = ("zero", "sigma_min")
# Below this many steps diffusers' lower_order_final makes the last step first order.
LOWER_ORDER_FINAL_BELOW_STEPS = 15


def dpm_solver_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int, last_timestep: int
) -> np.ndarray:
    """The integer timesteps of ``DPMSolverMultistepScheduler.set_timesteps``, descending int64 ``[S]``.

    ``last_timestep`` is ``num_train_timesteps`` unless ``lambda_min_clipped`` cuts the noisy end.
    """
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, num_inference_steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        stride = last_timestep // (num_inference_steps + 1)
        return (np.arange(num_inference_steps + 1) * stride)[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        stride = num_train_timesteps / num_inference_steps
        return np.arange(last_timestep, 0, -stride).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not one of {TIMESTEP_SPACINGS}")


def _last_timestep(train_sigmas: np.ndarray, lambda_min_clipped: float) -> int:
    """How many training timesteps (from t=0) have ``lambda = log(alpha / sigma_vp) = -log(sigma)`` at
    least ``lambda_min_clipped``; the noisier ones are never sampled."""
    lambdas_ascending = -np.log(train_sigmas.astype(np.float64))[::-1]
    clipped = int(np.searchsorted(lambdas_ascending, lambda_min_clipped, side="left"))
    return len(train_sigmas) - clipped


@flax.struct.dataclass
class DPMSolverPP2MSampler:
    """DPM-Solver++(2M). Build with ``DPMSolverPP2MSampler.from_config``.

    Attributes (``S`` = number of inference steps, indexed by the step index ``i``):
      timesteps: int32 ``[S]``, what the UNet receives.
      sigmas: float32 ``[S + 1]``, ``sqrt((1 - abar) / abar)`` at each step's timestep and at the end.
      x0_from_sample, x0_from_output: float32 ``[S]``, the data prediction from latents and model output.
      sample_weight, x0_weight, x0_change_weight: float32 ``[S]``, so that
        ``x_next = sample_weight * x + x0_weight * x0_i + x0_change_weight * (x0_i - x0_{i-1})``.
      init_noise_sigma: 1.0 (variance-preserving latents, no input scaling).
    """

    timesteps: jax.Array
    sigmas: jax.Array
    x0_from_sample: jax.Array
    x0_from_output: jax.Array
    sample_weight: jax.Array
    x0_weight: jax.Array
    x0_change_weight: jax.Array
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], num_inference_steps: int) -> DPMSolverPP2MSampler:
        """Equivalent of ``DPMSolverMultistepScheduler.from_config(config)`` + ``set_timesteps``.

        Reads, with DPMSolverMultistepScheduler's defaults: the noise-schedule keys (see
        ``NoiseSchedule.from_config``), ``timestep_spacing`` ("linspace"), ``steps_offset`` (0),
        ``lower_order_final`` (true), ``euler_at_final`` (false), ``final_sigmas_type`` ("zero" or
        "sigma_min"), ``lambda_min_clipped`` (-inf); and accepts only ``algorithm_type="dpmsolver++"``,
        ``solver_order=2``, ``solver_type="midpoint"``, ``variance_type=None`` and false for
        ``thresholding``, ``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_beta_sigmas``,
        ``use_lu_lambdas``, ``use_flow_sigmas``, ``use_dynamic_shifting``. Other keys are ignored.
        """
        what = "DPM-Solver++(2M) sampler config"
        schedule = NoiseSchedule.from_config(config)
        num_train_timesteps = schedule.num_train_timesteps
        check_num_inference_steps(num_inference_steps, num_train_timesteps)
        read_choice(config, "algorithm_type", "dpmsolver++", ("dpmsolver++",), what)
        read_choice(config, "solver_order", 2, (2,), what)
        read_choice(config, "solver_type", "midpoint", ("midpoint",), what)
        read_choice(config, "variance_type", None, (None,), what)
        reject_flags(
            config,
            ("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
             "use_flow_sigmas", "use_dynamic_shifting"),
            what,
        )
        spacing = read_choice(config, "timestep_spacing", "linspace", TIMESTEP_SPACINGS, what)
        steps_offset = read_int(config, "steps_offset", 0, what)
        lower_order_final = read_flag(config, "lower_order_final", True, what)
        euler_at_final = read_flag(config, "euler_at_final", False, what)
        final_sigma_type = read_choice(config, "final_sigmas_type", "zero", FINAL_SIGMA_TYPES, what)
        lambda_min_clipped = read_number(config, "lambda_min_clipped", -float("inf"), what)

        train_sigmas = sigma_table(schedule)
        last_timestep = _last_timestep(train_sigmas, lambda_min_clipped)
        timesteps = dpm_solver_timesteps(
            num_train_timesteps, num_inference_steps, spacing, steps_offset, last_timestep
        )
        if timesteps.min() < 0 or timesteps.max() >= num_train_timesteps:
            raise ValueError(f"{what}: timesteps {timesteps.tolist()} fall outside the training schedule")
        # As in diffusers, a lambda_min_clipped cut can leave "trailing" spacing with fewer steps than asked.
        num_steps = len(timesteps)
        final_sigma = 0.0 if final_sigma_type == "zero" else train_sigmas[0]
        sigmas = np.append(train_sigmas[timesteps], final_sigma).astype(np.float32)

        s = sigmas.astype(np.float64)
        alpha = 1 / np.sqrt(s**2 + 1)
        sigma_vp = s * alpha
        coefficients = prediction_coefficients(schedule.prediction_type, alpha[:-1], sigma_vp[:-1])
        # e^-h = (sigma_next/alpha_next) / (sigma_i/alpha_i) = s_next / s_i: finite even for a final 0.
        exp_neg_h = s[1:] / s[:-1]
        x0_weight = alpha[1:] * (1 - exp_neg_h)
        second_order = _second_order_steps(num_steps, lower_order_final, euler_at_final, final_sigma_type)
        x0_change_weight = np.zeros(num_steps)
        with np.errstate(divide="ignore"):
            log_s = np.log(s)
        for i in np.flatnonzero(second_order):
            h, h_prev = log_s[i] - log_s[i + 1], log_s[i - 1] - log_s[i]
            x0_change_weight[i] = 0.5 * x0_weight[i] * h / h_prev

        f32 = lambda values: jnp.asarray(values, dtype=jnp.float32)  # noqa: E731
        return cls(
            timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
            sigmas=jnp.asarray(sigmas),
            x0_from_sample=f32(coefficients.x0_from_sample),
            x0_from_output=f32(coefficients.x0_from_output),
            sample_weight=f32(sigma_vp[1:] / sigma_vp[:-1]),
            x0_weight=f32(x0_weight),
            x0_change_weight=f32(x0_change_weight),
        )

    def init_state(self, latents: jax.Array) -> jax.Array:
        """The previous step's data prediction (unused by the first, first-order step)."""
        return jnp.zeros(latents.shape, jnp.float32)

    def scale_model_input(self, latents: jax.Array, i: jax.Array) -> jax.Array:
        del i  # The UNet sees the variance-preserving latents as they are.
        return latents

    def step(self, state: jax.Array, model_output: jax.Array, i: jax.Array, latents: jax.Array):
        """One multistep update from ``sigmas[i]`` to ``sigmas[i + 1]``; returns ``(latents, x0_i)``."""
        x = latents.astype(jnp.float32)
        x0 = self.x0_from_sample[i] * x + self.x0_from_output[i] * model_output.astype(jnp.float32)
        x_next = self.sample_weight[i] * x + self.x0_weight[i] * x0 + self.x0_change_weight[i] * (x0 - state)
        return x_next.astype(latents.dtype), x0


def _second_order_steps(
    num_steps: int, lower_order_final: bool, euler_at_final: bool, final_sigma_type: str
) -> np.ndarray:
    """bool ``[S]``: which steps use the previous data prediction (diffusers' order rules for order 2)."""
    second_order = np.ones(num_steps, dtype=bool)
    second_order[0] = False  # No previous prediction yet.
    final_is_first_order = (
        euler_at_final
        or (lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW_STEPS)
        or final_sigma_type == "zero"
    )
    if final_is_first_order:
        second_order[-1] = False
    return second_order
