"""The frozen CLIP encoders of Stable Diffusion and IP-Adapter, in Flax linen.

* ``CLIPTextModel`` / ``CLIPTextModelWithProjection``: the SD 1.5 text encoder and SDXL's second one.
* ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``: IP-Adapter's image encoders (ViT-H/14, ViT-bigG/14).

Module and parameter names follow transformers' state-dict names (``text_model.encoder.layers.0.self_attn.
q_proj.weight`` <-> ``("text_model", "encoder", "layers_0", "self_attn", "q_proj", "kernel")``) so that
``ipadapter_jax.weights.torch_layout.torch_to_flax`` maps a checkpoint without a renaming table. Position ids
are computed, never stored: checkpoints that carry the old ``position_ids`` buffer have it dropped by the
loader (``ipadapter_jax.weights.load_clip``).

Layouts: token sequences are ``[batch, tokens, hidden]``; images are NHWC ``[batch, height, width, channels]``
(use ``nchw_to_nhwc`` on transformers/diffusers ``pixel_values``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ipadapter_jax.models.attention import dot_product_attention, merge_heads, split_heads

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the exact erf form
}
# Configs written before transformers fixed CLIP's eos_token_id (PR #24773) carry 2, SD 1.5's and SDXL's
# included; for those transformers pools at the highest token id (EOS is the largest id of CLIP's vocabulary).
_LEGACY_EOS_TOKEN_ID = 2


def _sub_config(d: Mapping[str, Any], key: str, other_model_type: str, what: str) -> dict:
    """The flat config of one tower: a full ``CLIPConfig`` dict carries it under ``key``."""
    if key in d:
        sub = dict(d[key] or {})
        if "projection_dim" in d:  # CLIPModel's projections use the top-level size
            sub["projection_dim"] = d["projection_dim"]
        return sub
    if d.get("model_type") == other_model_type:
        raise ValueError(f"{what}: got a {other_model_type!r} config")
    return dict(d)


def _check_common(cfg: Any, what: str) -> None:
    if cfg.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"{what}: hidden_act {cfg.hidden_act!r} not supported; known: {sorted(_ACTIVATIONS)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{what}: hidden_size {cfg.hidden_size} is not a multiple of "
                         f"num_attention_heads {cfg.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class CLIPTextEncoderConfig:
    """transformers' ``CLIPTextConfig`` fields that shape the model (defaults are transformers' defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 49407

    def __post_init__(self):
        _check_common(self, "CLIP text config")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextEncoderConfig":
        """From a text encoder's ``config.json`` (flat) or a full ``CLIPConfig`` (its ``text_config``)."""
        sub = _sub_config(d, "text_config", "clip_vision_model", "CLIP text config")
        eos = sub.get("eos_token_id", cls.eos_token_id)
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"CLIP text config: one eos_token_id needed to pool, got {eos}")
            eos = eos[0]
        if eos is None:
            raise ValueError("CLIP text config: eos_token_id is null; the pooled output needs it")
        names = {f.name for f in dataclasses.fields(cls)} - {"eos_token_id"}
        return cls(**{k: sub[k] for k in names if sub.get(k) is not None}, eos_token_id=int(eos))


@dataclasses.dataclass(frozen=True)
class CLIPVisionEncoderConfig:
    """transformers' ``CLIPVisionConfig`` fields that shape the model (defaults are transformers' defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        _check_common(self, "CLIP vision config")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIP vision config: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionEncoderConfig":
        """From an image encoder's ``config.json`` (flat) or a full ``CLIPConfig`` (its ``vision_config``)."""
        sub = _sub_config(d, "vision_config", "clip_text_model", "CLIP vision config")
        for key in ("image_size", "patch_size"):
            value = sub.get(key)
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(f"CLIP vision config: only square {key} supported, got {value}")
                sub[key] = value[0]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: sub[k] for k in names if sub.get(k) is not None})


EncoderConfig = CLIPTextEncoderConfig | CLIPVisionEncoderConfig


