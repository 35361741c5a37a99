"""The built-in default: the shipped toy world (``ipadapter_jax/assets/toy/base``, a trained tiny SD-style
model on 32x32 coloured shapes; see ``ipadapter_jax/toy`` and TOY_WORLD.md) and its shapes shards, written
into WORKDIR on first use, trained on a laptop CPU. Otherwise as configs/sd15.py (every field and its meaning
are there; this file overrides what differs).

Usage: python train.py --config configs/tiny.py --workdir workdir [--config.num_steps=300]
(``python train.py`` with no arguments runs exactly this.)
"""

import ml_collections

from configs import sd15
from ipadapter_jax.toy_assets import ASSETS


def get_config() -> ml_collections.ConfigDict:
    c = sd15.get_config()
    c.num_steps = 3000  # optimizer updates in all (about 2 minutes on a 2-core CPU)
    c.batch_size = 8  # global batch over all devices and hosts

    c.model.model_dir = str(ASSETS / "base")  # the shipped toy base (diffusers layout, with image_encoder/)
    c.model.image_encoder_dir = ""  # "" means model_dir/image_encoder (the toy's mini CLIP)
    c.model.compute_dtype = "float32"  # dtype of the frozen weights and activations (float32 on CPU)

    c.adapter.hidden_dim = 64  # Plus only: the Resampler's width (the toy's cross-attention width)
    c.adapter.heads = 1  # Plus only: attention heads of the Resampler (64 / 64)

    c.data.shards = ""  # "" writes the toy world's shapes shards into WORKDIR/toy_shards
    c.data.resolution = 32  # the toy world's image side
    c.data.decode_threads = 2  # image-decoding threads per process (a laptop's cores)

    c.optimizer.learning_rate = 2e-3  # peak learning rate (the paper uses 1e-4 at scale; the toy world learns faster)
    c.optimizer.schedule = "cosine"  # decay to final_lr_fraction after the warmup: a short run ends settled
    c.optimizer.warmup_steps = 100  # linear warmup from 0 (not in the paper)

    c.checkpoint.every_steps = 500  # checkpoint + adapter export interval
    c.checkpoint.export_dtype = "float32"  # the toy adapter is small: keep full precision

    c.log.every_steps = 10  # metrics.jsonl / TensorBoard interval

    c.validation.every_steps = 1000  # sample a validation grid this often; 0 = never
    c.validation.num_images = 2  # image prompts taken from the first shard when `images` is empty
    c.validation.num_inference_steps = 10  # sampler steps (a quick grid)
    c.validation.guidance_scale = 3.0  # classifier-free guidance, as the README samples the toy world
    return c
