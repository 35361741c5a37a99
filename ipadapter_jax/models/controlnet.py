"""ControlNet (arXiv 2302.05543; diffusers' ``ControlNetModel``) for SD1.5 and SDXL UNets.

A trainable copy of the UNet's encoder half (``models/unet_encoder.py``, the same layers under the same
names) reads the noisy latents plus an embedded control image (edges, depth, pose, ...), and 1x1 "zero
convolutions" turn each of its skip states and its mid-block output into residuals that the frozen UNet adds
to its own (``UNet2DConditionModel(..., down_block_additional_residuals=, mid_block_additional_residual=)``).

Its cross-attention sees the text tokens only: diffusers loads IP-Adapter weights into the UNet alone and its
ControlNet pipelines call the ControlNet with ``encoder_hidden_states`` (and SDXL's text-time inputs), never
with image embeddings, so the image prompt (and a FaceID adapter's LoRA, which diffusers puts on the UNet
alone) reaches the result through the UNet only: apply the ControlNet with ``{"params": ...}`` and no
``ip_adapter`` / ``ip_scale`` collections. NHWC inside.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models.conv import Conv2D
from ipadapter_jax.models.resnet import conv3x3
from ipadapter_jax.models.unet_config import UNetConfig, UNetEncoderConfig, encoder_fields_from_diffusers
from ipadapter_jax.models.unet_encoder import block_options, dummy_added_cond, embed_time, encode

CHANNEL_ORDERS = ("rgb", "bgr")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetEncoderConfig):
    """The encoder half's hyperparameters (shared with the UNet) and the control image's own.

    conditioning_embedding_out_channels: widths of the control-image embedding's conv stages; each stage
      after the first halves the resolution, so the control image is ``2**(len - 1)`` times the latents
      (8 for published ControlNets, the VAE's factor).
    conditioning_channel_order: "bgr" flips the control image's channels first (old ControlNets).
    global_pool_conditions: residuals are averaged over space (``[B, 1, 1, C]``; shuffle-style ControlNets).
    """

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "ControlNetConfig":
        """Build from a diffusers ``ControlNetModel`` config dict; unknown keys are ignored, options this
        implementation (or diffusers' ControlNet) does not build are rejected by name."""
        fields = encoder_fields_from_diffusers(config, "controlnet")
        if isinstance(config.get("layers_per_block", 2), (list, tuple)):
            raise ValueError("controlnet config: per-block layers_per_block is not supported (diffusers' "
                             "ControlNetModel takes one int)")
        cond_channels = config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        if not isinstance(cond_channels, (list, tuple)) or not cond_channels:
            raise ValueError(f"controlnet config: conditioning_embedding_out_channels must be a non-empty list, "
                             f"got {cond_channels!r}")
        out = cls(
            **fields,
            conditioning_channels=config.get("conditioning_channels", 3),
            conditioning_embedding_out_channels=tuple(cond_channels),
            conditioning_channel_order=config.get("controlnet_conditioning_channel_order", "rgb"),
            global_pool_conditions=bool(config.get("global_pool_conditions", False)),
        )
        out.validate()
        return out

    @classmethod
    def from_unet(cls, unet: UNetConfig, **options: Any) -> "ControlNetConfig":
        """The ControlNet of a UNet (diffusers' ``ControlNetModel.from_unet``): its encoder half's values,
        plus ``options`` (the four fields above)."""
        if unet.time_embedding_dim not in (None, 4 * unet.block_out_channels[0]):
            raise ValueError(f"controlnet config: a ControlNet's time embedding is 4 x block_out_channels[0]; "
                             f"this UNet's is {unet.time_embedding_dim}")
        shared = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetEncoderConfig)}
        out = cls(**{**shared, "time_embedding_dim": None}, **options)
        out.validate()
        return out

    def validate(self) -> None:
        self._validate_encoder("controlnet")
        if self.mid_block_type is None:
            raise ValueError("controlnet config: mid_block_type None is not supported (diffusers' "
                             "ControlNetModel needs a mid block)")
        if len(set(self.layers_per_block)) != 1:
            raise ValueError(f"controlnet config: layers_per_block {self.layers_per_block} differs per block")
        if self.conditioning_channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"controlnet config: controlnet_conditioning_channel_order="
                             f"{self.conditioning_channel_order!r} (one of {CHANNEL_ORDERS})")
        if self.conditioning_channels < 1:
            raise ValueError(f"controlnet config: conditioning_channels={self.conditioning_channels}")

    @property
    def control_image_factor(self) -> int:
        """How many times larger than the latents the control image is, per side."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``ControlNetModel`` config dict of this model (``from_diffusers``' inverse)."""
        return {
            "_class_name": "ControlNetModel",
            "in_channels": self.in_channels, "conditioning_channels": self.conditioning_channels,
            "flip_sin_to_cos": self.flip_sin_to_cos, "freq_shift": self.freq_shift,
            "down_block_types": list(self.down_block_types), "mid_block_type": self.mid_block_type,
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block[0],
            "downsample_padding": self.downsample_padding, "mid_block_scale_factor": self.mid_block_scale_factor,
            "act_fn": "silu", "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps,
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "attention_head_dim": list(self.num_heads), "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention, "resnet_time_scale_shift": self.resnet_time_scale_shift,
            "addition_embed_type": self.addition_embed_type, "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "controlnet_conditioning_channel_order": self.conditioning_channel_order,
            "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
            "global_pool_conditions": self.global_pool_conditions,
        }


