"""Random SD / SDXL diffusers pipelines saved to disk, with an image encoder: the references for end-to-end
parity tests (tiny sizes) and the sampling benchmark (larger sizes). Needs torch, diffusers, transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ipadapter_jax.testing.random_weights import (random_ip_adapter_state, randomize_,
                                                  torch_cross_attention_widths, write_ip_adapter_state)
from ipadapter_jax.data.synthetic import write_tiny_clip_tokenizer

IMAGE_ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     image_size=32, patch_size=8, projection_dim=16)
VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4)
SD_UNET = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, layers_per_block=1,
               attention_head_dim=4, norm_num_groups=8, sample_size=16)
SDXL_UNET = dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, layers_per_block=1,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8, sample_size=16)
# Larger, for benchmarks: SD1.5's layout (three cross-attention levels, an 8x VAE) at a fraction of the width.
BENCH_SD_UNET = dict(block_out_channels=(64, 128, 256, 256), down_block_types=("CrossAttnDownBlock2D",) * 3 +
                     ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=128, layers_per_block=2, attention_head_dim=4, norm_num_groups=32,
                     sample_size=16)
BENCH_VAE = dict(block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=32, latent_channels=4)
SIZES = {
    "tiny": dict(sd_unet=SD_UNET, sdxl_unet=SDXL_UNET, vae=VAE, text_hidden=32),
    "bench": dict(sd_unet=BENCH_SD_UNET, sdxl_unet=None, vae=BENCH_VAE, text_hidden=128),
}
# "full": the published SD1.5 configs (reference_configs/, ViT-H/14 image encoder) with random weights; std
# 0.02 (CLIP's own init scale) keeps activations finite through the full depth, where the small sizes' 0.1-0.15
# would overflow. Parameter-for-parameter what users run, with a tiny tokenizer (the vocabulary only sizes the
# embedding table, which both sides then index alike).
FULL_STD = 0.02
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)


def _text_encoder(vocab_size: int, projection: bool, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                            hidden_act="gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return randomize_((CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval(), seed=3)


def build_pipeline_dir(kind: str, root: Path, size: str = "tiny") -> Path:
    """Save a random ``kind`` ("sd" or "sdxl") diffusers pipeline with an ``image_encoder/`` under root;
    ``size`` is a key of ``SIZES``, or ``"full"`` (SD1.5 only: the published configs, see ``FULL_STD``)."""
    if size == "full" and kind != "sd":
        raise ValueError(f"size 'full' is built for kind 'sd' only, not {kind!r}")
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(root / "tok_src"), model_max_length=77)
    if size == "full":
        return _build_full_sd15(root, tokenizer)
    image_encoder = randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER)).eval(), seed=4)
    sizes = SIZES[size]
    vae = randomize_(AutoencoderKL(**sizes["vae"]).eval(), std=0.15, seed=5)
    unet = randomize_(UNet2DConditionModel(**sizes[f"{kind}_unet"]).eval(), std=0.1, seed=6)
    hidden = sizes["text_hidden"]
    if kind == "sd":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=_text_encoder(len(tokenizer), False, hidden),
                                       tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, image_encoder=image_encoder,
                                       requires_safety_checker=False)
    else:
        scheduler = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULER.items()
                                              if k not in ("set_alpha_to_one", "clip_sample")},
                                           timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=_text_encoder(len(tokenizer), False),
                                         text_encoder_2=_text_encoder(len(tokenizer), True), tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         image_encoder=image_encoder, feature_extractor=None)
    folder = root / kind
    pipe.save_pretrained(folder)
    return folder


def _build_full_sd15(root: Path, tokenizer) -> Path:
    """``build_pipeline_dir("sd", root, size="full")``: the published SD1.5 configs, random weights, saved one
    model at a time (about 7 GB of safetensors) so that at most one full-size model is in memory."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipadapter_jax.tools.reference_models import model_configs

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
    # The sampler the benchmarks compare (diffusers' SD1.5 ships PNDM, which ipadapter_jax does not run).
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def write_adapter(folder: Path, variant: str, seed: int) -> Path:
    """A random published-layout adapter that fits the pipeline's UNet and image encoder."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    encoder = json.loads((folder / "image_encoder" / "config.json").read_text())
    embed = encoder["projection_dim"] if variant == "plain" else encoder["hidden_size"]
    state = random_ip_adapter_state(torch_cross_attention_widths(unet), unet.config.cross_attention_dim, variant,
                                    seed=seed, embed_dim=embed)
    path = folder / f"ip_adapter_{variant}_{seed}.safetensors"
    write_ip_adapter_state(state, path)
    return path


def reference_image(seed: int = 0, size=(48, 40)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
