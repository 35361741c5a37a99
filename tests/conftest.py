"""Shared fixtures: tiny random diffusers UNets saved to disk, and random IP-Adapter files in the
published layout, built independently of our own writer (from the torch model's processor names)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run: this process, the other pytest-xdist worker and every
# subprocess a test starts (train.py, sample.py, the simulated-device scripts, the notebook's kernel) inherit
# it through JAX's own environment variables, so a program two tests compile (the trainer's step and the
# plan's, a jitted call and its AOT twin) compiles once. Only compiles over a second are stored. Keys are
# the programs' full contents and options, so a hit is the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "d" / "ipadapter_jax_compile_cache"))

import pytest

from ipadapter_jax.testing.random_weights import (  # noqa: F401 (re-exported for tests)
    random_ip_adapter_state, randomize_, torch_cross_attention_widths, write_ip_adapter_state)
from ipadapter_jax.testing.tiny_models import TINY_UNET

# The one tiny spec, with two layers per block: per-block scale tests pick one cross-attention of several.
TINY_UNETS = {arch: {**config, "layers_per_block": 2} for arch, config in TINY_UNET.items()}
TINY_SD15 = TINY_UNETS["sd15"]


@pytest.fixture(scope="session")
def tiny_unet_dirs(tmp_path_factory):
    """``{"sd15": path, "sdxl": path}``: diffusers UNet folders with random weights."""
    import torch
    from diffusers import UNet2DConditionModel

    out = {}
    for name, config in TINY_UNETS.items():
        torch.manual_seed(0)
        unet = randomize_(UNet2DConditionModel(**config).eval(), seed=1)
        path = tmp_path_factory.mktemp(f"unet_{name}")
        unet.save_pretrained(path)
        out[name] = path
    return out
