"""Reading and writing IP-Adapter checkpoints in the published (tencent-ailab / h94) layout.

File layout (see ``shared/reference/IP_ADAPTER_FORMAT.md``): ``image_proj.<key>`` for the projection net
and ``ip_adapter.<2i+1>.to_{k,v}_ip.weight`` (PyTorch Linear ``[inner, cross_attention_dim]``) for the
``i``-th cross-attention in diffusers' processor order. ``.bin`` files are torch pickles of
``{"image_proj": {...}, "ip_adapter": {...}}``; they are read only with ``torch.load(weights_only=True)``,
which refuses pickles that would run code.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from ipadapter_jax.models.adapter import IPAdapter
from ipadapter_jax.models.image_projection import (FULL, PLAIN, PLUS, ProjectionConfig, dummy_projection_input,
                                                   projection_module)
from ipadapter_jax.weights.safetensors_io import (WeightFileError, read_safetensors, safetensors_bytes,
                                                  write_safetensors)
from ipadapter_jax.weights.torch_layout import flax_to_torch, torch_to_flax

_LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
# Published Plus adapters use 64-wide heads; the files do not record it (diffusers assumes the same).
PLUS_DIM_HEAD = 64


def _read_bin(path: Path) -> dict[str, dict[str, np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise WeightFileError(f"{path}: reading a .bin checkpoint needs torch (pip install torch); "
                              f"or convert it to .safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError for pickles that reference code
        raise WeightFileError(f"{path}: refused to load: not a plain tensor checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, Mapping) or not {"image_proj", "ip_adapter"} <= set(state):
        raise WeightFileError(f"{path}: expected a dict with 'image_proj' and 'ip_adapter'")
    # weights_only still lets through ints, strings, lists, ...: check before touching them as tensors.
    out: dict[str, dict[str, np.ndarray]] = {}
    for part in ("image_proj", "ip_adapter"):
        tensors = state[part]
        if not isinstance(tensors, Mapping):
            raise WeightFileError(f"{path}: {part!r} is a {type(tensors).__name__}, not a dict of tensors")
        out[part] = {}
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise WeightFileError(f"{path}: {part}.{key} is not a tensor ({type(value).__name__})")
            # Floats as float32 (numpy has no bfloat16); integer tensors keep their dtype to be refused later.
            out[part][str(key)] = (value.detach().float() if value.is_floating_point() else value.detach()).numpy()
    return out


def read_ip_adapter_state(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """``{"image_proj": {key: array}, "ip_adapter": {key: array}}`` from a .safetensors or .bin file."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    if path.suffix == ".bin":
        return _read_bin(path)
    flat = read_safetensors(path)
    parts: dict[str, dict[str, np.ndarray]] = {"image_proj": {}, "ip_adapter": {}}
    stray = []
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head in parts and rest:
            parts[head][rest] = value
        else:
            stray.append(key)
    if stray or not parts["image_proj"] or not parts["ip_adapter"]:
        raise WeightFileError(f"{path}: not an IP-Adapter checkpoint: keys must start with 'image_proj.' and "
                              f"'ip_adapter.' (other keys: {sorted(stray)[:10]})")
    return parts


