"""Image projection nets: CLIP image features -> tokens of the UNet's cross-attention width.

Parameter names mirror the published IP-Adapter files (``image_proj.*``) so that reading and writing them
is a mechanical rename (see ``weights/ip_adapter_file.py``); that is why the Resampler's feed-forward parts
are called ``layers_{i}_1_{0,1,3}`` (PyTorch ``nn.Sequential`` indices).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.attention import dot_product_attention, merge_heads, split_heads

PLAIN, PLUS, FULL = "plain", "plus", "full"


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    """What the projection net is and its sizes.

    variant: "plain" (``ImageProjModel``: Linear + LayerNorm on the pooled ``image_embeds``), "plus"
      (``Resampler``: a perceiver over the encoder's penultimate hidden states) or "full" (``MLPProjModel``,
      the full-face adapter: an MLP over every penultimate hidden state).
    embed_dim: width of the input features (projection_dim for plain, the encoder's hidden size otherwise).
    cross_attention_dim: width of the output tokens (the UNet's ``cross_attention_dim``).
    num_tokens: output tokens (plain: 4; plus: the number of learned queries; full: the input token count).
    hidden_dim, depth, heads, dim_head, ff_mult: the Resampler's sizes.
    """

    variant: str = PLAIN
    embed_dim: int = 1024
    cross_attention_dim: int = 768
    num_tokens: int = 4
    hidden_dim: int = 768
    depth: int = 4
    heads: int = 12
    dim_head: int = 64
    ff_mult: int = 4

    def __post_init__(self):
        if self.variant not in (PLAIN, PLUS, FULL):
            raise ValueError(f"unknown IP-Adapter variant {self.variant!r} (plain, plus, full)")

    @property
    def uses_hidden_states(self) -> bool:
        """Whether the input is the image encoder's penultimate hidden states (else its ``image_embeds``)."""
        return self.variant != PLAIN


class ImageProjModel(nn.Module):
    """``[B, embed_dim]`` -> ``[B, num_tokens, cross_attention_dim]``: one Linear, reshape, LayerNorm."""

    config: ProjectionConfig

    @nn.compact
    def __call__(self, embeds: jax.Array) -> jax.Array:
        c = self.config
        tokens = nn.Dense(c.num_tokens * c.cross_attention_dim, name="proj")(embeds)
        tokens = tokens.reshape(embeds.shape[0], c.num_tokens, c.cross_attention_dim)
        return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm")(tokens)


class MLPProjModel(nn.Module):
    """Full-face: ``[B, T, embed_dim]`` -> ``[B, T, cross_attention_dim]`` (Linear, GELU, Linear, LayerNorm)."""

    config: ProjectionConfig

    @nn.compact
    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        c = self.config
        h = nn.gelu(nn.Dense(c.embed_dim, name="proj_0")(hidden_states), approximate=False)
        h = nn.Dense(c.cross_attention_dim, name="proj_2")(h)
        return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="proj_3")(h)


class PerceiverAttention(nn.Module):
    """Latents attend to ``[image features; latents]`` (keys and values from one ``to_kv``)."""

    heads: int
    dim_head: int

    @nn.compact
    def __call__(self, features: jax.Array, latents: jax.Array) -> jax.Array:
        features = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm1")(features)
        latents = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm2")(latents)
        inner = self.heads * self.dim_head
        q = split_heads(nn.Dense(inner, use_bias=False, name="to_q")(latents), self.heads)
        kv = nn.Dense(2 * inner, use_bias=False, name="to_kv")(jnp.concatenate([features, latents], axis=1))
        k, v = (split_heads(t, self.heads) for t in jnp.split(kv, 2, axis=-1))
        out = merge_heads(dot_product_attention(q, k, v, implementation="einsum"))
        return nn.Dense(latents.shape[-1], use_bias=False, name="to_out")(out)


class Resampler(nn.Module):
    """IP-Adapter Plus: ``[B, T, embed_dim]`` hidden states -> ``[B, num_tokens, cross_attention_dim]``."""

    config: ProjectionConfig

    @nn.compact
    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        c = self.config
        latents = self.param("latents", lambda key: jax.random.normal(key, (1, c.num_tokens, c.hidden_dim))
                             / c.hidden_dim**0.5)
        latents = jnp.broadcast_to(latents, (hidden_states.shape[0], *latents.shape[1:]))
        features = nn.Dense(c.hidden_dim, name="proj_in")(hidden_states)
        for i in range(c.depth):
            latents = latents + PerceiverAttention(c.heads, c.dim_head, name=f"layers_{i}_0")(features, latents)
            h = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=f"layers_{i}_1_0")(latents)
            h = nn.gelu(nn.Dense(c.ff_mult * c.hidden_dim, use_bias=False, name=f"layers_{i}_1_1")(h),
                        approximate=False)
            latents = latents + nn.Dense(c.hidden_dim, use_bias=False, name=f"layers_{i}_1_3")(h)
        return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm_out")(nn.Dense(c.cross_attention_dim, name="proj_out")(latents))


def projection_module(config: ProjectionConfig) -> nn.Module:
    return {PLAIN: ImageProjModel, PLUS: Resampler, FULL: MLPProjModel}[config.variant](config)


def dummy_projection_input(config: ProjectionConfig, batch: int = 1, tokens: int = 257) -> jax.Array:
    if config.variant == PLAIN:
        return jnp.zeros((batch, config.embed_dim), jnp.float32)
    return jnp.zeros((batch, config.num_tokens if config.variant == FULL else tokens, config.embed_dim), jnp.float32)