class ControlNetOutput(NamedTuple):
    """NHWC residuals for ``UNet2DConditionModel``: one per UNet skip state (diffusers'
    ``down_block_res_samples`` order), and one for the mid block's output."""

    down_block_residuals: tuple[jax.Array, ...]
    mid_block_residual: jax.Array


class ControlNetConditioningEmbedding(nn.Module):
    """The control image ``[B, H, W, C]`` -> ``[B, H / 2**(n-1), W / 2**(n-1), out_channels]``: conv_in, then
    per stage a conv and a stride-2 conv to the next width (SiLU after each), then ``conv_out`` (zero at
    initialisation in diffusers)."""

    channels: tuple[int, ...]
    out_channels: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(conv3x3(self.channels[0], "conv_in", self.dtype)(x))
        for i in range(len(self.channels) - 1):
            x = nn.silu(conv3x3(self.channels[i], f"blocks_{2 * i}", self.dtype)(x))
            x = nn.silu(conv3x3(self.channels[i + 1], f"blocks_{2 * i + 1}", self.dtype, stride=2)(x))
        return conv3x3(self.out_channels, "conv_out", self.dtype)(x)


def guess_mode_scales(num_residuals: int) -> np.ndarray:
    """diffusers' guess-mode weights: ``logspace(-1, 0, n)`` (0.1 for the first, shallowest skip up to 1 for
    the mid block), float32."""
    return (10.0 ** np.linspace(-1.0, 0.0, num_residuals)).astype(np.float32)


