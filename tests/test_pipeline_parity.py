"""End to end against diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline + load_ip_adapter: tiny
random components saved with ``save_pretrained``, both sides loading from disk, the same starting latents.

Metric: max |our pixels - diffusers' pixels| over the whole image batch (values in [0, 1]), <= 2e-3, fp32.
``test_diffusers_parity_on_eight_devices`` runs the DDIM cases again in a process with 8 simulated CPU
devices, where the pipeline splits (and pads) the batch over all of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ipadapter_jax import IPAdapterPipeline
from ipadapter_jax.testing.reference_pipelines import build_pipeline_dir, reference_image, write_adapter

TOL = 2e-3
DEVICES_ENV = "IPADAPTER_JAX_PARITY_DEVICES"
STEPS = 4
SIZE = 32
BATCH = 2
PROMPT = "a red circle"


class Pair:
    def __init__(self, kind, root, variant):
        from diffusers import DiffusionPipeline

        folder = build_pipeline_dir(kind, root)
        self.adapter = write_adapter(folder, variant, seed=1)
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
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler}
        self.theirs.scheduler = classes[scheduler].from_config(self.base_scheduler.config)
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
    kind, variant = request.param
    return Pair(kind, tmp_path_factory.mktemp("pipe"), variant)


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
