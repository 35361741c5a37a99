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
# "full": the published SD1.5 configs (reference_configs/, ViT-H/14 image encoder) with random weights; std
# 0.02 (CLIP's own init scale) keeps activations finite through the full depth, where the small sizes' 0.1-0.15
# would overflow. Parameter-for-parameter what users run, with a tiny tokenizer (the vocabulary only sizes the
# embedding table, which both sides then index alike).
FULL_STD = 0.02


def _text_encoder(config: dict, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with_projection = config["architectures"] == ["CLIPTextModelWithProjection"]
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(CLIPTextConfig(**config))
    return randomize_(model.eval(), seed=seed)


def build_pipeline_dir(kind: str, root: Path, size: str = "parity", vae_std: float = 0.15,
                       published_scheduler: bool = False) -> Path:
    """Save a random ``kind`` ("sd" or "sdxl") diffusers pipeline with an ``image_encoder/`` under root;
    ``size`` is a key of ``tiny_models.SIZES``, or ``"full"`` (SD1.5 only: the published configs, see
    ``FULL_STD``; the other arguments do not apply). ``vae_std``: the random VAE weights' scale (larger makes pixels
    follow the latents more closely). ``published_scheduler``: SD1.5's published scheduler config (PNDM,
    PLMS) instead of DDIM on the same betas (sd only)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_toy_tokenizer(Path(root) / "tok_src"))
    if size == "full":
        if kind != "sd":
            raise ValueError(f"size 'full' is built for kind 'sd' only, not {kind!r}")
        return _build_full_sd15(Path(root), tokenizer)
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


def _build_full_sd15(root: Path, tokenizer) -> Path:
    """``build_pipeline_dir("sd", root, size="full")``: the published SD1.5 configs, random weights, saved one
    model at a time (about 7 GB of safetensors) so that at most one full-size model is in memory."""
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipadapter_jax.plan.reference_models import model_configs

    configs, _ = model_configs("sd15")
    folder = root / "sd"
    parts = {
        "unet": lambda: UNet2DConditionModel.from_config(configs["unet"]),
        "vae": lambda: AutoencoderKL.from_config(configs["vae"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**configs["image_encoder"])),
    }
    for seed, (name, build) in enumerate(parts.items()):
        randomize_(build().eval(), std=FULL_STD, seed=10 + seed).save_pretrained(folder / name)
    tokenizer.save_pretrained(folder / "tokenizer")
    # DDIM, the sampler the benchmarks compare on both sides (the published SD1.5 folder ships PNDM).
    DDIMScheduler.from_config({k: v for k, v in SCHEDULER.items() if k != "_class_name"}).save_pretrained(
        folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_adapter(folder: Path, variant: str, seed: int, std: float = 0.2) -> Path:
    """A random published-layout adapter that fits the pipeline's UNet and image encoder; ``std``: the
    weights' scale."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    encoder = json.loads((Path(folder) / "image_encoder" / "config.json").read_text())
    embed = encoder["projection_dim"] if variant == "plain" else encoder["hidden_size"]
    state = random_ip_adapter_state(torch_cross_attention_widths(unet), unet.config.cross_attention_dim, variant,
                                    seed=seed, embed_dim=embed, std=std)
    path = folder / f"ip_adapter_{variant}_{seed}.safetensors"
    write_ip_adapter_state(state, path)
    return path


def reference_image(seed: int = 0, size=(48, 40)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
