"""Parity of our JAX noise schedule and samplers with diffusers' PyTorch schedulers.

Metric for latents: ``rel_err = max|ours - ref| / max(1, max|ref|)`` after every step, which must stay
<= 1e-5 (latents scale with sigma, up to ~4096 for zero-terminal-SNR Euler; that one case allows 5e-5,
see LOOSER_TOLERANCE). Timesteps must be equal.
Both sides are driven by the same deterministic stand-in for a UNet, evaluated on their own latents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from ipadapter_jax.diffusion import noise_schedule
from ipadapter_jax.diffusion.ddim import DDIMSampler
from ipadapter_jax.diffusion.dpm_solver import DPMSolverPP2MSampler
from ipadapter_jax.diffusion.euler import EulerSampler
from ipadapter_jax.diffusion.noise_schedule import NoiseSchedule
from ipadapter_jax.diffusion.pndm import PNDMSampler
from ipadapter_jax.diffusion.samplers import describe_sampler, from_diffusers_config, make_sampler, sample_loop

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (= shared/reference/configs/sd15_scheduler.json),
# inlined so the test needs no file outside the repository.
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
V_TRAILING = {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
COMMON_CONFIGS = {
    "sd15": SD15,
    "sdxl": SDXL,
    "v_trailing": V_TRAILING,
    "v_zero_snr_trailing": {**V_TRAILING, "rescale_betas_zero_snr": True},
    "sample_linear_linspace": {
        "beta_schedule": "linear", "prediction_type": "sample", "timestep_spacing": "linspace"
    },
    "cosine_leading": {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading", "steps_offset": 1},
}
SPECIFIC_CONFIGS = {
    "ddim": {
        "clip_alpha_one_linspace": {**SD15, "clip_sample": True, "clip_sample_range": 1.5,
                                    "set_alpha_to_one": True, "timestep_spacing": "linspace"},
    },
    "euler": {
        "sigma_min_trailing_v": {**SDXL, "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing",
                                 "prediction_type": "v_prediction"},
    },
    "dpm++2m": {
        "sigma_min_no_lower_order_final": {**SD15, "final_sigmas_type": "sigma_min", "lower_order_final": False},
        "euler_at_final_leading": {**SDXL, "euler_at_final": True, "final_sigmas_type": "sigma_min"},
        "lambda_clipped_linspace": {**SD15, "lambda_min_clipped": -2.0},
        "lambda_clipped_trailing_v": {**V_TRAILING, "lambda_min_clipped": -2.0},
    },
}
# PNDM: only PLMS (skip_prk_steps=true, as SD1.5's and SDXL's configs set), epsilon or v; diffusers' PNDM has no
# zero-terminal-SNR option. Its warm-up (one repeated timestep, then orders 2 and 3) is all of 1-3 steps.
PNDM_CONFIGS = {
    "sd15": SD15,
    "sdxl": SDXL,
    "v_trailing": V_TRAILING,
    "cosine_leading": {**COMMON_CONFIGS["cosine_leading"], "skip_prk_steps": True},
    "alpha_one_linspace": {**SD15, "set_alpha_to_one": True, "timestep_spacing": "linspace"},
}
REFERENCES = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler,
              "pndm": PNDMScheduler}
OURS = {"ddim": DDIMSampler, "euler": EulerSampler, "dpm++2m": DPMSolverPP2MSampler, "pndm": PNDMSampler}
CASES = [
    (name, config_name, config, steps)
    for name in REFERENCES
    for config_name, config in (PNDM_CONFIGS if name == "pndm" else {**COMMON_CONFIGS, **SPECIFIC_CONFIGS[name]}).items()
    for steps in (10, 25, 50)
] + [("pndm", "sd15", SD15, steps) for steps in (1, 2, 3)]
CASE_IDS = [f"{name}-{config_name}-{steps}" for name, config_name, _, steps in CASES]
TOLERANCE = 1e-5
# diffusers' Euler step computes x + (x - x0) / sigma * (sigma_next - sigma) in float32. Starting from
# sigma = 4096 (zero terminal SNR) that cancels 4096-sized terms, so the reference itself is ~2.5e-5 off a
# float64 evaluation at 10 steps; ours regroups the step and stays within 1e-6 of it
# (test_euler_from_zero_terminal_snr_is_accurate).
LOOSER_TOLERANCE = {("euler", "v_zero_snr_trailing"): 5e-5}


def fake_model_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.9 * x + 0.2 * torch.sin(2.7 * x + 0.013 * t)


def fake_model_jax(x: jax.Array, t: jax.Array) -> jax.Array:
    return 0.9 * x + 0.2 * jnp.sin(2.7 * x + 0.013 * t)


def starting_noise(shape=(2, 4, 8, 8), seed=0) -> np.ndarray:
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


def reference_trajectory(scheduler, noise: np.ndarray) -> list[np.ndarray]:
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    trajectory = []
    for t in scheduler.timesteps:
        model_output = fake_model_torch(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(model_output, t, latents).prev_sample
        trajectory.append(latents.numpy())
    return trajectory


def our_trajectory(sampler, noise: np.ndarray) -> list[np.ndarray]:
    latents = jnp.asarray(noise) * sampler.init_noise_sigma
    state = sampler.init_state(latents)
    trajectory = []
    for i in range(len(sampler.timesteps)):
        model_output = fake_model_jax(sampler.scale_model_input(latents, i), sampler.timesteps[i])
        latents, state = sampler.step(state, model_output, i, latents)
        trajectory.append(np.asarray(latents))
    return trajectory


def build_pair(name: str, config: dict, steps: int):
    reference = REFERENCES[name].from_config(config)
    reference.set_timesteps(steps)
    return reference, make_sampler(name, config, steps)


@pytest.mark.parametrize(("name", "config_name", "config", "steps"), CASES, ids=CASE_IDS)
def test_sampler_matches_diffusers_step_by_step(name, config_name, config, steps):
    reference, sampler = build_pair(name, config, steps)
    assert isinstance(sampler, OURS[name])
    ref_timesteps = reference.timesteps.numpy()
    ours_timesteps = np.asarray(sampler.timesteps)
    assert ours_timesteps.shape == ref_timesteps.shape
    np.testing.assert_array_equal(ours_timesteps, ref_timesteps)
    assert (ours_timesteps.dtype.kind == "f") == (ref_timesteps.dtype.kind == "f")
    assert abs(sampler.init_noise_sigma - float(reference.init_noise_sigma)) <= 1e-6 * sampler.init_noise_sigma
    if hasattr(sampler, "sigmas"):
        # Zero-terminal-SNR alphas_cumprod differ from torch's by float32 ulps (see
        # test_forward_process_matches_ddpm), which 1 - abar amplifies near t = 0.
        rtol = 1e-5 if config.get("rescale_betas_zero_snr") else 1e-6
        np.testing.assert_allclose(np.asarray(sampler.sigmas), reference.sigmas.numpy(), rtol=rtol, atol=0)

    noise = starting_noise()
    errors = [
        relative_error(ours, ref)
        for ours, ref in zip(our_trajectory(sampler, noise), reference_trajectory(reference, noise), strict=True)
    ]
    tolerance = LOOSER_TOLERANCE.get((name, config_name), TOLERANCE)
    assert max(errors) <= tolerance, f"{config_name}: per-step relative errors {errors}"


def test_euler_from_zero_terminal_snr_is_accurate():
    config = COMMON_CONFIGS["v_zero_snr_trailing"]
    reference, sampler = build_pair("euler", config, 10)
    noise = starting_noise()
    # diffusers' Euler equations for v-prediction, in float64 on diffusers' own sigmas and timesteps.
    sigmas = reference.sigmas.numpy().astype(np.float64)
    latents = noise.astype(np.float64) * float(reference.init_noise_sigma)
    exact = []
    for i, t in enumerate(reference.timesteps.numpy().astype(np.float64)):
        sigma = sigmas[i]
        v = fake_model_torch(torch.from_numpy(latents / np.sqrt(sigma**2 + 1)), torch.tensor(t)).numpy()
        x0 = v * (-sigma / np.sqrt(sigma**2 + 1)) + latents / (sigma**2 + 1)
        latents = latents + (latents - x0) / sigma * (sigmas[i + 1] - sigma)
        exact.append(latents)
    errors = [relative_error(ours, ref) for ours, ref in zip(our_trajectory(sampler, noise), exact, strict=True)]
    assert max(errors) <= 1e-6, errors


def test_from_diffusers_config_picks_the_class():
    assert isinstance(from_diffusers_config(SD15, 10), PNDMSampler)
    assert isinstance(from_diffusers_config(SDXL, 10), EulerSampler)
    assert isinstance(from_diffusers_config({**SD15, "_class_name": "DDIMScheduler"}, 10), DDIMSampler)
    assert isinstance(from_diffusers_config({**SD15, "_class_name": "DPMSolverMultistepScheduler"}, 10),
                      DPMSolverPP2MSampler)
    # DDPM is not implemented: its config samples exactly like DDIMScheduler.from_config on the same config,
    # and the description says so.
    ddpm = {**SD15, "_class_name": "DDPMScheduler"}
    assert isinstance(from_diffusers_config(ddpm, 25), DDIMSampler)
    reference = DDIMScheduler.from_config(ddpm)
    reference.set_timesteps(25)
    noise = starting_noise(seed=1)
    ours = our_trajectory(from_diffusers_config(ddpm, 25), noise)[-1]
    assert relative_error(ours, reference_trajectory(reference, noise)[-1]) <= TOLERANCE
    assert "ddim" in describe_sampler(None, ddpm, 25) and "not implemented" in describe_sampler(None, ddpm, 25)
    assert describe_sampler(None, SD15, 50) == ("sampler: pndm (PNDM (PLMS), the model's PNDMScheduler config), "
                                                "50 steps (51 UNet evaluations)")
    assert describe_sampler("euler", SD15, 20).startswith("sampler: euler (Euler, chosen by name")


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_fori_loop_matches_python_loop(name):
    sampler = make_sampler(name, V_TRAILING if name == "euler" else SDXL, 12)
    noise = starting_noise(seed=2)
    looped = jax.jit(lambda s, x: sample_loop(s, fake_model_jax, x))(sampler, jnp.asarray(noise))
    python = our_trajectory(sampler, noise)[-1]
    assert looped.shape == noise.shape and looped.dtype == jnp.float32
    assert relative_error(looped, python) <= 1e-6
    # Lower-precision latents keep their dtype through the loop carry.
    bf16 = jax.jit(lambda x: sample_loop(sampler, fake_model_jax, x))(jnp.asarray(noise, jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    assert relative_error(bf16.astype(jnp.float32), python) <= 0.1


NOISE_CONFIGS = {
    "sd15": SD15,
    "linear": {},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "zero_snr": {**SD15, "rescale_betas_zero_snr": True},
    "trained_betas": {"num_train_timesteps": 5, "trained_betas": [0.1, 0.2, 0.3, 0.4, 0.5]},
}


@pytest.mark.parametrize("config", NOISE_CONFIGS.values(), ids=NOISE_CONFIGS.keys())
def test_forward_process_matches_ddpm(config):
    reference = DDPMScheduler.from_config(config)
    schedule = NoiseSchedule.from_config(config)
    ref_alphas_cumprod = reference.alphas_cumprod.numpy()
    if config.get("rescale_betas_zero_snr"):
        # torch's CPU float32 sqrt is not correctly rounded; we stay within a few ulps of it.
        np.testing.assert_allclose(schedule.alphas_cumprod, ref_alphas_cumprod, rtol=0, atol=1e-6)
    else:
        np.testing.assert_array_equal(schedule.alphas_cumprod, ref_alphas_cumprod)

    rng = np.random.RandomState(3)
    t = rng.randint(0, schedule.num_train_timesteps, size=6)
    x0, noise = rng.standard_normal((2, 6, 8, 8, 4)).astype(np.float32)  # NHWC latents
    torch_args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    checks = {
        "add_noise": (noise_schedule.add_noise, reference.add_noise(*torch_args)),
        "velocity": (noise_schedule.velocity, reference.get_velocity(*torch_args)),
    }
    for what, (ours_fn, ref) in checks.items():
        ours = jax.jit(ours_fn, static_argnums=0)(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
        assert float(np.abs(np.asarray(ours) - ref.numpy()).max()) <= 1e-6, what

    ref_snr = ref_alphas_cumprod[t] / (1 - ref_alphas_cumprod[t])
    np.testing.assert_allclose(np.asarray(noise_schedule.snr(schedule, t)), ref_snr, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target(prediction_type):
    schedule = NoiseSchedule.from_config({**SD15, "prediction_type": prediction_type})
    reference = DDPMScheduler.from_config(SD15)
    rng = np.random.RandomState(4)
    x0, noise = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    t = np.array([0, 500, 999])
    target = noise_schedule.training_target(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    ref_velocity = reference.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    expected = {"epsilon": noise, "v_prediction": ref_velocity.numpy(), "sample": x0}[prediction_type]
    assert float(np.abs(np.asarray(target) - expected).max()) <= 1e-6


BAD_CONFIGS = [
    ("ddim", {**SD15, "beta_schedule": "exponential"}, "beta_schedule"),
    ("ddim", {**SD15, "prediction_type": "flow_prediction"}, "prediction_type"),
    ("ddim", {**SD15, "timestep_spacing": "uniform"}, "timestep_spacing"),
    ("ddim", {**SD15, "thresholding": True}, "thresholding"),
    ("ddim", {**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, "zero terminal SNR"),
    ("ddim", {**SD15, "trained_betas": [0.1, 0.2]}, "trained_betas"),
    ("euler", {**SDXL, "use_karras_sigmas": True}, "use_karras_sigmas"),
    ("euler", {**SDXL, "interpolation_type": "log_linear"}, "interpolation_type"),
    ("euler", {**SDXL, "timestep_type": "continuous"}, "timestep_type"),
    ("dpm++2m", {**SD15, "algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpm++2m", {**SD15, "solver_order": 3}, "solver_order"),
    ("dpm++2m", {**SD15, "solver_type": "heun"}, "solver_type"),
    ("dpm++2m", {**SD15, "final_sigmas_type": "one"}, "final_sigmas_type"),
    ("pndm", {**SD15, "skip_prk_steps": False}, "skip_prk_steps=false .* not implemented"),
    ("pndm", {k: v for k, v in SD15.items() if k != "skip_prk_steps"}, "skip_prk_steps"),
    ("pndm", {**SD15, "prediction_type": "sample"}, "prediction_type"),
    ("pndm", {**SD15, "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ("pndm", {**SD15, "timestep_spacing": "uniform"}, "timestep_spacing"),
]


@pytest.mark.parametrize(("name", "config", "message"), BAD_CONFIGS, ids=[f"{n}-{m}" for n, _, m in BAD_CONFIGS])
def test_unsupported_config_values_raise(name, config, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(name, config, 10)


def test_bad_names_and_step_counts_raise():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("heun", SD15, 10)
    with pytest.raises(ValueError, match="_class_name"):
        from_diffusers_config({**SD15, "_class_name": "LMSDiscreteScheduler"}, 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler("euler", SDXL, 0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler("ddim", SD15, 1001)
