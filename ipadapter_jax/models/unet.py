"""The Stable Diffusion UNet (diffusers' ``UNet2DConditionModel``) with decoupled image cross-attention.

Inside the model everything is NHWC. Users who hold diffusers' NCHW latents convert at the edge
(``jnp.transpose(x, (0, 2, 3, 1))``); the pipeline does this for them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.group_norm import GroupNorm
from ipadapter_jax.models.resnet import conv3x3
from ipadapter_jax.models.unet_blocks import UpBlock
from ipadapter_jax.models.unet_config import CROSS_ATTN_UP, UNetConfig
from ipadapter_jax.models.unet_encoder import block_options, dummy_added_cond, embed_time, encode


class UNet2DConditionModel(nn.Module):
    """Call:
      sample: ``[B, H, W, in_channels]`` noisy latents (NHWC).
      timesteps: scalar or ``[B]``, int or float.
      encoder_hidden_states: ``[B, T, cross_attention_dim]`` text tokens.
      added_cond: for ``addition_embed_type="text_time"`` (SDXL): ``{"text_embeds": [B, P],
        "time_ids": [B, 6]}`` (original size, crop top-left, target size).
      image_tokens: one ``[B, N_a, cross_attention_dim]`` array per IP-Adapter (projected image prompt);
        their weights and scales come from the ``ip_adapter`` / ``ip_scale`` variable collections.
      down_block_additional_residuals, mid_block_additional_residual: a ControlNet's output (both or
        neither; ``ControlNetModel``): one NHWC array per skip connection, in diffusers'
        ``down_block_res_samples`` order, added to the skips the up path concatenates, and one added to the
        mid block's output (diffusers' semantics for these arguments).
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
        down_block_additional_residuals: Sequence[jax.Array] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        image_tokens = tuple(image_tokens)
        batch = sample.shape[0]
        dtype = self.dtype or sample.dtype
        options = block_options(cfg, self.attention_implementation, self.remat)
        temb = embed_time(cfg, timesteps, added_cond, batch, dtype, self.dtype)

        x = sample.astype(dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv3x3(cfg.block_out_channels[0], "conv_in", self.dtype)(x)
        context = encoder_hidden_states.astype(dtype)
        x, skips = encode(cfg, options, x, temb, context, image_tokens, self.dtype)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("down_block_additional_residuals and mid_block_additional_residual come together "
                             "(a ControlNet's two outputs): give both or neither")
        if down_block_additional_residuals is not None:
            skips = _add_residuals(skips, down_block_additional_residuals, "down_block_additional_residuals")
            (x,) = _add_residuals([x], [mid_block_additional_residual], "mid_block_additional_residual")

        n = len(cfg.block_out_channels)
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

    def init_params(self, rng: jax.Array, latent_size: int = 8, text_tokens: int = 77):
        """Random ``params`` for this config (for new models and shape checks; use with ``jax.eval_shape``
        to get shapes without allocating)."""
        return self.init(rng, *self.dummy_inputs(latent_size, text_tokens))["params"]

    def dummy_inputs(self, latent_size: int = 8, text_tokens: int = 77, batch: int = 1):
        cfg = self.config
        sample = jnp.zeros((batch, latent_size, latent_size, cfg.in_channels), jnp.float32)
        context = jnp.zeros((batch, text_tokens, cfg.cross_attention_dim), jnp.float32)
        return sample, jnp.zeros((batch,), jnp.int32), context, dummy_added_cond(cfg, batch)


def _add_residuals(states: list[jax.Array], residuals: Sequence[jax.Array], name: str) -> list[jax.Array]:
    residuals = list(residuals)
    if len(residuals) != len(states):
        raise ValueError(f"{name}: {len(residuals)} arrays for {len(states)} states of this UNet")
    for i, (s, r) in enumerate(zip(states, residuals)):
        # Broadcasting allowed, as in diffusers: a ControlNet with global_pool_conditions gives [B, 1, 1, C].
        if r.ndim != s.ndim or any(a not in (1, b) for a, b in zip(r.shape, s.shape)):
            raise ValueError(f"{name}[{i}]: shape {tuple(r.shape)} does not fit the UNet's state there, "
                             f"{tuple(s.shape)} (NHWC)")
    # In the compute dtype: an f32 residual would otherwise promote a bf16 UNet's up path to f32.
    return [s + r.astype(s.dtype) for s, r in zip(states, residuals)]
