"""Down, mid and up blocks of the SD UNet (diffusers' ``unet_2d_blocks``), with or without spatial
transformers. NHWC; ``image_tokens`` reach every cross-attention (see ``DecoupledCrossAttention``)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from ipadapter_jax.models.transformer import Transformer2D


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """What every block of one UNet shares."""

    groups: int
    eps: float
    time_scale_shift: str
    use_linear_projection: bool
    upcast_attention: bool
    attention_implementation: str = "xla"
    remat: bool = False


def _resnet(options: BlockOptions, channels: int, name: str, dtype, output_scale_factor: float = 1.0):
    cls = nn.remat(ResnetBlock2D) if options.remat else ResnetBlock2D
    return cls(channels, groups=options.groups, eps=options.eps, time_scale_shift=options.time_scale_shift,
               output_scale_factor=output_scale_factor, dtype=dtype, name=name)


def _transformer(options: BlockOptions, channels: int, heads: int, num_layers: int, name: str, dtype):
    return Transformer2D(heads, channels // heads, num_layers, options.groups, options.use_linear_projection,
                         options.upcast_attention, options.attention_implementation, options.remat,
                         dtype=dtype, name=name)


class DownBlock(nn.Module):
    """``num_layers`` resnets (each followed by a transformer when ``heads``), then an optional stride-2
    conv. Returns the output and every intermediate state the up path will concatenate."""

    out_channels: int
    num_layers: int
    options: BlockOptions
    heads: int | None = None
    transformer_layers: int = 1
    add_downsample: bool = True
    downsample_padding: int = 1
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, temb, context, image_tokens: Sequence[jax.Array] = ()):
        skips = []
        for j in range(self.num_layers):
            x = _resnet(self.options, self.out_channels, f"resnets_{j}", self.dtype)(x, temb)
            if self.heads:
                x = _transformer(self.options, self.out_channels, self.heads, self.transformer_layers,
                                 f"attentions_{j}", self.dtype)(x, context, image_tokens)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet, then (transformer, resnet) pairs; a plain mid block has no transformer."""

    channels: int
    options: BlockOptions
    heads: int | None = None
    transformer_layers: int = 1
    output_scale_factor: float = 1.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, temb, context, image_tokens: Sequence[jax.Array] = ()):
        resnet = lambda j: _resnet(  # noqa: E731
            self.options, self.channels, f"resnets_{j}", self.dtype, self.output_scale_factor
        )
        x = resnet(0)(x, temb)
        if self.heads:
            x = _transformer(self.options, self.channels, self.heads, self.transformer_layers, "attentions_0",
                             self.dtype)(x, context, image_tokens)
        return resnet(1)(x, temb)


class UpBlock(nn.Module):
    """Resnets over the concatenation of the running state and one skip each (last skip first), each
    followed by a transformer when ``heads``; then an optional upsample to ``upsample_size``."""

    out_channels: int
    num_layers: int
    options: BlockOptions
    heads: int | None = None
    transformer_layers: int = 1
    add_upsample: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, skips, temb, context, image_tokens: Sequence[jax.Array] = (), upsample_size=None):
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = _resnet(self.options, self.out_channels, f"resnets_{j}", self.dtype)(x, temb)
            if self.heads:
                x = _transformer(self.options, self.out_channels, self.heads, self.transformer_layers,
                                 f"attentions_{j}", self.dtype)(x, context, image_tokens)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
        return x
