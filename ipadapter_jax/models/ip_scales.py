"""Turning a user's IP-Adapter scale into one number per adapter and cross-attention layer.

Accepted forms, per adapter (a list gives one per adapter; a single one applies to all):
  - a number: every layer.
  - diffusers' block dict (``set_ip_adapter_scale``): ``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0":
    [0.0, 1.0, 0.0]}, "mid": 0.0}``; unnamed parts get 0, a number for a part or block covers all of it,
    a list gives one value per transformer (``attentions.j``) of the block.
  - module-name prefixes (InstantStyle): ``{"up_blocks.0.attentions.1": 1.0}``; unnamed layers get 0.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ipadapter_jax.models.unet_config import UNetConfig

_BLOCK_KEYS = {"down", "mid", "up"}


def _expand_block_dict(config: UNetConfig, spec: Mapping[str, Any]) -> dict[str, float]:
    """diffusers' ``{"down": ..., "mid": ..., "up": ...}`` -> ``{module prefix: scale}``."""
    unknown = set(spec) - _BLOCK_KEYS
    if unknown:
        raise ValueError(f"ip scale: unknown keys {sorted(unknown)}; use 'down', 'mid', 'up' or module names")
    prefixes: dict[str, float] = {}
    mid = spec.get("mid", 0.0)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise ValueError(f"ip scale: expected 1 value for mid, got {len(mid)}")
        mid = mid[0]
    prefixes["mid_block"] = float(mid)
    layers = {"down": config.layers_per_block[0], "up": config.layers_per_block[0] + 1}
    for part, kinds in (("down", config.down_block_types), ("up", config.up_block_types)):
        with_attention = [i for i, kind in enumerate(kinds) if kind.startswith("CrossAttn")]
        value = spec.get(part, 0.0)
        blocks = value if isinstance(value, Mapping) else {f"block_{i}": value for i in with_attention}
        for key in blocks:
            if key not in {f"block_{i}" for i in with_attention}:
                raise ValueError(f"ip scale: {part}.{key} is not a block with attention "
                                 f"(blocks with attention: {with_attention})")
        for i in with_attention:
            block = blocks.get(f"block_{i}", 0.0)
            values = list(block) if isinstance(block, (list, tuple)) else [block] * layers[part]
            if len(values) == 1:
                values = values * layers[part]
            if len(values) != layers[part]:
                raise ValueError(f"ip scale: expected {layers[part]} values for {part}.block_{i}, got {len(values)}")
            for j, v in enumerate(values):
                prefixes[f"{part}_blocks.{i}.attentions.{j}"] = float(v)
    return prefixes


def _layer_scales(config: UNetConfig, spec: Any) -> np.ndarray:
    names = [name for name, _ in config.cross_attention_layers()]
    if isinstance(spec, (int, float, np.floating, np.integer)):
        return np.full(len(names), float(spec), np.float32)
    if not isinstance(spec, Mapping):
        raise TypeError(f"ip scale must be a number or a dict, got {type(spec).__name__}")
    prefixes = _expand_block_dict(config, spec) if set(spec) & _BLOCK_KEYS else {k: float(v) for k, v in spec.items()}
    out = np.zeros(len(names), np.float32)
    for prefix, value in prefixes.items():
        hits = [i for i, name in enumerate(names) if name == prefix or name.startswith(prefix + ".")]
        if not hits and not (prefix == "mid_block" and value == 0.0):
            raise ValueError(f"ip scale: {prefix!r} names no cross-attention layer of this UNet")
        out[hits] = value
    return out


def resolve_ip_scales(config: UNetConfig, spec: Any, num_adapters: int) -> np.ndarray:
    """``[num_adapters, num_cross_attention_layers]`` float32 scales."""
    specs: Sequence[Any] = spec if isinstance(spec, (list, tuple)) else [spec]
    if len(specs) == 1:
        specs = list(specs) * num_adapters
    if len(specs) != num_adapters:
        raise ValueError(f"{len(specs)} ip scales for {num_adapters} adapters")
    return np.stack([_layer_scales(config, s) for s in specs]) if specs else np.zeros((0, 0), np.float32)
