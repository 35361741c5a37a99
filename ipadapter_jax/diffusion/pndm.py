"""PNDM as diffusers runs it for Stable Diffusion: ``PNDMScheduler`` with ``skip_prk_steps=True``, i.e. the
pseudo linear multistep method (PLMS, arXiv 2202.09778) with its two warm-up steps instead of Runge-Kutta.

Every update is formula (9) of the paper, ``x_prev = c_x(t, t') x - c_e(t, t') e`` with ``e`` a combination
of the model's noise predictions. With ``S`` inference steps the model runs ``S + 1`` times, at
``t_0, t_1, t_1, t_2, ..., t_{S-1}`` (``r = num_train_timesteps // S``):

  - call 0 at ``t_0``: ``e = e_0``, a first-order step from the starting sample ``x_T`` to ``t_0 - r``;
  - call 1 at ``t_1``: ``e = (e_0 + e_1) / 2`` applied again to ``x_T`` (from ``t_1 + r`` to ``t_1``): this
    replaces the first step's result (a Heun-like warm-up); ``e_1`` is not kept;
  - calls 2, 3: the 2nd- and 3rd-order Adams-Bashforth combinations of the kept outputs;
  - later calls: ``(55 e_k - 59 e_{k-1} + 37 e_{k-2} - 9 e_{k-3}) / 24``;

each from ``t`` to ``t - r`` (below 0: the final alpha). All of that is fixed per call, so it lives in host
tables and the jitted step has no branches; the state is the last three kept outputs and ``x_T``.
``skip_prk_steps=False`` (the Runge-Kutta warm-up diffusers' unconditional ``PNDMPipeline`` uses; no Stable
Diffusion config sets it) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.diffusion.noise_schedule import NoiseSchedule
from ipadapter_jax.diffusion.scheduler_config import (
    check_num_inference_steps,
    read_choice,
    read_flag,
    read_int,
    reject_flags,
)

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# The weights of (this call's output, the last three kept outputs, most recent first) by call index; calls
# from 4 on use the last row.
_OUTPUT_WEIGHTS = np.array([
    [1, 0, 0, 0],
    [1 / 2, 1 / 2, 0, 0],
    [3 / 2, -1 / 2, 0, 0],
    [23 / 12, -16 / 12, 5 / 12, 0],
    [55 / 24, -59 / 24, 37 / 24, -9 / 24],
])


def pndm_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """What the model receives at each call, int64 ``[S + 1]`` (``[1]`` for ``S = 1``): the timesteps of
    ``PNDMScheduler.set_timesteps`` with ``skip_prk_steps=True``, the second one repeated."""
    if spacing == "linspace":
        ascending = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round().astype(np.int64)
    elif spacing == "leading":
        ascending = np.arange(num_inference_steps, dtype=np.int64) * (num_train_timesteps // num_inference_steps)
        ascending += steps_offset
    elif spacing == "trailing":
        stride = num_train_timesteps / num_inference_steps
        ascending = np.round(np.arange(num_train_timesteps, 0, -stride))[::-1].astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not one of {TIMESTEP_SPACINGS}")
    return np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()


@flax.struct.dataclass
class PNDMSampler:
    """PLMS as ``PNDMScheduler(skip_prk_steps=True)``. Build with ``PNDMSampler.from_config``.

    Attributes (indexed by the call index ``i``, ``S + 1`` calls for ``S`` inference steps):
      timesteps: int32, what the UNet receives.
      sample_coeff, output_coeff: float32, ``x_prev = sample_coeff * x + output_coeff * e`` (the prediction
        type folded in; ``x`` is the current latents, or ``x_T`` where ``from_start``).
      output_weights: float32 ``[calls, 4]``, ``e`` from this call's output and the last three kept ones.
      from_start: bool, the update starts from ``x_T`` (call 1 only).
      keep: bool, this call's output joins the history (all calls but call 1).
      init_noise_sigma: 1.0.
    """

    timesteps: jax.Array
    sample_coeff: jax.Array
    output_coeff: jax.Array
    output_weights: jax.Array
    from_start: jax.Array
    keep: jax.Array
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], num_inference_steps: int) -> PNDMSampler:
        """Equivalent of ``PNDMScheduler.from_config(config)`` + ``set_timesteps(num_inference_steps)``.

        Reads, with PNDMScheduler's defaults: the noise-schedule keys (see ``NoiseSchedule.from_config``),
        ``prediction_type`` ("epsilon" or "v_prediction"), ``timestep_spacing`` ("leading"), ``steps_offset``
        (0), ``set_alpha_to_one`` (false) and ``skip_prk_steps`` (false, which is refused: only true is
        implemented). ``rescale_betas_zero_snr`` must be false: PNDMScheduler has no such option (diffusers
        would ignore it and sample on another schedule than the model's). Other keys are ignored.
        """
        what = "PNDM sampler config"
        if not read_flag(config, "skip_prk_steps", False, what):
            raise ValueError(f"{what}: skip_prk_steps=false (PNDM's Runge-Kutta warm-up) is not implemented, only "
                             f"PLMS (skip_prk_steps=true, as every Stable Diffusion config sets); choose another "
                             f"sampler (ddim, euler, dpm++2m)")
        reject_flags(config, ("rescale_betas_zero_snr",), what)
        schedule = NoiseSchedule.from_config(config)
        read_choice(config, "prediction_type", "epsilon", PREDICTION_TYPES, what)
        num_train = schedule.num_train_timesteps
        check_num_inference_steps(num_inference_steps, num_train)
        spacing = read_choice(config, "timestep_spacing", "leading", TIMESTEP_SPACINGS, what)
        steps_offset = read_int(config, "steps_offset", 0, what)
        set_alpha_to_one = read_flag(config, "set_alpha_to_one", False, what)

        timesteps = pndm_timesteps(num_train, num_inference_steps, spacing, steps_offset)
        calls = np.arange(len(timesteps))
        stride = num_train // num_inference_steps
        # Call 1 steps from t_1 + r to t_1 (redoing call 0's step with the averaged output); the others from
        # t to t - r, whatever the spacing (as diffusers does).
        current = np.where(calls == 1, timesteps + stride, timesteps)
        target = np.where(calls == 1, timesteps, timesteps - stride)
        if timesteps.min() < 0 or current.max() >= num_train:
            raise ValueError(f"{what}: timesteps {timesteps.tolist()} fall outside the training schedule")
        alphas_cumprod = schedule.alphas_cumprod.astype(np.float64)
        final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
        a_t = alphas_cumprod[current]
        a_prev = np.where(target >= 0, alphas_cumprod[np.maximum(target, 0)], final)
        # Formula (9): x_prev = sqrt(a_prev / a_t) x - (a_prev - a_t) e / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev)).
        sample_coeff = np.sqrt(a_prev / a_t)
        output_coeff = -(a_prev - a_t) / (a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev))
        if schedule.prediction_type == "v_prediction":  # e = sqrt(a_t) v + sqrt(1 - a_t) x
            sample_coeff = sample_coeff + output_coeff * np.sqrt(1 - a_t)
            output_coeff = output_coeff * np.sqrt(a_t)

        f32 = lambda values: jnp.asarray(values, dtype=jnp.float32)  # noqa: E731
        return cls(
            timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
            sample_coeff=f32(sample_coeff),
            output_coeff=f32(output_coeff),
            output_weights=f32(_OUTPUT_WEIGHTS[np.minimum(calls, len(_OUTPUT_WEIGHTS) - 1)]),
            from_start=jnp.asarray(calls == 1),
            keep=jnp.asarray(calls != 1),
        )

    def init_state(self, latents: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(e_k, e_{k-1}, e_{k-2}, x_T)``: the last three kept outputs (zeros before any) and the start."""
        zeros = jnp.zeros(latents.shape, jnp.float32)
        return zeros, zeros, zeros, latents.astype(jnp.float32)

    def scale_model_input(self, latents: jax.Array, i: jax.Array) -> jax.Array:
        del i  # PNDM feeds the sample to the UNet unscaled.
        return latents

    def step(self, state, model_output: jax.Array, i: jax.Array, latents: jax.Array):
        """Call ``i``'s update; returns ``(latents, state)``, latents in their input dtype."""
        kept_1, kept_2, kept_3, start = state
        out = model_output.astype(jnp.float32)
        w = self.output_weights[i]
        combined = w[0] * out + w[1] * kept_1 + w[2] * kept_2 + w[3] * kept_3
        base = jnp.where(self.from_start[i], start, latents.astype(jnp.float32))
        x_prev = self.sample_coeff[i] * base + self.output_coeff[i] * combined
        keep = self.keep[i]
        state = (jnp.where(keep, out, kept_1), jnp.where(keep, kept_1, kept_2), jnp.where(keep, kept_2, kept_3), start)
        return x_prev.astype(latents.dtype), state
