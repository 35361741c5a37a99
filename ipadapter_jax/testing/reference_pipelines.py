"""Random SD / SDXL diffusers pipelines saved to disk, with an image encoder: the references for end-to-end
parity tests and benchmarks (both sides load the same folder), plus random published-layout adapters for
them and a reference image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ipadapter_jax.testing.random_model import write_random_model
from ipadapter_jax.testing.random_weights import (random_ip_adapter_state, torch_cross_attention_widths,
                                                  write_ip_adapter_state)
from ipadapter_jax.testing.tiny_models import IMAGE_ENCODER

ARCHES = {"sd": "sd15", "sdxl": "sdxl"}


def build_pipeline_dir(kind: str, root: Path, size: str = "tiny") -> Path:
    """A random ``kind`` ("sd" or "sdxl") diffusers pipeline folder with ``image_encoder/``, ``root/kind``;
    ``size`` is a key of ``tiny_models.SIZES``."""
    return write_random_model(Path(root) / kind, arch=ARCHES[kind], size=size)


def write_adapter(folder: Path, variant: str, seed: int) -> Path:
    """A random published-layout adapter that fits the pipeline's UNet and image encoder."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    embed = IMAGE_ENCODER["projection_dim"] if variant == "plain" else IMAGE_ENCODER["hidden_size"]
    state = random_ip_adapter_state(torch_cross_attention_widths(unet), unet.config.cross_attention_dim, variant,
                                    seed=seed, embed_dim=embed)
    path = folder / f"ip_adapter_{variant}_{seed}.safetensors"
    write_ip_adapter_state(state, path)
    return path


def reference_image(seed: int = 0, size=(48, 40)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
