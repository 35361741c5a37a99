"""IP-Adapter Plus for Stable Diffusion 1.5: a Resampler (perceiver, 16 queries, depth 4, 12 x 64-wide heads)
over the CLIP ViT-H/14 image encoder's penultimate hidden states; otherwise as configs/sd15.py (every field
and its meaning are there; this file overrides what differs).

Usage: python train.py --config configs/sd15_plus.py --workdir runs/sd15_plus \
    --config.model.model_dir=/models/stable-diffusion-v1-5 --config.data.shards='/data/shards/*.tar'
"""

import ml_collections

from configs import sd15


def get_config() -> ml_collections.ConfigDict:
    c = sd15.get_config()
    c.adapter.variant = "plus"  # the Resampler over the image encoder's penultimate hidden states
    c.adapter.num_tokens = 16  # image tokens the Resampler's queries produce (h94's Plus adapters)
    return c
