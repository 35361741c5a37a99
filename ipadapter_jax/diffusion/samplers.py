"""The functional sampler interface shared by DDIM, Euler and DPM-Solver++(2M), and the whole-loop runner.

Usage (the loop body is what ``sample_loop`` runs under ``jax.lax.fori_loop``)::

    sampler = make_sampler("dpm++2m", scheduler_config, num_inference_steps=25)
    latents = noise * sampler.init_noise_sigma
    state = sampler.init_state(latents)
    for i in range(len(sampler.timesteps)):
        model_in = sampler.scale_model_input(latents, i)
        model_out = unet(model_in, sampler.timesteps[i])
        latents, state = sampler.step(state, model_out, i, latents)

All tables are computed on the host when the sampler is built and stored as jnp arrays, so ``i`` may be a
traced integer. Samplers are pytrees (flax.struct dataclasses): they can be closed over or passed into a
jitted function. Every operation is elementwise, so latents may have any layout (we use NHWC).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from ipadapter_jax.diffusion.ddim import DDIMSampler
from ipadapter_jax.diffusion.dpm_solver import DPMSolverPP2MSampler
from ipadapter_jax.diffusion.euler import EulerSampler


class Sampler(Protocol):
    """What every sampler provides; ``S = len(timesteps)``, step index ``i`` in ``[0, S)``."""

    timesteps: jax.Array  # [S], the timestep the model gets at step i (int32, or float32 for Euler).
    init_noise_sigma: float  # Unit noise times this is the starting latents.

    def init_state(self, latents: jax.Array) -> Any:
        """The pytree carried between steps (a fixed structure, so it fits a fori_loop carry)."""

    def scale_model_input(self, latents: jax.Array, i: jax.Array) -> jax.Array:
        """What the model sees at step i."""

    def step(self, state: Any, model_output: jax.Array, i: jax.Array, latents: jax.Array) -> tuple[jax.Array, Any]:
        """Latents after step i (in the input dtype) and the next state."""


SAMPLERS: dict[str, Callable[[Mapping[str, Any], int], Sampler]] = {
    "ddim": DDIMSampler.from_config,
    "euler": EulerSampler.from_config,
    "dpm++2m": DPMSolverPP2MSampler.from_config,
}

# diffusers scheduler class -> our sampler. PNDM and DDPM are not implemented: their configs sample with
# DDIM on the same betas, as ``DDIMScheduler.from_config(config)`` would (so a config without
# ``clip_sample`` gets DDIM's default clip_sample=True, exactly like diffusers).
DIFFUSERS_SCHEDULERS: dict[str, str] = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "ddim",
    "DDPMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpm++2m",
}


def make_sampler(name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int) -> Sampler:
    """The sampler ``name`` ("ddim", "euler" or "dpm++2m") for a diffusers scheduler config dict.

    The config's own ``_class_name`` is ignored; the named sampler reads the keys it knows with its
    diffusers class's defaults (as ``<Class>.from_config(config)`` does) and raises ``ValueError`` on
    values it does not implement.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](scheduler_config, num_inference_steps)


def from_diffusers_config(scheduler_config: Mapping[str, Any], num_inference_steps: int) -> Sampler:
    """The sampler a diffusers pipeline would use for this ``scheduler_config.json`` (by ``_class_name``).

    PNDMScheduler (SD1.5's default) and DDPMScheduler are not implemented; their configs get DDIM with the
    same betas and options (see ``DIFFUSERS_SCHEDULERS``).
    """
    class_name = scheduler_config.get("_class_name")
    if class_name not in DIFFUSERS_SCHEDULERS:
        raise ValueError(
            f"scheduler _class_name={class_name!r} is not supported; supported: {sorted(DIFFUSERS_SCHEDULERS)}"
        )
    return make_sampler(DIFFUSERS_SCHEDULERS[class_name], scheduler_config, num_inference_steps)


def sample_loop(
    sampler: Sampler, denoise_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array
) -> jax.Array:
    """Runs every sampler step under ``jax.lax.fori_loop``; call it inside a jitted function.

    Args:
      sampler: from ``make_sampler`` / ``from_diffusers_config``.
      denoise_fn: ``(model_input [B, ...], t) -> model_output [B, ...]`` with ``t`` a scalar array
        (``sampler.timesteps[i]``); classifier-free guidance belongs inside it.
      noise: unit-variance starting noise ``[B, ...]``; it is multiplied by ``sampler.init_noise_sigma``
        here, as diffusers' ``prepare_latents`` does.

    Returns:
      The final latents, same shape and dtype as ``noise``.
    """
    latents = noise * jnp.asarray(sampler.init_noise_sigma, dtype=noise.dtype)

    def one_step(i, carry):
        latents, state = carry
        model_output = denoise_fn(sampler.scale_model_input(latents, i), sampler.timesteps[i])
        return sampler.step(state, model_output, i, latents)

    num_steps = sampler.timesteps.shape[0]
    latents, _ = jax.lax.fori_loop(0, num_steps, one_step, (latents, sampler.init_state(latents)))
    return latents
