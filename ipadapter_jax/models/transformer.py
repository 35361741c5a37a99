"""The spatial transformer of SD UNets (diffusers' ``Transformer2DModel`` with ``BasicTransformerBlock``)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.attention import MultiHeadAttention
from ipadapter_jax.models.conv import Conv2D
from ipadapter_jax.models.decoupled_cross_attention import DecoupledCrossAttention
from ipadapter_jax.models.group_norm import GroupNorm


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU, ``x * (1 + erf(x / sqrt(2))) / 2``, the formula torch uses. ``nn.gelu(approximate=False)``
    computes the same through ``erfc``, which XLA:CPU expands into code 2.4x slower than ``erf``'s (it was 10%
    of a UNet forward); the two agree to 1e-6, and differ only in relative precision far in the negative
    tail, where both are ~0."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0 ** -0.5)))


class GEGLU(nn.Module):
    """``proj`` to twice the width, then ``value * gelu(gate)`` (exact GELU, as diffusers)."""

    features: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return value * gelu_erf(gate)


class GEGLUFeedForward(nn.Module):
    """``net_0`` (GEGLU to ``mult * dim``) -> ``net_2`` (back to ``dim``)."""

    mult: int = 4
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, decoupled cross-attention, GEGLU MLP; pre-LayerNorm residuals.

    Call: ``x [B, T, dim]``, ``context [B, Tt, context_dim]``, ``image_tokens`` (see
    ``DecoupledCrossAttention``) -> ``[B, T, dim]``.
    """

    heads: int
    head_dim: int
    upcast_attention: bool = False
    attention_implementation: str = "xla"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, context, image_tokens: Sequence[jax.Array] = ()):
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        x = x + MultiHeadAttention(self.heads, self.head_dim, upcast=self.upcast_attention,
                                   implementation=self.attention_implementation, dtype=self.dtype,
                                   name="attn1")(norm("norm1")(x))
        x = x + DecoupledCrossAttention(self.heads, self.head_dim, upcast=self.upcast_attention,
                                        implementation=self.attention_implementation, dtype=self.dtype,
                                        name="attn2")(norm("norm2")(x), context, image_tokens)
        return x + GEGLUFeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2D(nn.Module):
    """GroupNorm, ``proj_in`` (1x1 conv, or Dense with ``use_linear_projection``), ``num_layers``
    transformer blocks, ``proj_out``, plus the input. Call: ``x [B, H, W, C]`` -> ``[B, H, W, C]``."""

    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_implementation: str = "xla"
    remat_blocks: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, context, image_tokens: Sequence[jax.Array] = ()):
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        y = GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        if self.use_linear_projection:
            y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
        else:
            # Conv2D (same params as nn.Conv) for its input gradient, which training goes through (conv.py).
            y = Conv2D(inner, (1, 1), dtype=self.dtype, name="proj_in")(y).reshape(b, h * w, inner)
        block_cls = nn.remat(BasicTransformerBlock) if self.remat_blocks else BasicTransformerBlock
        for i in range(self.num_layers):
            y = block_cls(self.heads, self.head_dim, self.upcast_attention, self.attention_implementation,
                          dtype=self.dtype, name=f"transformer_blocks_{i}")(y, context, tuple(image_tokens))
        if self.use_linear_projection:
            y = nn.Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
        else:
            y = Conv2D(c, (1, 1), dtype=self.dtype, name="proj_out")(y.reshape(b, h, w, inner))
        return y + x
