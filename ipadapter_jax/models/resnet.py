"""Residual conv blocks and resamplers shared by the UNet and the VAE (diffusers' ``resnet.py``).

All tensors are NHWC: ``[batch, height, width, channels]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.conv import Conv2D
from ipadapter_jax.models.group_norm import GroupNorm


def conv3x3(features: int, name: str, dtype=None, stride: int = 1, padding=((1, 1), (1, 1))) -> Conv2D:
    # Conv2D rather than nn.Conv: same params, but no XLA slow path on maps smaller than 3x3 (see conv.py).
    return Conv2D(features, (3, 3), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice with an optional time embedding and a 1x1 shortcut when widths differ.

    Call: ``x [B, H, W, C_in]``, ``temb [B, T]`` or None -> ``[B, H, W, out_channels]``.
    ``time_scale_shift``: "default" adds the projected embedding before ``norm2``; "scale_shift" applies
    ``norm2(h) * (1 + scale) + shift``.
    """

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    time_scale_shift: str = "default"
    output_scale_factor: float = 1.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
        h = conv3x3(self.out_channels, "conv1", self.dtype)(nn.silu(h))
        scale_shift = None
        if temb is not None:
            proj_width = self.out_channels * (2 if self.time_scale_shift == "scale_shift" else 1)
            t = nn.Dense(proj_width, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
            if self.time_scale_shift == "scale_shift":
                scale_shift = jnp.split(t, 2, axis=-1)
            else:
                h = h + t
        h = GroupNorm(self.groups_out or self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h)
        if scale_shift is not None:
            h = h * (1 + scale_shift[0]) + scale_shift[1]
        h = conv3x3(self.out_channels, "conv2", self.dtype)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            # Conv2D for its input gradient (conv.py), which training goes through.
            x = Conv2D(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=1`` pads both sides (UNet); ``padding=0`` pads right/bottom only (VAE)."""

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((self.padding, self.padding),) * 2 if self.padding else ((0, 1), (0, 1))
        return conv3x3(self.out_channels, "conv", self.dtype, stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to ``size``) then a 3x3 conv."""

    out_channels: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        b, h, w, c = x.shape
        th, tw = size or (2 * h, 2 * w)
        if (th, tw) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            # torch 'nearest' picks floor(i * in / out); jax.image's nearest rounds half-pixel centres.
            rows = (jnp.arange(th) * h) // th
            cols = (jnp.arange(tw) * w) // tw
            x = x[:, rows][:, :, cols]
        return conv3x3(self.out_channels, "conv", self.dtype)(x)
