"""Random SD / SDXL diffusers pipelines saved to disk, with an image encoder: the references for end-to-end
parity tests (tiny sizes) and the sampling benchmark (larger sizes). Needs torch, diffusers, transformers."""

from __future__ import annotations

import json
from importlib import resources
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
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)


def _text_encoder(vocab_size: int, projection: bool, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                            hidden_act="gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return randomize_((CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval(), seed=3)


def build_pipeline_dir(kind: str, root: Path, size: str = "tiny", vae_std: float = 0.15,
                       published_scheduler: bool = False) -> Path:
    """Save a random ``kind`` ("sd" or "sdxl") diffusers pipeline with an ``image_encoder/`` under root;
    ``size`` is a key of ``SIZES``. ``vae_std``: the random VAE weights' scale (larger makes pixels follow
    the latents more closely). ``published_scheduler``: SD1.5's published scheduler config (PNDM, PLMS)
    instead of DDIM on the same betas (sd only)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(root / "tok_src"), model_max_length=77)
    image_encoder = randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER)).eval(), seed=4)
    sizes = SIZES[size]
    vae = randomize_(AutoencoderKL(**sizes["vae"]).eval(), std=vae_std, seed=5)
    unet = randomize_(UNet2DConditionModel(**sizes[f"{kind}_unet"]).eval(), std=0.1, seed=6)
    hidden = sizes["text_hidden"]
    if kind == "sd":
        scheduler = (PNDMScheduler.from_config(json.loads(resources.files("ipadapter_jax.reference_configs")
                                                          .joinpath("sd15_scheduler.json").read_text()))
                     if published_scheduler else DDIMScheduler(**SD_SCHEDULER))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=_text_encoder(len(tokenizer), False, hidden),
                                       tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
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