@flax.struct.dataclass
class CLIPTextOutput:
    """``last_hidden_state`` ``[B, T, D]`` (after ``final_layer_norm``); ``pooler_output`` ``[B, D]`` (that state at
    the EOS token); ``hidden_states``: embeddings then each layer's output (``num_hidden_layers + 1`` arrays
    ``[B, T, D]``, the last one before ``final_layer_norm``) or None; ``text_embeds`` ``[B, projection_dim]``
    with projection, else None."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


@flax.struct.dataclass
class CLIPVisionOutput:
    """``last_hidden_state`` ``[B, 1 + patches, D]`` (no ``post_layernorm``); ``pooler_output`` ``[B, D]``
    (``post_layernorm`` of the CLS token); ``hidden_states``: ``pre_layrnorm``'d embeddings then each layer's
    output (``hidden_states[-2]`` is IP-Adapter Plus' penultimate features) or None; ``image_embeds``
    ``[B, projection_dim]`` with projection, else None."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    image_embeds: jax.Array | None = None


def nchw_to_nhwc(pixel_values: jax.Array) -> jax.Array:
    """transformers/diffusers ``pixel_values`` ``[B, C, H, W]`` -> our ``[B, H, W, C]``."""
    return jnp.transpose(jnp.asarray(pixel_values), (0, 2, 3, 1))


def clip_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                   key_padding_mask: jax.Array | None = None, implementation: str = "xla") -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v on ``[B, T, heads, head_dim]``, optionally causal and/or with a
    ``[B, T]`` key mask (1 = attend). Unmasked attention goes through the shared kernel seam; the masked
    case uses ``jax.nn.dot_product_attention``'s XLA path (softmax in float32 either way)."""
    if not causal and key_padding_mask is None:
        return dot_product_attention(q, k, v, implementation=implementation)
    mask = None if key_padding_mask is None else key_padding_mask.astype(bool)[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")


def _layer_norm(config: EncoderConfig, dtype: Any, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it: the one-pass form loses digits on large activations.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype, name=name)


class CLIPAttention(nn.Module):
    config: EncoderConfig
    dtype: Any = None
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool, key_padding_mask: jax.Array | None) -> jax.Array:
        heads, width = self.config.num_attention_heads, self.config.hidden_size
        q, k, v = (split_heads(nn.Dense(width, dtype=self.dtype, name=f"{n}_proj")(x), heads) for n in "qkv")
        out = clip_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                             implementation=self.implementation)
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(merge_heads(out))


