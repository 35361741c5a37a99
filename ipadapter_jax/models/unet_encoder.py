"""The encoder half that the UNet and the ControlNet share (diffusers' ``ControlNetModel`` is a copy of it):
the timestep (and SDXL text-time) embedding, and the down and mid blocks.

These are functions, not a submodule, so that the layers they create belong to the calling module under
their diffusers names (``time_embedding``, ``add_embedding``, ``down_blocks_{i}``, ``mid_block``) and both
models keep the flat parameter trees that map one-to-one onto diffusers' state dicts. Call them from inside
a compact ``__call__``. NHWC throughout.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from ipadapter_jax.models.embeddings import TimestepEmbedding, timestep_features
from ipadapter_jax.models.unet_blocks import BlockOptions, DownBlock, MidBlock
from ipadapter_jax.models.unet_config import CROSS_ATTN_DOWN, CROSS_ATTN_MID, UNetEncoderConfig


def block_options(cfg: UNetEncoderConfig, attention_implementation: str, remat: bool) -> BlockOptions:
    return BlockOptions(cfg.norm_num_groups, cfg.norm_eps, cfg.resnet_time_scale_shift, cfg.use_linear_projection,
                        cfg.upcast_attention, attention_implementation, remat)


def dummy_added_cond(cfg: UNetEncoderConfig, batch: int = 1) -> dict[str, jax.Array] | None:
    """Zero SDXL text-time inputs of the right shapes (None for configs without them)."""
    if cfg.text_embeds_dim is None:
        return None
    return {"text_embeds": jnp.zeros((batch, cfg.text_embeds_dim), jnp.float32),
            "time_ids": jnp.zeros((batch, 6), jnp.float32)}


def embed_time(cfg: UNetEncoderConfig, timesteps: jax.Array, added_cond: Mapping[str, jax.Array] | None,
               batch: int, dtype, module_dtype) -> jax.Array:
    """``timesteps`` (scalar or ``[B]``) -> ``temb [B, time_embed_dim]``, plus SDXL's text-time embedding of
    ``added_cond = {"text_embeds": [B, P], "time_ids": [B, 6]}`` when the config has one."""
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_feat = timestep_features(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                               freq_shift=cfg.freq_shift).astype(dtype)
    temb = TimestepEmbedding(cfg.time_embed_dim, dtype=module_dtype, name="time_embedding")(t_feat)
    if cfg.addition_embed_type != "text_time":
        return temb
    if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
        raise ValueError("this model (addition_embed_type='text_time') needs added_cond with "
                         "'text_embeds' and 'time_ids'")
    time_ids = added_cond["time_ids"]
    time_feat = timestep_features(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                  flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    add = jnp.concatenate([added_cond["text_embeds"].astype(jnp.float32), time_feat.reshape(batch, -1)], -1)
    return temb + TimestepEmbedding(cfg.time_embed_dim, dtype=module_dtype, name="add_embedding")(add.astype(dtype))


def encode(cfg: UNetEncoderConfig, options: BlockOptions, x: jax.Array, temb: jax.Array, context: jax.Array,
           image_tokens: Sequence[jax.Array], module_dtype) -> tuple[jax.Array, list[jax.Array]]:
    """``x`` (``conv_in``'s output, ``[B, H, W, C0]``) through the down blocks and the mid block.

    Returns ``(mid, skips)``: the mid block's output (the last down block's when there is no mid block) and
    every state the UNet's up path concatenates, ``x`` first, in diffusers' ``down_block_res_samples`` order.
    """
    skips = [x]
    n = len(cfg.block_out_channels)
    for i, kind in enumerate(cfg.down_block_types):
        x, block_skips = DownBlock(
            cfg.block_out_channels[i], cfg.layers_per_block[i], options,
            heads=cfg.num_heads[i] if kind == CROSS_ATTN_DOWN else None,
            transformer_layers=cfg.transformer_layers_per_block[i], add_downsample=i < n - 1,
            downsample_padding=cfg.downsample_padding, dtype=module_dtype, name=f"down_blocks_{i}",
        )(x, temb, context, image_tokens)
        skips.extend(block_skips)
    if cfg.mid_block_type is not None:
        x = MidBlock(cfg.block_out_channels[-1], options,
                     heads=cfg.num_heads[-1] if cfg.mid_block_type == CROSS_ATTN_MID else None,
                     transformer_layers=cfg.transformer_layers_per_block[-1],
                     output_scale_factor=cfg.mid_block_scale_factor, dtype=module_dtype,
                     name="mid_block")(x, temb, context, image_tokens)
    return x, skips
