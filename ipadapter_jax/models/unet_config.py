"""The UNet's hyperparameters, read from a diffusers ``unet/config.json``, and those of its encoder half,
which a ControlNet shares (``UNetEncoderConfig``; ``models/controlnet.py`` adds the ControlNet's own).

diffusers' configs carry historical quirks that are resolved here once, so the modules see plain values:
``attention_head_dim`` in SD1.5/SDXL configs is really the number of heads (diffusers' own
``num_attention_heads = num_attention_heads or attention_head_dim``), and per-block values may be an int
or a list.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"
PLAIN_DOWN = "DownBlock2D"
CROSS_ATTN_UP = "CrossAttnUpBlock2D"
PLAIN_UP = "UpBlock2D"
CROSS_ATTN_MID = "UNetMidBlock2DCrossAttn"
PLAIN_MID = "UNetMidBlock2D"

# Options whose other values change the architecture in ways this implementation does not build.
_REQUIRED_DEFAULTS = {
    "act_fn": "silu",
    "class_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "time_embedding_type": "positional",
    "cross_attention_norm": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "timestep_post_act": None,
    "time_embedding_act_fn": None,
}


class AttentionLayer(NamedTuple):
    """One attention module of the UNet: a cross-attention (``attn2``), the unit an IP-Adapter attaches its
    k/v weights to, or its transformer block's self-attention (``attn1``, where FaceID LoRAs also sit)."""

    name: str  # diffusers' module name: "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    width: int  # its inner width (to_k / to_v output features)

    @property
    def self_attention(self) -> "AttentionLayer":
        """The same transformer block's ``attn1``."""
        return AttentionLayer(self.name.rsplit(".", 1)[0] + ".attn1", self.width)

    @property
    def path(self) -> tuple[str, ...]:
        """The module's path in our Flax trees (params, ``ip_adapter`` and ``ip_scale`` collections):
        diffusers' list indices join the list's name, ``("down_blocks_0", "attentions_0", ..., "attn2")``."""
        out: list[str] = []
        for part in self.name.split("."):
            if part.isdigit():
                out[-1] = f"{out[-1]}_{part}"
            else:
                out.append(part)
        return tuple(out)

    def subtree(self, tree: Mapping[str, Any]) -> Any:
        """The node of ``tree`` (a Flax param tree of the whole UNet) at this layer's path."""
        for part in self.path:
            tree = tree[part]
        return tree

    def subtree_in(self, tree: dict) -> dict:
        """The node of ``tree`` at this layer's path, created (empty) on the way where missing."""
        for part in self.path:
            tree = tree.setdefault(part, {})
        return tree


def _per_block(value: Any, n: int, name: str, what: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} config: {name} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


