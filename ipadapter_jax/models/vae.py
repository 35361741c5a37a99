"""diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE) in Flax linen.

Tensors are NHWC inside: images ``[batch, height, width, in_channels]``, latents
``[batch, height / f, width / f, latent_channels]`` with ``f = 2 ** (len(block_out_channels) - 1)``.
Module names follow diffusers' state-dict names with list indices folded in (``down_blocks_0``,
``resnets_1``, ``attentions_0``, ``to_out_0``) so ``weights.torch_layout.torch_to_flax`` maps checkpoints
directly. ``params`` in the helper functions is the plain param tree (what ``torch_to_flax`` returns), not
wrapped in ``{"params": ...}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.attention import dot_product_attention, merge_heads, split_heads
from ipadapter_jax.models.group_norm import GroupNorm
from ipadapter_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv3x3

# diffusers builds every VAE norm and resnet with this epsilon, whatever the config says.
VAE_NORM_EPS = 1e-6
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
# Config keys that do not change the network (or that we do not use): accepted and dropped.
_IGNORED_KEYS = {"force_upcast", "latents_mean", "latents_std"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture fields of a diffusers ``vae/config.json``; defaults are diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """Build from a diffusers ``AutoencoderKL`` config dict; raises ``ValueError`` on anything we do not
        implement (another activation, other block types) instead of silently building a different net."""
        act_fn = config.get("act_fn", "silu")
        if act_fn not in ("silu", "swish"):
            raise ValueError(f"VAE config: act_fn {act_fn!r} is not supported (only 'silu')")
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"VAE config: _class_name {class_name!r} is not AutoencoderKL")
        block_out = tuple(int(c) for c in config.get("block_out_channels", cls.block_out_channels))
        for field, wanted in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            types = tuple(config.get(field, (wanted,) * len(block_out)))
            if len(types) != len(block_out) or any(t != wanted for t in types):
                raise ValueError(
                    f"VAE config: {field} must be {len(block_out)} x {wanted!r} "
                    f"(one per block_out_channels entry); got {list(types)}"
                )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in known}
        kwargs["block_out_channels"] = block_out
        for key in ("scaling_factor", "shift_factor"):
            if kwargs.get(key) is not None:
                kwargs[key] = float(kwargs[key])
        groups = int(kwargs.get("norm_num_groups", cls.norm_num_groups))
        if any(c % groups for c in block_out):
            raise ValueError(f"VAE config: norm_num_groups {groups} does not divide block_out_channels {block_out}")
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """A diffusers ``AutoencoderKL`` config dict (what ``config.json`` holds)."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKL", "act_fn": "silu"}
        out.update(dataclasses.asdict(self))
        out["block_out_channels"] = list(self.block_out_channels)
        out["down_block_types"] = [_DOWN_BLOCK] * len(self.block_out_channels)
        out["up_block_types"] = [_UP_BLOCK] * len(self.block_out_channels)
        return out


class VAEAttentionBlock(nn.Module):
    """diffusers' ``Attention`` as built for the VAE mid block: GroupNorm, single-layer self-attention over
    all pixels with biased ``to_q/to_k/to_v/to_out_0``, residual connection, divided by
    ``rescale_output_factor``.

    Call: ``x [B, H, W, C]`` -> ``[B, H, W, C]``.
    """

    heads: int
    groups: int
    rescale_output_factor: float = 1.0
    implementation: str = "xla"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = GroupNorm(self.groups, epsilon=VAE_NORM_EPS, dtype=self.dtype, name="group_norm")(x)
        tokens = tokens.reshape(b, h * w, c)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)  # noqa: E731
        q = split_heads(dense("to_q")(tokens), self.heads)
        k = split_heads(dense("to_k")(tokens), self.heads)
        v = split_heads(dense("to_v")(tokens), self.heads)
        # upcast: diffusers builds this block with upcast_softmax=True.
        out = dot_product_attention(q, k, v, implementation=self.implementation, upcast=True)
        out = dense("to_out_0")(merge_heads(out)).reshape(b, h, w, c)
        return (out + x) / self.rescale_output_factor


class VAEMidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2D`` without time embedding: resnet, (attention), resnet at constant width.

    Call: ``x [B, H, W, C]`` -> ``[B, H, W, C]``.
    """

    groups: int
    add_attention: bool = True
    attention_implementation: str = "xla"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        resnet = lambda i: ResnetBlock2D(  # noqa: E731
            channels, groups=self.groups, eps=VAE_NORM_EPS, dtype=self.dtype, name=f"resnets_{i}"
        )
        x = resnet(0)(x)
        if self.add_attention:
            # diffusers passes attention_head_dim = channels, so heads = channels // channels = 1.
            x = VAEAttentionBlock(
                heads=1, groups=self.groups, implementation=self.attention_implementation, dtype=self.dtype,
                name="attentions_0",
            )(x)
        return resnet(1)(x)


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` resnets then, unless last, a stride-2 conv padded right/bottom only.

    Call: ``x [B, H, W, C_in]`` -> ``[B, H/2, W/2, out_channels]`` (or ``[B, H, W, ...]`` when last).
    """

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=VAE_NORM_EPS, dtype=self.dtype,
                              name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` resnets then, unless last, nearest 2x upsampling and a conv.

    Call: ``x [B, H, W, C_in]`` -> ``[B, 2H, 2W, out_channels]`` (or ``[B, H, W, ...]`` when last).
    """

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=VAE_NORM_EPS, dtype=self.dtype,
                              name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _norm_act_conv_out(x: jax.Array, groups: int, out_channels: int, dtype) -> jax.Array:
    # Called inside a compact __call__, so the submodules get the parent's scope and these names.
    x = GroupNorm(groups, epsilon=VAE_NORM_EPS, dtype=dtype, name="conv_norm_out")(x)
    return conv3x3(out_channels, "conv_out", dtype)(nn.silu(x))


class Encoder(nn.Module):
    """Images ``[B, H, W, in_channels]`` -> moments ``[B, H/f, W/f, 2 * latent_channels]`` (before
    ``quant_conv``)."""

    config: VAEConfig
    attention_implementation: str = "xla"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        blocks = cfg.block_out_channels
        x = conv3x3(blocks[0], "conv_in", self.dtype)(x)
        for i, channels in enumerate(blocks):
            x = DownEncoderBlock2D(
                channels, num_layers=cfg.layers_per_block, groups=cfg.norm_num_groups,
                add_downsample=i < len(blocks) - 1, dtype=self.dtype, name=f"down_blocks_{i}",
            )(x)
        x = VAEMidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.attention_implementation,
                        dtype=self.dtype, name="mid_block")(x)
        return _norm_act_conv_out(x, cfg.norm_num_groups, 2 * cfg.latent_channels, self.dtype)


class Decoder(nn.Module):
    """Latents ``[B, h, w, latent_channels]`` (after ``post_quant_conv``) -> images
    ``[B, h*f, w*f, out_channels]`` (unclamped)."""

    config: VAEConfig
    attention_implementation: str = "xla"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        reversed_blocks = tuple(reversed(cfg.block_out_channels))
        x = conv3x3(reversed_blocks[0], "conv_in", self.dtype)(z)
        x = VAEMidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.attention_implementation,
                        dtype=self.dtype, name="mid_block")(x)
        for i, channels in enumerate(reversed_blocks):
            # One resnet more than the encoder's blocks: the decoder is the heavier half in diffusers too.
            x = UpDecoderBlock2D(
                channels, num_layers=cfg.layers_per_block + 1, groups=cfg.norm_num_groups,
                add_upsample=i < len(reversed_blocks) - 1, dtype=self.dtype, name=f"up_blocks_{i}",
            )(x)
        return _norm_act_conv_out(x, cfg.norm_num_groups, cfg.out_channels, self.dtype)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL``.

    ``encode(x [B, H, W, in_channels] in [-1, 1])`` -> ``(mean, logvar)``, each
    ``[B, H/f, W/f, latent_channels]``, logvar clamped to [-30, 20] as diffusers does.
    ``decode(z [B, h, w, latent_channels])`` -> ``[B, h*f, w*f, out_channels]`` (unscaled latents in,
    unclamped images out). ``__call__(x)`` = ``decode(mean)``, used for ``init``.
    ``dtype`` is the compute dtype; parameters keep whatever dtype they are given.
    """

    config: VAEConfig
    attention_implementation: str = "xla"
    dtype: jnp.dtype | None = None

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.attention_implementation, self.dtype)
        self.decoder = Decoder(cfg, self.attention_implementation, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        if self.dtype is not None:
            z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)


def _config_of(module: AutoencoderKL, config: VAEConfig | None) -> VAEConfig:
    return module.config if config is None else config


def encode_to_latents(
    module: AutoencoderKL,
    params: Mapping[str, Any],
    images: jax.Array,
    rng: jax.Array | None = None,
    config: VAEConfig | None = None,
) -> jax.Array:
    """Images ``[B, H, W, C]`` in [-1, 1] -> diffusion latents ``(z - shift_factor) * scaling_factor`` as
    float32 ``[B, H/f, W/f, latent_channels]``; ``z`` is a posterior sample when ``rng`` is given (diffusers'
    ``latent_dist.sample()``), else its mean (``latent_dist.mode()``). ``config`` defaults to
    ``module.config``."""
    mean, logvar = module.apply({"params": params}, images, method=AutoencoderKL.encode)
    return latents_from_moments(mean, logvar, rng, _config_of(module, config))


def latents_from_moments(mean: jax.Array, logvar: jax.Array, rng: jax.Array | None, config: VAEConfig) -> jax.Array:
    """``encode_to_latents`` from the posterior's moments (as a latent cache stores them), so one key gives the
    same latents from images and from cached moments."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    if config.shift_factor is not None:
        z = z - config.shift_factor
    return z * config.scaling_factor


def decode_latents(
    module: AutoencoderKL,
    params: Mapping[str, Any],
    latents: jax.Array,
    config: VAEConfig | None = None,
    clip: bool = True,
) -> jax.Array:
    """Diffusion latents ``[B, h, w, latent_channels]`` -> float32 images ``[B, h*f, w*f, C]``, clipped to
    [-1, 1] unless ``clip=False``; the inverse scaling of ``encode_to_latents``."""
    cfg = _config_of(module, config)
    z = latents.astype(jnp.float32) / cfg.scaling_factor
    if cfg.shift_factor is not None:
        z = z + cfg.shift_factor
    images = module.apply({"params": params}, z, method=AutoencoderKL.decode).astype(jnp.float32)
    return jnp.clip(images, -1.0, 1.0) if clip else images
