"""IP-Adapter for SDXL (plain adapter, 4 tokens, CLIP ViT-H/14 image encoder as h94's ip-adapter_sdxl_vit-h) at
1024px. The frozen UNet and text encoders are split over ``mesh.fsdp`` devices and UNet blocks are
rematerialised. Its TPU plan as shipped (v5p-8, FSDP over the 4 chips, Pallas attention through "auto") is in
TPU_PLANS.md; 16 GiB v5e chips need the weights split over more chips (``--config.mesh.fsdp=8``). Otherwise as
configs/sd15.py (every field and its meaning are there; this file overrides what differs).

Usage: python train.py --config configs/sdxl.py --workdir gs://BUCKET/runs/sdxl \
    --config.model.model_dir=/models/stable-diffusion-xl-base-1.0 \
    --config.model.image_encoder_dir=/models/IP-Adapter/models/image_encoder --config.mesh.fsdp=8
"""

import ml_collections

from configs import sd15


def get_config() -> ml_collections.ConfigDict:
    c = sd15.get_config()
    c.model.model_dir = "models/stable-diffusion-xl-base-1.0"  # diffusers-layout SDXL base folder (+ text_encoder_2/ ...)
    c.model.remat = True  # recompute UNet blocks in the backward pass: 1024px activations do not fit otherwise
    c.adapter.hidden_dim = 1280  # Plus only: the Resampler's width (SDXL's cross-attention width)
    c.adapter.heads = 20  # Plus only: attention heads of the Resampler (1280 / 64)
    c.data.resolution = 1024  # SDXL's native image side
    c.mesh.fsdp = 4  # the frozen UNet and text encoders split over 4 chips (the v5p-8 plan)
    return c