class CLIPMLP(nn.Module):
    config: EncoderConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _ACTIVATIONS[cfg.hidden_act](nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

    config: EncoderConfig
    dtype: Any = None
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool, key_padding_mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        h = _layer_norm(cfg, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(cfg, self.dtype, self.implementation, name="self_attn")(h, causal, key_padding_mask)
        h = _layer_norm(cfg, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(cfg, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` blocks named ``layers_{i}``. Returns the last output and, if asked, the tuple
    (input, output of each layer)."""

    config: EncoderConfig
    dtype: Any = None
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, *, causal: bool = False, key_padding_mask: jax.Array | None = None,
                 output_hidden_states: bool = True) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            layer = CLIPEncoderLayer(self.config, self.dtype, self.implementation, name=f"layers_{i}")
            x = layer(x, causal, key_padding_mask)
            states.append(x)
        return x, tuple(states) if output_hidden_states else None


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """``[B]`` index of the token each sequence is pooled at: transformers' rule, the first ``eos_token_id``
    (pad may equal EOS, hence the first), or for legacy configs (``eos_token_id == 2``) the highest id."""
    if eos_token_id == _LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextEncoderConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        tokens = input_ids.shape[-1]
        if tokens > cfg.max_position_embeddings:
            raise ValueError(f"CLIP text encoder: {tokens} tokens, at most {cfg.max_position_embeddings}")
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        positions = embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(tokens)[None])
        return embed(cfg.vocab_size, "token_embedding")(input_ids) + positions


class CLIPTextTransformer(nn.Module):
    """The body transformers keeps under ``text_model``: embeddings, causal encoder, ``final_layer_norm``."""

    config: CLIPTextEncoderConfig
    dtype: Any = None
    implementation: str = "xla"

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 output_hidden_states: bool = True) -> CLIPTextOutput:
        cfg = self.config
        x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        x, states = CLIPEncoder(cfg, self.dtype, self.implementation, name="encoder")(
            x, causal=True, key_padding_mask=attention_mask, output_hidden_states=output_hidden_states)
        x = _layer_norm(cfg, self.dtype, "final_layer_norm")(x)
        pooled = x[jnp.arange(x.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]
        return CLIPTextOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=states)


class CLIPTextModel(nn.Module):
    """transformers' ``CLIPTextModel`` (SD 1.5's text encoder).

    Call: ``input_ids`` int ``[B, T]`` (T <= max_position_embeddings), optional ``attention_mask`` ``[B, T]``
    (1 = real token; SD pipelines pass none) -> ``CLIPTextOutput`` (``text_embeds`` None).
    ``dtype`` is the compute dtype (None: that of the params).
    """

    config: CLIPTextEncoderConfig
    dtype: Any = None
    implementation: str = "xla"

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 output_hidden_states: bool = True) -> CLIPTextOutput:
        return CLIPTextTransformer(self.config, self.dtype, self.implementation, name="text_model")(
            input_ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(nn.Module):
    """transformers' ``CLIPTextModelWithProjection`` (SDXL's second text encoder): ``CLIPTextModel`` plus
    ``text_projection`` (no bias) of the pooled output into ``text_embeds`` ``[B, projection_dim]``."""

    config: CLIPTextEncoderConfig
    dtype: Any = None
    implementation: str = "xla"

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 output_hidden_states: bool = True) -> CLIPTextOutput:
        out = CLIPTextTransformer(self.config, self.dtype, self.implementation, name="text_model")(
            input_ids, attention_mask, output_hidden_states)
        embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                          name="text_projection")(out.pooler_output)
        return out.replace(text_embeds=embeds)


class CLIPVisionEmbeddings(nn.Module):
    """Patch embedding (a stride-``patch_size`` conv, no bias) with a learned CLS token in front, plus learned
    position embeddings. ``[B, H, W, C]`` -> ``[B, 1 + (H/patch)*(W/patch), D]``, patches in row-major order."""

    config: CLIPVisionEncoderConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        batch, height, width, channels = pixel_values.shape
        if (height, width, channels) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"CLIP image encoder: pixel_values {pixel_values.shape} must be NHWC [B, {cfg.image_size}, "
                f"{cfg.image_size}, {cfg.num_channels}] (use nchw_to_nhwc on transformers' [B, C, H, W])")
        p = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, name="patch_embedding")(pixel_values)
        patches = patches.reshape(batch, -1, cfg.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(cfg.hidden_size**-0.5), (cfg.hidden_size,))
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (batch, 1, cfg.hidden_size))
        positions = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype, name="position_embedding")(
            jnp.arange(cfg.num_positions)[None])
        return jnp.concatenate([cls, patches], axis=1) + positions


class CLIPVisionTransformer(nn.Module):
    """The body transformers keeps under ``vision_model``: embeddings, ``pre_layrnorm`` (transformers'
    spelling), encoder, ``post_layernorm`` of the CLS token."""

    config: CLIPVisionEncoderConfig
    dtype: Any = None
    implementation: str = "xla"

    @nn.compact
    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = True) -> CLIPVisionOutput:
        cfg = self.config
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = _layer_norm(cfg, self.dtype, "pre_layrnorm")(x)
        x, states = CLIPEncoder(cfg, self.dtype, self.implementation, name="encoder")(
            x, output_hidden_states=output_hidden_states)
        pooled = _layer_norm(cfg, self.dtype, "post_layernorm")(x[:, 0])
        return CLIPVisionOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=states)


class CLIPVisionModel(nn.Module):
    """transformers' ``CLIPVisionModel``. Call: ``pixel_values`` NHWC ``[B, image_size, image_size, C]``,
    CLIP-normalised -> ``CLIPVisionOutput`` (``image_embeds`` None). ``dtype``: compute dtype."""

    config: CLIPVisionEncoderConfig
    dtype: Any = None
    implementation: str = "xla"

    @nn.compact
    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = True) -> CLIPVisionOutput:
        return CLIPVisionTransformer(self.config, self.dtype, self.implementation, name="vision_model")(
            pixel_values, output_hidden_states)


class CLIPVisionModelWithProjection(nn.Module):
    """transformers' ``CLIPVisionModelWithProjection`` (IP-Adapter's image encoder): ``CLIPVisionModel`` plus
    ``visual_projection`` (no bias) of the pooled output into ``image_embeds`` ``[B, projection_dim]``.
    Call: ``pixel_values`` NHWC ``[B, image_size, image_size, C]`` -> ``CLIPVisionOutput``."""

    config: CLIPVisionEncoderConfig
    dtype: Any = None
    implementation: str = "xla"

    @nn.compact
    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = True) -> CLIPVisionOutput:
        out = CLIPVisionTransformer(self.config, self.dtype, self.implementation, name="vision_model")(
            pixel_values, output_hidden_states)
        embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                          name="visual_projection")(out.pooler_output)
        return out.replace(image_embeds=embeds)
