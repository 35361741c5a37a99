"""The discrete forward-diffusion process of Stable Diffusion, configured from a diffusers scheduler config.

``x_t = alpha_t * x_0 + sigma_t * eps`` with ``alpha_t = sqrt(alphas_cumprod[t])`` and
``sigma_t = sqrt(1 - alphas_cumprod[t])`` (variance preserving). Training uses ``add_noise`` and
``training_target``; the samplers read ``alphas_cumprod`` on the host to build their step tables.

All array functions are elementwise with a per-example timestep, so they work for any layout (we use NHWC
latents ``[B, H, W, C]``); ``t`` is an integer array of shape ``[B]`` (or a scalar) and may be traced.

``alphas_cumprod`` reproduces diffusers' float32 values bit for bit (torch's float32 ``linspace`` rounding
and its double-accumulated ``cumprod``), so training targets equal ``DDPMScheduler``'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.diffusion.scheduler_config import read_choice, read_flag, read_int, read_number

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Host-side (numpy) description of the forward process.

    Attributes:
      num_train_timesteps: T; valid timesteps are ``0 .. T-1``.
      prediction_type: what the UNet predicts: "epsilon", "v_prediction" or "sample" (x_0).
      betas: ``[T]`` float32.
      alphas_cumprod: ``[T]`` float32, ``prod_{s<=t} (1 - betas[s])``.
    """

    num_train_timesteps: int
    prediction_type: str
    betas: np.ndarray
    alphas_cumprod: np.ndarray

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Builds the schedule from a diffusers scheduler config dict (any scheduler class).

        Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``,
        ``prediction_type`` and ``rescale_betas_zero_snr`` with diffusers' defaults; other keys are ignored.
        """
        what = "scheduler config"
        num_train_timesteps = read_int(config, "num_train_timesteps", 1000, what)
        if num_train_timesteps < 1:
            raise ValueError(f"{what}: num_train_timesteps={num_train_timesteps} must be positive")
        prediction_type = read_choice(config, "prediction_type", "epsilon", PREDICTION_TYPES, what)
        trained_betas = config.get("trained_betas")
        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float32)
            if betas.shape != (num_train_timesteps,):
                raise ValueError(
                    f"{what}: trained_betas has shape {betas.shape}, expected ({num_train_timesteps},)"
                )
        else:
            beta_schedule = read_choice(config, "beta_schedule", "linear", BETA_SCHEDULES, what)
            beta_start = read_number(config, "beta_start", 0.0001, what)
            beta_end = read_number(config, "beta_end", 0.02, what)
            betas = _betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
        if read_flag(config, "rescale_betas_zero_snr", False, what):
            betas = _rescale_to_zero_terminal_snr(betas)
        alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)
        return cls(num_train_timesteps, prediction_type, betas, alphas_cumprod)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    # torch's float32 linspace: a float32 step, positions stepped (in double) from both ends towards the
    # middle, rounded to float32. Copying that rounding keeps alphas_cumprod bitwise equal to diffusers'.
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    index = np.arange(steps, dtype=np.float64)
    from_start = np.float64(start32) + index * step
    from_end = np.float64(end32) - (steps - 1 - index) * step
    return np.where(index < steps // 2, from_start, from_end).astype(np.float32)


def _cumprod_f32(values: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in double.
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def _betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    if beta_schedule == "linear":
        return _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        # The latent-diffusion schedule: linear in sqrt(beta).
        return _torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    # squaredcos_cap_v2: the improved-DDPM cosine schedule, betas capped at 0.999.
    def alpha_bar(fraction: float) -> float:
        return math.cos((fraction + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
        for i in range(num_train_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


def _rescale_to_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alphas_cumprod) so the last one is 0 and the first unchanged (arXiv 2305.08891)."""
    root = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


# A zero-terminal-SNR schedule has an infinite last sigma; diffusers' Euler and DPM-Solver clamp the last
# alphas_cumprod to this instead.
ZERO_SNR_LAST_ALPHAS_CUMPROD = 2.0**-24


def sigma_table(schedule: NoiseSchedule) -> np.ndarray:
    """float32 ``[T]``: ``sigma_t = sqrt((1 - abar_t) / abar_t)``, the noise scale of ``x_t / alpha_t``.

    Used by the samplers that work in sigma space; a zero last ``abar`` (zero terminal SNR) is clamped to
    ``ZERO_SNR_LAST_ALPHAS_CUMPROD`` as in diffusers.
    """
    alphas_cumprod = schedule.alphas_cumprod.copy()
    if alphas_cumprod[-1] == 0:
        alphas_cumprod[-1] = ZERO_SNR_LAST_ALPHAS_CUMPROD
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def _per_example(values: jax.Array, ndim: int) -> jax.Array:
    """``[B]`` (or scalar) -> ``[B, 1, ..., 1]`` so it broadcasts against ``ndim``-rank samples."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _alpha_sigma(schedule: NoiseSchedule, t: jax.Array, ndim: int, dtype) -> tuple[jax.Array, jax.Array]:
    alphas_cumprod = jnp.asarray(schedule.alphas_cumprod, dtype=dtype)[jnp.asarray(t)]
    return _per_example(alphas_cumprod**0.5, ndim), _per_example((1 - alphas_cumprod) ** 0.5, ndim)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = alpha_t * x0 + sigma_t * noise``; x0, noise ``[B, ...]``, t int ``[B]`` -> ``[B, ...]``."""
    alpha, sigma = _alpha_sigma(schedule, t, x0.ndim, x0.dtype)
    return alpha * x0 + sigma * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target ``v = alpha_t * noise - sigma_t * x0`` (diffusers' ``get_velocity``)."""
    alpha, sigma = _alpha_sigma(schedule, t, x0.ndim, x0.dtype)
    return alpha * noise - sigma * x0


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the UNet should output for ``add_noise(schedule, x0, noise, t)``, per ``prediction_type``."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ``alpha_t**2 / sigma_t**2`` at integer timesteps ``t`` (for min-SNR weighting)."""
    alphas_cumprod = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t)]
    return alphas_cumprod / (1 - alphas_cumprod)


class PredictionCoefficients(NamedTuple):
    """Per-step scalars with ``x0 = x0_from_sample * x + x0_from_output * out`` and likewise for eps.

    ``x`` is the variance-preserving sample ``alpha * x0 + sigma * eps`` and ``out`` the model output.
    Samplers fold the prediction type into these host-side tables so their jitted steps carry no branch
    on it.
    """

    x0_from_sample: np.ndarray
    x0_from_output: np.ndarray
    eps_from_sample: np.ndarray
    eps_from_output: np.ndarray


def prediction_coefficients(prediction_type: str, alpha: np.ndarray, sigma: np.ndarray) -> PredictionCoefficients:
    """Coefficients (float64 numpy, shaped like ``alpha``) for the given noise levels and prediction type.

    ``alpha**2 + sigma**2 == 1`` is assumed, as for every schedule here. Entries are inf/nan where the
    prediction type cannot recover x0 or eps (epsilon at alpha=0, sample at sigma=0); callers check.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    zeros, ones = np.zeros_like(alpha), np.ones_like(alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        if prediction_type == "epsilon":
            return PredictionCoefficients(1 / alpha, -sigma / alpha, zeros, ones)
        if prediction_type == "v_prediction":
            # v = alpha * eps - sigma * x0, so x0 = alpha * x - sigma * v and eps = sigma * x + alpha * v.
            return PredictionCoefficients(alpha, -sigma, sigma, alpha)
        if prediction_type == "sample":
            return PredictionCoefficients(zeros, ones, 1 / sigma, -alpha / sigma)
    raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