class ControlNetModel(nn.Module):
    """Call:
      sample: ``[B, H, W, in_channels]`` noisy latents (NHWC), as given to the UNet.
      timesteps: scalar or ``[B]``.
      encoder_hidden_states: ``[B, T, cross_attention_dim]`` text tokens (no image-prompt tokens; module doc).
      controlnet_cond: ``[B, H * f, W * f, conditioning_channels]`` control image in [0, 1], RGB, with
        ``f = config.control_image_factor``.
      conditioning_scale: scalar multiplying every residual (data: changing it does not recompile).
      added_cond: SDXL's ``{"text_embeds", "time_ids"}``, as for the UNet.
      guess_mode: (static) weight the residuals by ``guess_mode_scales`` too, from 0.1 at the shallowest skip
        to 1 at the mid block (ignored with ``global_pool_conditions``, as in diffusers).
    Returns ``ControlNetOutput``.
    """

    config: ControlNetConfig
    dtype: jnp.dtype | None = None
    attention_implementation: str = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 controlnet_cond: jax.Array, conditioning_scale: float | jax.Array = 1.0,
                 added_cond: Mapping[str, jax.Array] | None = None, guess_mode: bool = False) -> ControlNetOutput:
        cfg = self.config
        batch, h, w = sample.shape[:3]
        f = cfg.control_image_factor
        want = (batch, h * f, w * f, cfg.conditioning_channels)
        if tuple(controlnet_cond.shape) != want:
            raise ValueError(f"controlnet_cond: shape {tuple(controlnet_cond.shape)}, this ControlNet needs {want} "
                             f"(NHWC, {f}x the latents)")
        dtype = self.dtype or sample.dtype
        temb = embed_time(cfg, timesteps, added_cond, batch, dtype, self.dtype)

        cond = controlnet_cond.astype(dtype)
        if cfg.conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        x = conv3x3(cfg.block_out_channels[0], "conv_in", self.dtype)(sample.astype(dtype))
        x = x + ControlNetConditioningEmbedding(cfg.conditioning_embedding_out_channels, cfg.block_out_channels[0],
                                                dtype=self.dtype, name="controlnet_cond_embedding")(cond)
        options = block_options(cfg, self.attention_implementation, self.remat)
        x, skips = encode(cfg, options, x, temb, encoder_hidden_states.astype(dtype), (), self.dtype)

        zero_conv = lambda s, name: Conv2D(s.shape[-1], (1, 1), dtype=self.dtype, name=name)(s)  # noqa: E731
        residuals = [zero_conv(s, f"controlnet_down_blocks_{i}") for i, s in enumerate(skips)]
        residuals.append(zero_conv(x, "controlnet_mid_block"))

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if guess_mode and not cfg.global_pool_conditions:
            scales = jnp.asarray(guess_mode_scales(len(residuals))) * scale
            residuals = [r * scales[i].astype(r.dtype) for i, r in enumerate(residuals)]
        else:
            residuals = [r * scale.astype(r.dtype) for r in residuals]
        if cfg.global_pool_conditions:
            residuals = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in residuals]
        return ControlNetOutput(tuple(residuals[:-1]), residuals[-1])

    def dummy_inputs(self, latent_size: int = 8, text_tokens: int = 77, batch: int = 1):
        """Zero inputs of the right shapes: ``(sample, timesteps, text, controlnet_cond, scale, added_cond)``."""
        cfg = self.config
        f = cfg.control_image_factor
        return (jnp.zeros((batch, latent_size, latent_size, cfg.in_channels), jnp.float32),
                jnp.zeros((batch,), jnp.int32),
                jnp.zeros((batch, text_tokens, cfg.cross_attention_dim), jnp.float32),
                jnp.zeros((batch, latent_size * f, latent_size * f, cfg.conditioning_channels), jnp.float32),
                1.0, dummy_added_cond(cfg, batch))

    def init_params(self, rng: jax.Array, latent_size: int = 8, text_tokens: int = 77):
        """Random ``params`` (use with ``jax.eval_shape`` for shapes without allocating); for a ControlNet to
        train, ``controlnet_params_from_unet``."""
        return self.init(rng, *self.dummy_inputs(latent_size, text_tokens))["params"]


def controlnet_params_from_unet(config: ControlNetConfig, unet_params: Mapping[str, Any], rng: jax.Array) -> dict:
    """A new ControlNet's params, as diffusers' ``ControlNetModel.from_unet`` makes them: the encoder half
    copied from the UNet (same names), the control-image embedding random, and its ``conv_out`` and every
    zero convolution zero, so the untrained ControlNet leaves the UNet's output unchanged."""
    params = dict(jax.jit(ControlNetModel(config).init_params)(rng))  # jitted: eager init is op by op
    for name, value in params.items():
        if name.startswith("controlnet_"):
            continue
        theirs = unet_params.get(name)
        if theirs is None or jax.tree.structure(theirs) != jax.tree.structure(value) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(theirs), jax.tree.leaves(value))):
            raise ValueError(f"controlnet from unet: the UNet's {name!r} does not fit this ControlNet config")
        params[name] = jax.tree.map(jnp.asarray, theirs)
    zero = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
    for name in params:
        if name.startswith("controlnet_down_blocks_") or name == "controlnet_mid_block":
            params[name] = zero(params[name])
    params["controlnet_cond_embedding"] = {**params["controlnet_cond_embedding"],
                                           "conv_out": zero(params["controlnet_cond_embedding"]["conv_out"])}
    return params
