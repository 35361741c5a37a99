"""The functional sampler interface shared by DDIM, Euler, DPM-Solver++(2M) and PNDM (PLMS), and the
whole-loop runner.

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
from ipadapter_jax.diffusion.pndm import PNDMSampler


class Sampler(Protocol):
    """What every sampler provides; ``S = len(timesteps)`` model calls (the inference steps; one more for
    PNDM), step index ``i`` in ``[0, S)``."""

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
    "pndm": PNDMSampler.from_config,
}

# diffusers scheduler class -> our sampler. DDPM's ancestral sampling is not implemented: a DDPMScheduler
# config samples with DDIM on the same betas, as ``DDIMScheduler.from_config(config)`` would (so a config
# without ``clip_sample`` gets DDIM's default clip_sample=True, exactly like diffusers); ``describe_sampler``
# says so wherever a sampler is chosen.
DIFFUSERS_SCHEDULERS: dict[str, str] = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "DDPMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpm++2m",
}
_DESCRIPTIONS = {"ddim": "DDIM", "euler": "Euler", "dpm++2m": "DPM-Solver++(2M)", "pndm": "PNDM (PLMS)"}


def make_sampler(name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int) -> Sampler:
    """The sampler ``name`` ("ddim", "euler", "dpm++2m" or "pndm") for a diffusers scheduler config dict.

    The config's own ``_class_name`` is ignored; the named sampler reads the keys it knows with its
    diffusers class's defaults (as ``<Class>.from_config(config)`` does) and raises ``ValueError`` on
    values it does not implement.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](scheduler_config, num_inference_steps)


def sampler_name_for(scheduler_config: Mapping[str, Any]) -> str:
    """The name of the sampler a diffusers pipeline would use for this ``scheduler_config.json`` (by
    ``_class_name``; DDPMScheduler gets "ddim", see ``DIFFUSERS_SCHEDULERS``)."""
    class_name = scheduler_config.get("_class_name")
    if class_name not in DIFFUSERS_SCHEDULERS:
        raise ValueError(
            f"scheduler _class_name={class_name!r} is not supported; supported: {sorted(DIFFUSERS_SCHEDULERS)}"
        )
    return DIFFUSERS_SCHEDULERS[class_name]


def from_diffusers_config(scheduler_config: Mapping[str, Any], num_inference_steps: int) -> Sampler:
    """The sampler a diffusers pipeline would use for this ``scheduler_config.json`` (by ``_class_name``)."""
    return make_sampler(sampler_name_for(scheduler_config), scheduler_config, num_inference_steps)


def describe_sampler(name: str | None, scheduler_config: Mapping[str, Any], num_inference_steps: int) -> str:
    """One line saying which sampler runs and why, e.g. ``sampler: pndm (PNDM (PLMS), the model's
    PNDMScheduler config), 50 steps (51 UNet evaluations)``. ``name`` None: the model's config decides."""
    class_name = scheduler_config.get("_class_name")
    if name is None:
        name = sampler_name_for(scheduler_config)
        why = f"the model's {class_name} config"
        if class_name == "DDPMScheduler":
            why += " (DDPM's ancestral sampling is not implemented; DDIM on the same noise schedule)"
    else:
        why = f"chosen by name; the model's config is {class_name}"
    calls = f" ({num_inference_steps + 1} UNet evaluations)" if name == "pndm" and num_inference_steps > 1 else ""
    return f"sampler: {name} ({_DESCRIPTIONS[name]}, {why}), {num_inference_steps} steps{calls}"


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
