"""The Stable Diffusion UNet (diffusers' ``UNet2DConditionModel``) with decoupled image cross-attention.

Inside the model everything is NHWC. Users who hold diffusers' NCHW latents convert at the edge
(``jnp.transpose(x, (0, 2, 3, 1))``); the pipeline does this for them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.embeddings import TimestepEmbedding, timestep_features
from ipadapter_jax.models.group_norm import GroupNorm
from ipadapter_jax.models.resnet import conv3x3
from ipadapter_jax.models.unet_blocks import BlockOptions, DownBlock, MidBlock, UpBlock
from ipadapter_jax.models.unet_config import CROSS_ATTN_DOWN, CROSS_ATTN_MID, CROSS_ATTN_UP, UNetConfig


class UNet2DConditionModel(nn.Module):
    """Call:
      sample: ``[B, H, W, in_channels]`` noisy latents (NHWC).
      timesteps: scalar or ``[B]``, int or float.
      encoder_hidden_states: ``[B, T, cross_attention_dim]`` text tokens.
      added_cond: for ``addition_embed_type="text_time"`` (SDXL): ``{"text_embeds": [B, P],
        "time_ids": [B, 6]}`` (original size, crop top-left, target size).
      image_tokens: one ``[B, N_a, cross_attention_dim]`` array per IP-Adapter (projected image prompt);
        their weights and scales come from the ``ip_adapter`` / ``ip_scale`` variable collections.
    Returns ``[B, H, W, out_channels]``: the predicted noise (or v, per the scheduler).
    """

    config: UNetConfig
    dtype: jnp.dtype | None = None
    attention_implementation: str = "xla"
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        added_cond: Mapping[str, jax.Array] | None = None,
        image_tokens: Sequence[jax.Array] = (),
    ) -> jax.Array:
        cfg = self.config
        image_tokens = tuple(image_tokens)
        batch = sample.shape[0]
        dtype = self.dtype or sample.dtype
        options = BlockOptions(cfg.norm_num_groups, cfg.norm_eps, cfg.resnet_time_scale_shift,
                               cfg.use_linear_projection, cfg.upcast_attention, self.attention_implementation,
                               self.remat)

        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t_feat = timestep_features(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   freq_shift=cfg.freq_shift).astype(dtype)
        temb = TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name="time_embedding")(t_feat)
        if cfg.addition_embed_type == "text_time":
            temb = temb + self._text_time_embedding(added_cond, batch, dtype)

        x = sample.astype(dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv3x3(cfg.block_out_channels[0], "conv_in", self.dtype)(x)
        context = encoder_hidden_states.astype(dtype)

        skips = [x]
        n = len(cfg.block_out_channels)
        for i, kind in enumerate(cfg.down_block_types):
            x, block_skips = DownBlock(
                cfg.block_out_channels[i], cfg.layers_per_block[i], options,
                heads=cfg.num_heads[i] if kind == CROSS_ATTN_DOWN else None,
                transformer_layers=cfg.transformer_layers_per_block[i], add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding, dtype=self.dtype, name=f"down_blocks_{i}",
            )(x, temb, context, image_tokens)
            skips.extend(block_skips)

        if cfg.mid_block_type is not None:
            x = MidBlock(cfg.block_out_channels[-1], options,
                         heads=cfg.num_heads[-1] if cfg.mid_block_type == CROSS_ATTN_MID else None,
                         transformer_layers=cfg.transformer_layers_per_block[-1],
                         output_scale_factor=cfg.mid_block_scale_factor, dtype=self.dtype,
                         name="mid_block")(x, temb, context, image_tokens)

        reversed_channels = tuple(reversed(cfg.block_out_channels))
        reversed_heads = tuple(reversed(cfg.num_heads))
        reversed_layers = tuple(reversed(cfg.layers_per_block))
        for i, kind in enumerate(cfg.up_block_types):
            num_layers = reversed_layers[i] + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            is_final = i == n - 1
            x = UpBlock(
                reversed_channels[i], num_layers, options,
                heads=reversed_heads[i] if kind == CROSS_ATTN_UP else None,
                transformer_layers=cfg.up_transformer_layers[i], add_upsample=not is_final,
                dtype=self.dtype, name=f"up_blocks_{i}",
            )(x, block_skips, temb, context, image_tokens,
              upsample_size=None if is_final else skips[-1].shape[1:3])

        x = GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=self.dtype, name="conv_norm_out")(x)
        return conv3x3(cfg.out_channels, "conv_out", self.dtype)(nn.silu(x))

    def _text_time_embedding(self, added_cond, batch, dtype):
        cfg = self.config
        if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
            raise ValueError("this UNet (addition_embed_type='text_time') needs added_cond with "
                             "'text_embeds' and 'time_ids'")
        time_ids = added_cond["time_ids"]
        time_feat = timestep_features(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                      flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        add = jnp.concatenate([added_cond["text_embeds"].astype(jnp.float32), time_feat.reshape(batch, -1)], -1)
        return TimestepEmbedding(self.config.time_embed_dim, dtype=self.dtype, name="add_embedding")(add.astype(dtype))

    def init_params(self, rng: jax.Array, latent_size: int = 8, text_tokens: int = 77):
        """Random ``params`` for this config (for new models and shape checks; use with ``jax.eval_shape``
        to get shapes without allocating)."""
        return self.init(rng, *self.dummy_inputs(latent_size, text_tokens))["params"]

    def dummy_inputs(self, latent_size: int = 8, text_tokens: int = 77, batch: int = 1):
        cfg = self.config
        sample = jnp.zeros((batch, latent_size, latent_size, cfg.in_channels), jnp.float32)
        context = jnp.zeros((batch, text_tokens, cfg.cross_attention_dim), jnp.float32)
        added = None
        if cfg.addition_embed_type == "text_time":
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {"text_embeds": jnp.zeros((batch, text_dim), jnp.float32),
                     "time_ids": jnp.zeros((batch, 6), jnp.float32)}
        return sample, jnp.zeros((batch,), jnp.int32), context, added
