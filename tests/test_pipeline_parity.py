"""End to end against diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline + load_ip_adapter: tiny
random components saved with ``save_pretrained``, both sides loading from disk, the same starting latents.

Metric: max |our pixels - diffusers' pixels| over the whole image batch (values in [0, 1]), <= 2e-3, fp32.
Beside the four pairs every case runs on, one more sensitive pair (see ``PAIR_OPTIONS``) carries the
full-face adapter, SD1.5's PNDM scheduler config and the bf16-vs-fp32 bound (our bf16 pipeline against our
fp32 one: max abs <= 1.5e-2).
``test_diffusers_parity_on_eight_devices`` runs the DDIM cases again in a process with 8 simulated CPU
devices, where the pipeline splits (and pads) the batch over all of them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ipadapter_jax import IPAdapterPipeline
from ipadapter_jax.testing.reference_pipelines import build_pipeline_dir, reference_image, write_adapter

TOL = 2e-3
BF16_PIXEL_TOL = 1.5e-2  # bf16 pipeline vs fp32, max abs over pixels in [0, 1]
DEVICES_ENV = "IPADAPTER_JAX_PARITY_DEVICES"
STEPS = 4
SIZE = 32
BATCH = 2
PROMPT = "a red circle"


# Options of the pairs single tests use, named in their id after kind and variant. "sensitive": a VAE with
# larger weights and a stronger adapter, so that the image prompt (or the sampler) moves pixels by far more
# than the tolerances (in the default pairs the image prompt moves them by ~4e-3), and SD1.5's published
# scheduler config (PNDM), which diffusers and we sample with when no scheduler is named.
PAIR_OPTIONS = {"sensitive": dict(vae_std=0.3, adapter_std=1.0, published_scheduler=True)}
SENSITIVE_FULL_FACE = [("sd", "full", "sensitive")]


class Pair:
    def __init__(self, kind, root, variant, vae_std=0.15, adapter_std=0.2, published_scheduler=False):
        from diffusers import DiffusionPipeline

        folder = build_pipeline_dir(kind, root, vae_std=vae_std, published_scheduler=published_scheduler)
        self.folder = folder
        self.adapter = write_adapter(folder, variant, seed=1, std=adapter_std)
        self.ours = IPAdapterPipeline.from_pretrained(folder, ip_adapter=self.adapter,
                                                      image_encoder=folder / "image_encoder")
        devices = int(os.environ.get(DEVICES_ENV, "0"))
        if devices:  # the multi-device run: the pipeline must really sample over every device
            assert self.ours.mesh.size == devices, self.ours.mesh
        self.theirs = DiffusionPipeline.from_pretrained(folder)
        self.theirs.load_ip_adapter(str(folder), subfolder="", weight_name=self.adapter.name,
                                    image_encoder_folder=None)
        self.theirs.set_progress_bar_config(disable=True)
        self.base_scheduler = self.theirs.scheduler
        self.image = reference_image()
        gen = torch.Generator().manual_seed(0)
        factor = 2 ** (len(self.theirs.vae.config.block_out_channels) - 1)
        self.latents = torch.randn(BATCH, 4, SIZE // factor, SIZE // factor, generator=gen)

    def run(self, scheduler, guidance, scale):
        """Both pipelines on the same latents; ``scheduler`` None: each its folder's own scheduler config."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

        classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler,
                   "pndm": PNDMScheduler}
        self.theirs.scheduler = (self.base_scheduler if scheduler is None
                                 else classes[scheduler].from_config(self.base_scheduler.config))
        self.theirs.set_ip_adapter_scale(scale)
        ref = self.theirs(PROMPT, ip_adapter_image=self.image, num_inference_steps=STEPS, guidance_scale=guidance,
                          height=SIZE, width=SIZE, latents=self.latents.clone(), num_images_per_prompt=BATCH,
                          output_type="np").images
        ours = self.ours([PROMPT] * BATCH, ip_adapter_image=self.image, ip_scale=scale, num_inference_steps=STEPS,
                         guidance_scale=guidance, height=SIZE, width=SIZE, latents=self.latents.numpy(),
                         scheduler=scheduler)
        assert ours.shape == ref.shape == (BATCH, SIZE, SIZE, 3) and ours.dtype == np.float32
        return ours, ref


@pytest.fixture(scope="module", params=[("sd", "plain"), ("sd", "plus"), ("sdxl", "plain"), ("sdxl", "plus")],
                ids=lambda p: "-".join(p))
def pair(request, tmp_path_factory):
    kind, variant, *options = request.param
    return Pair(kind, tmp_path_factory.mktemp("pipe"), variant,
                **{key: value for option in options for key, value in PAIR_OPTIONS[option].items()})


# (scheduler, guidance, scales): every sampler with CFG; scales 0 / 0.6 / 1 share one compiled loop.
CASES = [("ddim", 7.5, (0.0, 0.6, 1.0)), ("euler", 7.5, (0.6,)), ("dpm++2m", 7.5, (0.6,)), ("ddim", 1.0, (0.6, 1.0))]