def encoder_fields_from_diffusers(config: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The encoder half's values from a diffusers UNet or ControlNet config dict (see ``UNetEncoderConfig``);
    architecture options this implementation does not build are rejected by name."""
    for key, default in _REQUIRED_DEFAULTS.items():
        value = config.get(key, default)
        if isinstance(value, (list, tuple)) and key == "only_cross_attention":
            value = any(value)
        if value != default:
            raise ValueError(f"{what} config: {key}={value!r} is not supported (only {default!r})")
    for key in ("block_out_channels", "down_block_types"):
        if not isinstance(config.get(key), (list, tuple)):
            raise ValueError(f"{what} config: {key} must be a list, got {config.get(key)!r}")
    n = len(config["block_out_channels"])
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    if isinstance(config.get("cross_attention_dim"), (list, tuple)):
        raise ValueError(f"{what} config: per-block cross_attention_dim is not supported")
    tlpb = config.get("transformer_layers_per_block", 1)
    if isinstance(tlpb, (list, tuple)) and any(isinstance(r, (list, tuple)) for r in tlpb):
        raise ValueError(f"{what} config: per-layer transformer_layers_per_block is not supported")
    addition = config.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise ValueError(f"{what} config: addition_embed_type={addition!r} is not supported")
    return dict(
        in_channels=config.get("in_channels", 4),
        block_out_channels=tuple(config["block_out_channels"]),
        down_block_types=tuple(config["down_block_types"]),
        mid_block_type=config.get("mid_block_type", CROSS_ATTN_MID),
        layers_per_block=_per_block(config.get("layers_per_block", 2), n, "layers_per_block", what),
        cross_attention_dim=config.get("cross_attention_dim", 1280),
        num_heads=_per_block(heads, n, "num_attention_heads", what),
        transformer_layers_per_block=_per_block(tlpb, n, "transformer_layers_per_block", what),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        upcast_attention=bool(config.get("upcast_attention", False)),
        resnet_time_scale_shift=config.get("resnet_time_scale_shift", "default"),
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
        freq_shift=float(config.get("freq_shift", 0)),
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        downsample_padding=config.get("downsample_padding", 1),
        mid_block_scale_factor=float(config.get("mid_block_scale_factor", 1.0)),
        addition_embed_type=addition,
        addition_time_embed_dim=config.get("addition_time_embed_dim"),
        projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim"),
    )


@dataclasses.dataclass(frozen=True)
class UNetEncoderConfig:
    """The half of the UNet that diffusers' ``ControlNetModel`` copies: time (and SDXL text-time) embedding,
    ``conv_in``, down blocks, mid block (``models/unet_encoder.py`` builds it for both)."""

    in_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (PLAIN_DOWN,)
    mid_block_type: str | None = CROSS_ATTN_MID
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    cross_attention_dim: int = 768
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    time_embedding_dim: int | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def _validate_encoder(self, what: str) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n:
            raise ValueError(f"{what} config: down block type list must match block_out_channels")
        known_down = {CROSS_ATTN_DOWN, PLAIN_DOWN}
        for t in self.down_block_types:
            if t not in known_down:
                raise ValueError(f"{what} config: down block type {t!r} is not supported ({sorted(known_down)})")
        if self.mid_block_type not in (CROSS_ATTN_MID, PLAIN_MID, None):
            raise ValueError(f"{what} config: mid_block_type {self.mid_block_type!r} is not supported")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(f"{what} config: resnet_time_scale_shift={self.resnet_time_scale_shift!r}")
        for c, h in zip(self.block_out_channels, self.num_heads):
            if c % h:
                raise ValueError(f"{what} config: {c} channels do not split into {h} heads")
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise ValueError(f"{what} config: text_time needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def text_embeds_dim(self) -> int | None:
        """Width of SDXL's pooled text embedding (``added_cond["text_embeds"]``), or None without text_time."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim


@dataclasses.dataclass(frozen=True)
class UNetConfig(UNetEncoderConfig):
    out_channels: int = 4
    up_block_types: tuple[str, ...] = (PLAIN_UP,) + (CROSS_ATTN_UP,) * 3
    reverse_transformer_layers_per_block: tuple[int, ...] | None = None
    center_input_sample: bool = False
    sample_size: int = 64

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
        """Build from a diffusers ``UNet2DConditionModel`` config dict; unknown keys are ignored,
        architecture options this implementation does not build are rejected by name."""
        fields = encoder_fields_from_diffusers(config, "unet")
        if not isinstance(config.get("up_block_types"), (list, tuple)):
            raise ValueError(f"unet config: up_block_types must be a list, got {config.get('up_block_types')!r}")
        reverse = config.get("reverse_transformer_layers_per_block")
        if reverse is not None and any(isinstance(r, (list, tuple)) for r in reverse):
            raise ValueError("unet config: nested reverse_transformer_layers_per_block is not supported")
        out = cls(
            **fields,
            time_embedding_dim=config.get("time_embedding_dim"),
            out_channels=config.get("out_channels", 4),
            up_block_types=tuple(config["up_block_types"]),
            reverse_transformer_layers_per_block=tuple(reverse) if reverse is not None else None,
            center_input_sample=bool(config.get("center_input_sample", False)),
            sample_size=config.get("sample_size", 64),
        )
        out.validate()
        return out

    def validate(self) -> None:
        self._validate_encoder("unet")
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError("unet config: down/up block type lists must match block_out_channels")
        known_up = {CROSS_ATTN_UP, PLAIN_UP}
        for t in self.up_block_types:
            if t not in known_up:
                raise ValueError(f"unet config: up block type {t!r} is not supported ({sorted(known_up)})")

    @property
    def up_transformer_layers(self) -> tuple[int, ...]:
        return self.reverse_transformer_layers_per_block or tuple(reversed(self.transformer_layers_per_block))

    @property
    def is_sdxl(self) -> bool:
        """The one SDXL check of the project: the UNet takes SDXL's added conditioning (pooled text embeds and
        size/crop time ids, ``addition_embed_type="text_time"``), so the base has SDXL's two text encoders."""
        return self.addition_embed_type == "text_time"

    def cross_attention_layers(self) -> list[AttentionLayer]:
        """Every cross-attention (``(diffusers module name, inner width)``, with its Flax path), in the order
        diffusers' ``attn_processors`` enumerates them (down blocks, up blocks, then the mid block): the order
        the IP-Adapter file format numbers its ``to_k_ip``/``to_v_ip`` keys (``2*i+1``)."""
        layers = []
        for i, kind in enumerate(self.down_block_types):
            if kind == CROSS_ATTN_DOWN:
                for j in range(self.layers_per_block[i]):
                    for t in range(self.transformer_layers_per_block[i]):
                        layers.append(AttentionLayer(
                            f"down_blocks.{i}.attentions.{j}.transformer_blocks.{t}.attn2", self.block_out_channels[i]))
        reversed_channels = tuple(reversed(self.block_out_channels))
        reversed_layers = tuple(reversed(self.layers_per_block))
        for i, kind in enumerate(self.up_block_types):
            if kind == CROSS_ATTN_UP:
                for j in range(reversed_layers[i] + 1):
                    for t in range(self.up_transformer_layers[i]):
                        layers.append(AttentionLayer(
                            f"up_blocks.{i}.attentions.{j}.transformer_blocks.{t}.attn2", reversed_channels[i]))
        if self.mid_block_type == CROSS_ATTN_MID:
            for t in range(self.transformer_layers_per_block[-1]):
                layers.append(AttentionLayer(f"mid_block.attentions.0.transformer_blocks.{t}.attn2",
                                                  self.block_out_channels[-1]))
        return layers
