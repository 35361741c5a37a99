"""The one spec of the tiny models that tests and benchmarks build with random weights (``random_model.py``
writes them as diffusers folders; ``tests/conftest.py``, the reference pipelines, the TPU-plan tests and the
benchmarks all read these configs; the shipped toy world in ``ipadapter_jax/toy`` is the trained one).

SD1.5's and SDXL's layouts at a few dozen channels: cross-attention at one UNet level (SD1.5 at the first,
SDXL at the second with two transformer layers, as SDXL's deeper levels have more) and in the mid block, an
8x VAE (a 2x one for the parity references), CLIP text encoders over the toy tokenizer's vocabulary (SDXL: two, whose hidden states together make
the cross-attention width, the second pooled and projected), and a CLIP image encoder with projection.
``BENCH_UNET`` / ``BENCH_VAE``: SD1.5's full layout (three cross-attention levels) at reduced width, for the
CPU benchmarks.
"""

from __future__ import annotations

from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.toy.toy_tokenizer import vocab_size
from ipadapter_jax.weights import transformers_folders as tf

TEXT_LENGTH = 77  # CLIP's caption length, which the tokenizers pad to
SDXL_POOLED = 16  # SDXL: width of the second text encoder's pooled projection (the UNet's text_embeds)
SDXL_TIME_DIM = 8  # SDXL: width of each of the six time-id embeddings

TINY_UNET = {
    "sd15": dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, layers_per_block=1,
                 attention_head_dim=4, norm_num_groups=8, sample_size=8),
    "sdxl": dict(block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=48, layers_per_block=1,
                 attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
                 projection_class_embeddings_input_dim=SDXL_POOLED + 6 * SDXL_TIME_DIM, norm_num_groups=8,
                 sample_size=8),
}
TINY_VAE = dict(block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                sample_size=64)
# The parity references' VAE: 2x, so the 32px images the parity tests compare come from 16x16 latents and a
# sampler's or an image prompt's effect shows in the pixels (through the 8x VAE's 4x4 latents it barely does).
PARITY_VAE = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4)
BENCH_UNET = {
    "sd15": dict(block_out_channels=[64, 128, 256, 256], down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=128,
                 layers_per_block=2, attention_head_dim=4, norm_num_groups=32, sample_size=16),
}
BENCH_VAE = dict(block_out_channels=[32, 64, 128, 128], down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, latent_channels=4, norm_num_groups=32,
                 sample_size=128)
# (UNets by arch, VAE) by name: "tiny" for the training tests' random world, "parity" for the parity references,
# "bench" for the benchmarks.
SIZES = {"tiny": (TINY_UNET, TINY_VAE), "parity": (TINY_UNET, PARITY_VAE), "bench": (BENCH_UNET, BENCH_VAE)}

# SD1.5's betas; v-prediction, which the random world's short UNet pretraining learns faster (as the toy's).
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def text_encoder_configs(unet: dict) -> list[dict]:
    """The transformers configs of the text encoders that fit ``unet`` (a diffusers config dict): SD's one
    ``CLIPTextModel`` as wide as the cross-attention; SDXL's 16-wide ``CLIPTextModel`` and a
    ``CLIPTextModelWithProjection`` for the rest of the width, pooled to ``SDXL_POOLED``."""
    vocab = vocab_size()
    bos, eos = vocab - 2, vocab - 1  # the toy tokenizer's specials take the two highest ids

    def config(hidden: int, projection: int, with_projection: bool) -> dict:
        return tf.text_config(vocab, bos, eos, hidden_size=hidden, layers=2, heads=2, intermediate_size=2 * hidden,
                              projection_dim=projection, max_position_embeddings=TEXT_LENGTH,
                              with_projection=with_projection)

    cross = unet["cross_attention_dim"]
    if not UNetConfig.from_diffusers(unet).is_sdxl:
        return [config(cross, cross, False)]
    pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
    return [config(16, 16, False), config(cross - 16, pooled, True)]


IMAGE_ENCODER = tf.vision_config(image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2,
                                 intermediate_size=64, projection_dim=16)
