"""Random SD / SDXL diffusers pipelines saved to disk, with an image encoder: the references for end-to-end
parity tests (tiny sizes) and the sampling benchmark (larger sizes). Needs torch, diffusers, transformers.

The models are ``tiny_models``' spec built as torch modules with random weights and written by diffusers'
own ``save_pretrained``, so the reference side of a parity test does not depend on our folder writer
(``weights/pipeline_folder.py``, which ``random_model`` uses for the Flax-side test models).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ipadapter_jax.testing.random_weights import (random_ip_adapter_state, randomize_,
                                                  torch_cross_attention_widths, write_ip_adapter_state)
from ipadapter_jax.testing.tiny_models import IMAGE_ENCODER, SCHEDULER, SIZES, text_encoder_configs
from ipadapter_jax.toy.toy_tokenizer import write_toy_tokenizer

ARCHES = {"sd": "sd15", "sdxl": "sdxl"}


def _text_encoder(config: dict, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with_projection = config["architectures"] == ["CLIPTextModelWithProjection"]
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(CLIPTextConfig(**config))
    return randomize_(model.eval(), seed=seed)


def build_pipeline_dir(kind: str, root: Path, size: str = "parity", vae_std: float = 0.15,
                       published_scheduler: bool = False) -> Path:
    """Save a random ``kind`` ("sd" or "sdxl") diffusers pipeline with an ``image_encoder/`` under root;
    ``size`` is a key of ``tiny_models.SIZES``. ``vae_std``: the random VAE weights' scale (larger makes pixels
    follow the latents more closely). ``published_scheduler``: SD1.5's published scheduler config (PNDM,
    PLMS) instead of DDIM on the same betas (sd only)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_toy_tokenizer(Path(root) / "tok_src"))
    image_encoder = randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER)).eval(), seed=4)
    unets, vae_config = SIZES[size]
    vae = randomize_(AutoencoderKL(**vae_config).eval(), std=vae_std, seed=5)
    unet = randomize_(UNet2DConditionModel(**unets[ARCHES[kind]]).eval(), std=0.1, seed=6)
    text_encoders = [_text_encoder(c, seed=3 + i) for i, c in enumerate(text_encoder_configs(unets[ARCHES[kind]]))]
    ddim = DDIMScheduler.from_config({k: v for k, v in SCHEDULER.items() if k != "_class_name"})
    if kind == "sd":
        scheduler = (PNDMScheduler.from_config(json.loads(resources.files("ipadapter_jax.reference_configs")
                                                          .joinpath("sd15_scheduler.json").read_text()))
                     if published_scheduler else ddim)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       image_encoder=image_encoder, requires_safety_checker=False)
    else:
        scheduler = EulerDiscreteScheduler.from_config(ddim.config, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         image_encoder=image_encoder, feature_extractor=None)
    folder = Path(root) / kind
    pipe.save_pretrained(folder)
    return folder


def write_adapter(folder: Path, variant: str, seed: int, std: float = 0.2) -> Path:
    """A random published-layout adapter that fits the pipeline's UNet and image encoder; ``std``: the
    weights' scale."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    embed = IMAGE_ENCODER["projection_dim"] if variant == "plain" else IMAGE_ENCODER["hidden_size"]
    state = random_ip_adapter_state(torch_cross_attention_widths(unet), unet.config.cross_attention_dim, variant,
                                    seed=seed, embed_dim=embed, std=std)
    path = folder / f"ip_adapter_{variant}_{seed}.safetensors"
    write_ip_adapter_state(state, path)
    return path


def reference_image(seed: int = 0, size=(48, 40)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
