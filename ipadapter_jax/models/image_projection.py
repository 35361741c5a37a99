"""Image projection nets: CLIP image features (or face embeddings) -> tokens of the UNet's cross-attention
width.

Parameter names mirror the published IP-Adapter files (``image_proj.*``) so that reading and writing them
is a mechanical rename (see ``weights/ip_adapter_file.py``); that is why the Resampler's feed-forward parts
are called ``layers_{i}_1_{0,1,3}`` (PyTorch ``nn.Sequential`` indices).

The FaceID family (h94/IP-Adapter-FaceID, tencent-ailab's ``ip_adapter_faceid.py``) projects a face
recognition embedding (insightface ``buffalo_l`` ArcFace, 512-d, L2-normalised) instead of a CLIP embedding:
  - FaceID / FaceID SDXL / FaceID-Portrait (``MLPProjModel``; diffusers ``IPAdapterFaceIDImageProjection``):
    Linear, GELU, Linear to ``num_tokens * C``, LayerNorm per token. Portrait is the same net with 16 tokens
    and no LoRA, given several faces: ``[B, n, 512]`` -> ``[B, n * 16, C]``.
  - FaceID-Plus / PlusV2 (``ProjPlusModel``; diffusers ``IPAdapterFaceIDPlusImageProjection``): the same MLP
    gives 4 id tokens, which are the latents of a perceiver (``perceiver_resampler``, no learned latents)
    over the CLIP penultimate hidden states of the face crop. PlusV2 adds the id tokens back:
    ``id + shortcut_scale * perceiver(...)`` (h94's ``shortcut=True, s_scale``). Plus and PlusV2 files
    hold the same tensors; only the way they are run differs.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.attention import dot_product_attention, merge_heads, split_heads

PLAIN, PLUS, FULL = "plain", "plus", "full"
FACEID, FACEID_PLUS = "faceid", "faceid_plus"
VARIANTS = (PLAIN, PLUS, FULL, FACEID, FACEID_PLUS)


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    """What the projection net is and its sizes.

    variant: "plain" (``ImageProjModel``: Linear + LayerNorm on the pooled ``image_embeds``), "plus"
      (``Resampler``: a perceiver over the encoder's penultimate hidden states), "full" (``MLPProjModel``,
      the full-face adapter: an MLP over every penultimate hidden state), "faceid" (face embedding -> tokens
      by an MLP) or "faceid_plus" (face embedding + the face crop's hidden states; see the module docstring).
    embed_dim: width of the input features (projection_dim for plain, the encoder's hidden size for plus and
      full, the face embedding's width for the FaceID variants).
    cross_attention_dim: width of the output tokens (the UNet's ``cross_attention_dim``).
    num_tokens: output tokens (plain: 4; plus: the number of learned queries; full: the input token count;
      FaceID: tokens per face, 4, or 16 for Portrait).
    hidden_dim, depth, heads, dim_head, ff_mult: the Resampler's sizes (FaceID-Plus: its face perceiver's,
      whose width ``hidden_dim`` is also the id tokens' width).
    id_hidden_dim: FaceID variants: the face-embedding MLP's inner width (published: 2 * embed_dim).
    clip_dim: FaceID-Plus: the width of the CLIP hidden states it reads (the image encoder's hidden size).
    shortcut: FaceID-Plus: run as PlusV2 (id tokens + scale * perceiver output) unless told otherwise.
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
    id_hidden_dim: int = 0
    clip_dim: int = 0
    shortcut: bool = False

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown IP-Adapter variant {self.variant!r} ({', '.join(VARIANTS)})")

    @property
    def uses_hidden_states(self) -> bool:
        """Whether the input is (or, for FaceID-Plus, includes) the image encoder's penultimate hidden states
        (else its ``image_embeds``, or no image at all for FaceID)."""
        return self.variant not in (PLAIN, FACEID)

    @property
    def uses_face_embeds(self) -> bool:
        """Whether the input is (or includes) face recognition embeddings: the FaceID variants."""
        return self.variant in (FACEID, FACEID_PLUS)


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


def _perceive(c: ProjectionConfig, latents: jax.Array, hidden_states: jax.Array) -> jax.Array:
    """The perceiver body shared by the Resampler and FaceID-Plus's face perceiver: ``proj_in``, ``depth``
    (attention, feed-forward) residual layers, ``proj_out``, ``norm_out``. Called inside a module's compact
    ``__call__``, so the layers become that module's own parameters (the published names)."""
    features = nn.Dense(c.hidden_dim, name="proj_in")(hidden_states)
    for i in range(c.depth):
        latents = latents + PerceiverAttention(c.heads, c.dim_head, name=f"layers_{i}_0")(features, latents)
        h = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=f"layers_{i}_1_0")(latents)
        h = nn.gelu(nn.Dense(c.ff_mult * c.hidden_dim, use_bias=False, name=f"layers_{i}_1_1")(h),
                    approximate=False)
        latents = latents + nn.Dense(c.hidden_dim, use_bias=False, name=f"layers_{i}_1_3")(h)
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm_out")(
        nn.Dense(c.cross_attention_dim, name="proj_out")(latents))


class Resampler(nn.Module):
    """IP-Adapter Plus: ``[B, T, embed_dim]`` hidden states -> ``[B, num_tokens, cross_attention_dim]``."""

    config: ProjectionConfig

    @nn.compact
    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        c = self.config
        latents = self.param("latents", lambda key: jax.random.normal(key, (1, c.num_tokens, c.hidden_dim))
                             / c.hidden_dim**0.5)
        latents = jnp.broadcast_to(latents, (hidden_states.shape[0], *latents.shape[1:]))
        return _perceive(c, latents, hidden_states)


def _face_id_tokens(c: ProjectionConfig, face_embeds: jax.Array, width: int) -> jax.Array:
    """``[M, embed_dim]`` -> ``[M, num_tokens, width]``: ``proj_0``, exact GELU, ``proj_2``, LayerNorm ``norm``."""
    h = nn.gelu(nn.Dense(c.id_hidden_dim, name="proj_0")(face_embeds), approximate=False)
    h = nn.Dense(c.num_tokens * width, name="proj_2")(h).reshape(face_embeds.shape[0], c.num_tokens, width)
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm")(h)


def _faces_flat(face_embeds: jax.Array, embed_dim: int) -> tuple[jax.Array, int]:
    """``[B, E]`` or ``[B, n, E]`` -> ``([B * n, E], n)``."""
    if face_embeds.ndim not in (2, 3) or face_embeds.shape[-1] != embed_dim:
        raise ValueError(f"face embeddings must be [batch, {embed_dim}] or [batch, faces, {embed_dim}], got "
                         f"{tuple(face_embeds.shape)}")
    faces = 1 if face_embeds.ndim == 2 else face_embeds.shape[1]
    return face_embeds.reshape(-1, embed_dim), faces


class FaceIDProjModel(nn.Module):
    """FaceID: face embeddings ``[B, embed_dim]`` or ``[B, n, embed_dim]`` (several faces: Portrait) ->
    ``[B, n * num_tokens, cross_attention_dim]`` (each face's tokens in turn, as h94 and diffusers order them)."""

    config: ProjectionConfig

    @nn.compact
    def __call__(self, face_embeds: jax.Array) -> jax.Array:
        c = self.config
        flat, faces = _faces_flat(face_embeds, c.embed_dim)
        tokens = _face_id_tokens(c, flat, c.cross_attention_dim)
        return tokens.reshape(-1, faces * c.num_tokens, c.cross_attention_dim)


class FacePerceiver(nn.Module):
    """FaceID-Plus's ``perceiver_resampler``: the Resampler's body with the id tokens as its latents."""

    config: ProjectionConfig

    @nn.compact
    def __call__(self, latents: jax.Array, hidden_states: jax.Array) -> jax.Array:
        return _perceive(self.config, latents, hidden_states)


class FaceIDPlusProjModel(nn.Module):
    """FaceID-Plus / PlusV2. Call with ``(face_embeds, clip_hidden)``: ``[B, embed_dim]`` and the face crop's
    penultimate CLIP hidden states ``[B, T, clip_dim]``, or ``[B, n, embed_dim]`` and ``[B, n, T, clip_dim]``
    -> ``[B, n * num_tokens, cross_attention_dim]``.

    shortcut_scale: None runs the file as it was trained (PlusV2: id tokens + 1.0 * perceiver output, Plus:
    the perceiver output alone); a number (may be traced, so changing it never recompiles) adds the id
    tokens with that weight on the structure tokens (h94's ``s_scale``, diffusers' ``shortcut_scale``).
    """

    config: ProjectionConfig

    @nn.compact
    def __call__(self, features: tuple[jax.Array, jax.Array], shortcut_scale=None) -> jax.Array:
        c = self.config
        face_embeds, clip_hidden = features
        flat, faces = _faces_flat(face_embeds, c.embed_dim)
        clip_hidden = clip_hidden.reshape(-1, *clip_hidden.shape[-2:])
        if clip_hidden.shape[0] != flat.shape[0] or clip_hidden.shape[-1] != c.clip_dim:
            raise ValueError(f"FaceID-Plus takes one [tokens, {c.clip_dim}] CLIP hidden state per face: got "
                             f"{tuple(clip_hidden.shape)} for {flat.shape[0]} faces")
        ids = _face_id_tokens(c, flat, c.hidden_dim)
        out = FacePerceiver(c, name="perceiver_resampler")(ids, clip_hidden)
        if shortcut_scale is None and c.shortcut:
            shortcut_scale = 1.0
        if shortcut_scale is not None:
            out = ids + jnp.asarray(shortcut_scale, out.dtype) * out
        return out.reshape(-1, faces * c.num_tokens, c.cross_attention_dim)


def projection_module(config: ProjectionConfig) -> nn.Module:
    return {PLAIN: ImageProjModel, PLUS: Resampler, FULL: MLPProjModel, FACEID: FaceIDProjModel,
            FACEID_PLUS: FaceIDPlusProjModel}[config.variant](config)


def dummy_projection_input(config: ProjectionConfig, batch: int = 1, tokens: int = 257):
    """Zeros of the input ``config``'s net takes (a ``(face_embeds, clip_hidden)`` pair for FaceID-Plus)."""
    if config.variant in (PLAIN, FACEID):
        return jnp.zeros((batch, config.embed_dim), jnp.float32)
    if config.variant == FACEID_PLUS:
        return (jnp.zeros((batch, config.embed_dim), jnp.float32),
                jnp.zeros((batch, tokens, config.clip_dim), jnp.float32))
    return jnp.zeros((batch, config.num_tokens if config.variant == FULL else tokens, config.embed_dim), jnp.float32)