@pytest.mark.parametrize("scheduler,guidance,scales", CASES, ids=[f"{c[0]}-g{c[1]}" for c in CASES])
def test_pixels_match_diffusers(pair, scheduler, guidance, scales):
    images = {}
    for scale in scales:
        ours, ref = pair.run(scheduler, guidance, scale)
        err = np.abs(ours - ref).max()
        assert err <= TOL, f"{scheduler} guidance={guidance} ip_scale={scale}: max abs diff {err:.2e}"
        images[scale] = ours
    if 0.0 in images:
        # The image prompt must move pixels by more than the tolerance, or the comparison proves little.
        assert np.abs(images[1.0] - images[0.0]).max() > TOL, "the image prompt changed nothing"


@pytest.mark.parametrize("pair", SENSITIVE_FULL_FACE, indirect=True, ids=["sd-full-sensitive"])
def test_full_face_pixels_match_diffusers(pair):
    """h94's ``ip-adapter-full-face_sd15`` layout (an MLP over every penultimate hidden state of the image
    encoder; the negative image prompt is the hidden states of a zero image) end to end, DDIM with CFG."""
    images = {}
    for scale in (0.0, 0.7):
        ours, ref = pair.run("ddim", 7.5, scale)
        err = np.abs(ours - ref).max()
        assert err <= TOL, f"full-face ip_scale={scale}: max abs diff {err:.2e}"
        images[scale] = ours
    moved = np.abs(images[0.7] - images[0.0]).max()
    assert moved > 0.05, f"the full-face image prompt moved pixels by only {moved:.3f}"


@pytest.mark.parametrize("pair", SENSITIVE_FULL_FACE, indirect=True, ids=["sd-full-sensitive"])
def test_published_sd15_scheduler_runs_pndm_like_diffusers(pair, caplog):
    """SD1.5's own scheduler config (PNDMScheduler, skip_prk_steps) with no scheduler named: diffusers samples
    with PLMS, and so do we (it used to become DDIM); the pipeline logs which sampler ran."""
    with caplog.at_level(logging.INFO, logger="ipadapter_jax.pipeline.ip_adapter_pipeline"):
        ours, ref = pair.run(None, 7.5, 0.6)
    assert type(pair.theirs.scheduler).__name__ == "PNDMScheduler" and pair.theirs.scheduler.config.skip_prk_steps
    err = np.abs(ours - ref).max()
    assert err <= TOL, f"PNDM: max abs diff {err:.2e}"
    assert (f"sampler: pndm (PNDM (PLMS), the model's PNDMScheduler config), {STEPS} steps ({STEPS + 1} UNet "
            f"evaluations)") in caplog.messages
    # Not DDIM under another name: DDIM from the same config lands elsewhere.
    ddim, _ = pair.run("ddim", 7.5, 0.6)
    assert np.abs(ddim - ours).max() > 10 * TOL


@pytest.mark.parametrize("pair", SENSITIVE_FULL_FACE, indirect=True, ids=["sd-full-sensitive"])
def test_bfloat16_generate_stays_near_float32(pair):
    """``dtype="bfloat16"`` (UNet, VAE, text and image encoders in bf16; the adapter's projection in fp32)
    against the fp32 pipeline on the same latents, DDIM with CFG at ip_scale 0.3 (where the image prompt's
    effect is not yet saturated in this model). Measured: max abs 8.9e-3, mean 1.5e-3 (pixels in [0, 1])."""
    bf16 = IPAdapterPipeline.from_pretrained(pair.folder, ip_adapter=pair.adapter,
                                             image_encoder=pair.folder / "image_encoder", dtype="bfloat16")
    assert bf16.base.unet.params["conv_in"]["kernel"].dtype == jnp.bfloat16
    run = lambda pipe, scale: pipe([PROMPT] * BATCH, ip_adapter_image=pair.image, ip_scale=scale,  # noqa: E731
                                   num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                                   latents=pair.latents.numpy(), scheduler="ddim")
    fp32 = {scale: run(pair.ours, scale) for scale in (0.0, 0.3, 1.0)}
    err = np.abs(run(bf16, 0.3) - fp32[0.3]).max()
    assert err <= BF16_PIXEL_TOL, f"bf16 vs fp32 pixels: max abs diff {err:.2e}"
    # The bound tells apart a dropped scale: 0 or 1 instead of 0.3 lands farther off than the bound plus the
    # bf16 noise (measured 3.1e-2 and 5.0e-2).
    for wrong in (0.0, 1.0):
        assert np.abs(fp32[wrong] - fp32[0.3]).max() > 1.5 * BF16_PIXEL_TOL, wrong


@pytest.mark.slow
def test_diffusers_parity_on_eight_devices():
    """The DDIM + guidance case of the plainest and the fullest model pair (SD1.5 plain; SDXL Plus, which adds
    the time ids and the Resampler to what is sharded), in a process with 8 simulated CPU devices. The other
    pairs' sharding is the same code; tests/test_pipeline_devices.py checks pixels across meshes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               **{DEVICES_ENV: "8"})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "test_pixels_match_diffusers and ddim-g7.5 and (sd-plain or sdxl-plus)"], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout, proc.stdout[-2000:]