def detect_projection(image_proj: Mapping[str, np.ndarray]) -> ProjectionConfig:
    """The projection net's variant and sizes, from its tensors' names and shapes."""
    if "proj.weight" in image_proj and "norm.weight" in image_proj:
        cross = image_proj["norm.weight"].shape[0]
        rows, embed = image_proj["proj.weight"].shape
        return ProjectionConfig(PLAIN, embed_dim=embed, cross_attention_dim=cross, num_tokens=rows // cross)
    if "proj.3.weight" in image_proj:
        return ProjectionConfig(FULL, embed_dim=image_proj["proj.0.weight"].shape[1],
                                cross_attention_dim=image_proj["proj.3.weight"].shape[0], num_tokens=257)
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        _, queries, hidden = image_proj["latents"].shape
        depth = len({k.split(".")[1] for k in image_proj if k.startswith("layers.")})
        inner = image_proj["layers.0.0.to_q.weight"].shape[0]
        return ProjectionConfig(PLUS, embed_dim=image_proj["proj_in.weight"].shape[1],
                                cross_attention_dim=image_proj["proj_out.weight"].shape[0], num_tokens=queries,
                                hidden_dim=hidden, depth=depth, heads=inner // PLUS_DIM_HEAD,
                                dim_head=PLUS_DIM_HEAD, ff_mult=image_proj["layers.0.1.1.weight"].shape[0] // hidden)
    raise WeightFileError("unsupported IP-Adapter projection (not plain, plus or full-face); keys: "
                          f"{sorted(image_proj)[:8]}")


def _layers_from_state(ip_state: Mapping[str, np.ndarray], where: str) -> list[dict[str, np.ndarray]]:
    by_index: dict[int, dict[str, np.ndarray]] = {}
    unexpected = []
    for key, value in ip_state.items():
        m = _LAYER_KEY.match(key)
        if not m:
            unexpected.append(key)
            continue
        by_index.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(value).T
    if unexpected:
        raise WeightFileError(f"{where}: unexpected ip_adapter keys (LoRA / FaceID adapters are not supported): "
                              f"{sorted(unexpected)[:10]}")
    not_float = sorted(f"{k} ({np.asarray(v).dtype})" for k, v in ip_state.items()
                       if np.asarray(v).dtype.kind in "biuc")
    if not_float:
        raise WeightFileError(f"{where}: ip_adapter dtype mismatches, floating point needed: {not_float[:10]}")
    indices = sorted(by_index)
    expected = [2 * i + 1 for i in range(len(indices))]
    if indices != expected:
        raise WeightFileError(f"{where}: ip_adapter layer indices {indices[:6]}... are not 1, 3, 5, ...; "
                              f"missing {sorted(set(expected) - set(indices))[:10]}")
    for i in indices:
        if set(by_index[i]) != {"to_k_ip", "to_v_ip"}:
            raise WeightFileError(f"{where}: ip_adapter layer {i} lacks "
                                  f"{sorted({'to_k_ip', 'to_v_ip'} - set(by_index[i]))}")
    return [by_index[i] for i in indices]


def _check_expected(found: ProjectionConfig, expect: ProjectionConfig | str, path) -> None:
    wanted = expect if isinstance(expect, ProjectionConfig) else ProjectionConfig(variant=expect)  # validates
    if found.variant != wanted.variant:
        raise WeightFileError(f"{path}: holds a {found.variant} IP-Adapter ({found}), expected {wanted.variant}")
    if isinstance(expect, ProjectionConfig) and found != expect:
        diffs = [f"{f.name}: file {getattr(found, f.name)}, expected {getattr(expect, f.name)}"
                 for f in dataclasses.fields(ProjectionConfig) if getattr(found, f.name) != getattr(expect, f.name)]
        raise WeightFileError(f"{path}: holds a {found.variant} IP-Adapter of other sizes than expected: "
                              + "; ".join(diffs))


def load_ip_adapter(path: str | os.PathLike, expect: ProjectionConfig | str | None = None) -> IPAdapter:
    """Read a published-layout IP-Adapter (``.safetensors``, or ``.bin`` through torch's safe loader).

    The variant (plain, plus, full-face) and sizes are detected from the tensors. Arrays come back float32.
    expect: None accepts whatever the file holds; a variant name ("plain", "plus", "full") or a whole
    `ProjectionConfig` (e.g. the one a training config describes) makes any other content a
    `WeightFileError` naming what differs.
    """
    from ipadapter_jax.weights.remote_files import local_file

    path = local_file(path)  # gs:// and other URLs: a cached local copy
    state = read_ip_adapter_state(path)
    projection = detect_projection(state["image_proj"])
    if expect is not None:
        _check_expected(projection, expect, path)
    expected = jax.eval_shape(
        lambda: projection_module(projection).init(jax.random.key(0), dummy_projection_input(projection)))["params"]
    image_proj = torch_to_flax(state["image_proj"], expected, what=f"{path}: image_proj", dtype=np.float32)
    layers = [{k: v.astype(np.float32) for k, v in layer.items()}
              for layer in _layers_from_state(state["ip_adapter"], str(path))]
    return IPAdapter(projection, {"image_proj": image_proj, "layers": layers})


def ip_adapter_state_dict(adapter: IPAdapter, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The flat ``image_proj.*`` / ``ip_adapter.*`` tensors of the published layout."""
    out = {f"image_proj.{k}": v.astype(dtype) for k, v in flax_to_torch(adapter.params["image_proj"]).items()}
    for i, layer in enumerate(adapter.params["layers"]):
        for name in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{2 * i + 1}.{name}.weight"] = np.ascontiguousarray(
                np.asarray(jax.device_get(layer[name])).T.astype(dtype))
    return out


def save_ip_adapter(adapter: IPAdapter, path: str | os.PathLike, dtype: Any = np.float32) -> None:
    """Write ``adapter`` as a published-layout ``.safetensors`` (loads in diffusers' ``load_ip_adapter``
    and the reference implementation). ``dtype=np.float16`` matches the published files' size."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: IP-Adapters are written as .safetensors only")
    write_safetensors(ip_adapter_state_dict(adapter, dtype), path, metadata=_file_metadata(adapter))


def _file_metadata(adapter: IPAdapter) -> dict[str, str]:
    return {"format": "pt", "ip_adapter_variant": adapter.variant}


def ip_adapter_file_bytes(adapter: IPAdapter, dtype: Any = np.float32) -> bytes:
    """The bytes ``save_ip_adapter`` writes, in memory (the trainer's exports, local or at a URL)."""
    return safetensors_bytes(ip_adapter_state_dict(adapter, dtype), metadata=_file_metadata(adapter))
