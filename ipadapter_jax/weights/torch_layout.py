"""Mapping PyTorch state dicts (diffusers/transformers naming) to Flax param trees and back.

Our Flax modules are named after the PyTorch modules, with list indices folded into the name:
``down_blocks.0.resnets.1.conv1.weight`` <-> ``("down_blocks_0", "resnets_1", "conv1", "kernel")``.
Layouts: Linear ``[out, in]`` <-> Dense kernel ``[in, out]``; Conv2d ``[out, in, kh, kw]`` <-> Conv kernel
``[kh, kw, in, out]``; norm ``weight`` <-> ``scale``; Embedding ``weight`` <-> ``embedding``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from ipadapter_jax.weights.safetensors_io import WeightFileError

# Module names whose digits are part of the name, not a list index (diffusers' TimestepEmbedding).
_NAMES_WITH_DIGITS = {"linear_1", "linear_2"}
_INDEXED = re.compile(r"^(.*)_(\d+)$")


def flax_path_of(torch_key: str) -> tuple[str, ...]:
    """``a.0.b.weight`` -> ``("a_0", "b", "weight")`` (leaf name not yet translated)."""
    out: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def torch_prefix_of(flax_path: tuple[str, ...]) -> str:
    """``("a_0", "b")`` -> ``"a.0.b"``; the inverse of ``flax_path_of`` on module names."""
    parts = []
    for name in flax_path:
        indices: list[str] = []
        m = _INDEXED.match(name)
        while m and name not in _NAMES_WITH_DIGITS:
            indices.insert(0, m.group(2))
            name = m.group(1)
            m = _INDEXED.match(name)
        parts.append(".".join([name, *indices]))
    return ".".join(parts)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _torch_key(path: tuple[str, ...]) -> str:
    leaf = "weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1]
    prefix = torch_prefix_of(path[:-1])
    return f"{prefix}.{leaf}" if prefix else leaf


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 4:
            return np.transpose(array, (2, 3, 1, 0))
        if array.ndim == 2:
            return array.T
    return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 4:
            return np.transpose(array, (3, 2, 0, 1))
        if array.ndim == 2:
            return array.T
    return array


def _is_float(expected_leaf: Any) -> bool:
    dtype = getattr(expected_leaf, "dtype", None)
    return dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.floating)


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray], expected: Any, *, what: str = "model", dtype: Any = None
) -> dict:
    """Convert a PyTorch-named state dict to the Flax param tree whose shapes ``expected`` gives.

    ``expected`` is a nested dict of arrays or ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape`` of the
    module's init). Raises ``WeightFileError`` listing every missing key, unexpected key, shape mismatch
    and integer/bool tensor where the model has a float, so a wrong checkpoint is reported in one go
    rather than one key at a time.
    """
    expected_flat = _flatten(expected)
    by_prefix: dict[tuple[str, ...], list[str]] = {}
    for path in expected_flat:
        by_prefix.setdefault(path[:-1], []).append(path[-1])

    converted: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, wrong_dtype = [], [], []
    seen_mismatched: set[tuple[str, ...]] = set()
    for key, array in state_dict.items():
        path = flax_path_of(key)
        prefix, leaf = path[:-1], path[-1]
        leaves = by_prefix.get(prefix, [])
        if leaf == "weight":
            leaf = next((c for c in ("kernel", "scale", "embedding", "weight") if c in leaves), None)
        if leaf is None or leaf not in leaves:
            unexpected.append(key)
            continue
        value = _to_flax_layout(leaf, np.asarray(array))
        want = tuple(expected_flat[prefix + (leaf,)].shape)
        if value.ndim == 4 and len(want) == 2 and value.shape[:2] == (1, 1):
            value = value[0, 0]  # a 1x1 conv stored where our module uses a Dense (same math)
        if tuple(value.shape) != want:
            mismatched.append(f"{key}: file {tuple(np.asarray(array).shape)} vs model {want} (flax layout)")
            seen_mismatched.add(prefix + (leaf,))
            continue
        if _is_float(expected_flat[prefix + (leaf,)]) and value.dtype.kind in "biuc":
            # Casting ints or bools to float would load whatever they hold as weights.
            wrong_dtype.append(f"{key}: file {value.dtype}, model needs floating point")
            seen_mismatched.add(prefix + (leaf,))
            continue
        converted[prefix + (leaf,)] = value.astype(dtype) if dtype is not None else value
    missing = [_torch_key(p) for p in expected_flat if p not in converted and p not in seen_mismatched]
    if missing or unexpected or mismatched or wrong_dtype:
        lines = [f"{what}: the checkpoint does not match the model configuration"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched), ("dtype mismatches", wrong_dtype)):
            if items:
                shown = ", ".join(sorted(items)[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise WeightFileError("\n".join(lines))
    return _unflatten(converted)


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of ``torch_to_flax``: a PyTorch-named state dict of numpy arrays."""
    out = {}
    for path, value in _flatten(params).items():
        leaf = path[-1]
        out[_torch_key(path)] = np.ascontiguousarray(
            _to_torch_layout(leaf, np.asarray(jax.device_get(value)))
        )
    return out
