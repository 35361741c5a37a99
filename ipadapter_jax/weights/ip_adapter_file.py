"""Reading and writing IP-Adapter checkpoints in the published (tencent-ailab / h94) layout.

File layout (see ``shared/reference/IP_ADAPTER_FORMAT.md``): ``image_proj.<key>`` for the projection net
and ``ip_adapter.<2i+1>.to_{k,v}_ip.weight`` (PyTorch Linear ``[inner, cross_attention_dim]``) for the
``i``-th cross-attention in diffusers' processor order. ``.bin`` files are torch pickles of
``{"image_proj": {...}, "ip_adapter": {...}}``; they are read only with ``torch.load(weights_only=True)``,
which refuses pickles that would run code.

FaceID files (h94/IP-Adapter-FaceID) add, for every attention ``k`` of the UNet (``k = 2i`` the
self-attention and ``2i+1`` the cross-attention of transformer block ``i``), the LoRA
``ip_adapter.<k>.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight`` (``[rank, in]`` / ``[out, rank]``), and their
``image_proj`` is the face projection: ``proj.0``, ``proj.2``, ``norm`` (FaceID, FaceID SDXL, Portrait) or
those plus ``perceiver_resampler.*`` (FaceID-Plus and PlusV2, which hold the same tensors). Every tensor in a
file must be used: a key left over is an error naming it.
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
from ipadapter_jax.models.image_projection import (FACEID, FACEID_PLUS, FULL, PLAIN, PLUS, ProjectionConfig,
                                                   dummy_projection_input, projection_module)
from ipadapter_jax.models.lora import LORA_PROJECTIONS
from ipadapter_jax.weights.safetensors_io import (WeightFileError, read_safetensors, safetensors_bytes,
                                                  write_safetensors)
from ipadapter_jax.weights.torch_layout import flax_to_torch, torch_to_flax

_LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_LORA_KEY = re.compile(r"^(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# Our projection names <-> the files' (``to_out_0`` is diffusers' ``to_out.0``; the files say ``to_out_lora``).
_LORA_FILE_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out_0": "to_out"}
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
    def dim(key: str, axis: int) -> int:
        if key not in image_proj or np.ndim(image_proj[key]) <= axis:
            raise WeightFileError(f"image_proj.{key} is missing or has too few dimensions for this "
                                  f"projection's other keys")
        return int(np.shape(image_proj[key])[axis])

    if "perceiver_resampler.proj_in.weight" in image_proj:
        perceiver = "perceiver_resampler."
        width = dim("norm.weight", 0)
        layers = {k.split(".")[2] for k in image_proj if k.startswith(perceiver + "layers.")}
        return ProjectionConfig(
            FACEID_PLUS, embed_dim=dim("proj.0.weight", 1), cross_attention_dim=dim(perceiver + "proj_out.weight", 0),
            num_tokens=dim("proj.2.weight", 0) // width, hidden_dim=width, depth=len(layers),
            heads=dim(perceiver + "layers.0.0.to_q.weight", 0) // PLUS_DIM_HEAD, dim_head=PLUS_DIM_HEAD,
            ff_mult=dim(perceiver + "layers.0.1.1.weight", 0) // width, id_hidden_dim=dim("proj.0.weight", 0),
            clip_dim=dim(perceiver + "proj_in.weight", 1))
    if "proj.0.weight" in image_proj and "norm.weight" in image_proj and "proj.3.weight" not in image_proj:
        cross = dim("norm.weight", 0)
        return ProjectionConfig(FACEID, embed_dim=dim("proj.0.weight", 1), cross_attention_dim=cross,
                                num_tokens=dim("proj.2.weight", 0) // cross, id_hidden_dim=dim("proj.0.weight", 0))
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
    raise WeightFileError("unsupported IP-Adapter projection (not plain, plus, full-face, FaceID or "
                          f"FaceID-Plus); keys: {sorted(image_proj)[:8]}")


def _layers_from_state(ip_state: Mapping[str, np.ndarray], where: str
                       ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, dict[str, np.ndarray]]] | None]:
    """``(layers, lora or None)`` in Dense layout; every key must be one of them."""
    by_index: dict[int, dict[str, np.ndarray]] = {}
    lora_by_index: dict[int, dict[str, np.ndarray]] = {}
    unexpected = []
    for key, value in ip_state.items():
        m, lora = _LAYER_KEY.match(key), _LORA_KEY.match(key)
        if m:
            by_index.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(value).T
        elif lora:
            lora_by_index.setdefault(int(lora.group(1)), {})[f"{lora.group(2)}.{lora.group(3)}"] = np.asarray(value).T
        else:
            unexpected.append(key)
    if unexpected:
        raise WeightFileError(f"{where}: unexpected ip_adapter keys (neither to_k_ip/to_v_ip nor a LoRA's "
                              f"to_{{q,k,v,out}}_lora.{{down,up}}): {sorted(unexpected)[:10]}")
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
    layers = [by_index[i] for i in indices]
    if not lora_by_index:
        return layers, None
    return layers, _lora_from_state(lora_by_index, 2 * len(layers), ip_state, where)


def _lora_from_state(by_index: Mapping[int, Mapping[str, np.ndarray]], num_attentions: int,
                     ip_state: Mapping[str, np.ndarray], where: str) -> list[dict[str, dict[str, np.ndarray]]]:
    """A LoRA is all or nothing: down and up of the four projections of every attention ``0 .. 2n-1``. A
    partial one is refused as leftover keys (applying part of a LoRA would be a silent wrong result)."""
    wanted = [f"{_LORA_FILE_NAMES[p]}.{d}" for p in LORA_PROJECTIONS for d in ("down", "up")]
    file_key = lambda k, n: f"{k}.{n.replace('.', '_lora.')}.weight"  # noqa: E731  ("to_q.down" -> ...)
    beyond = sorted(file_key(k, n) for k in by_index if k >= num_attentions for n in by_index[k])
    missing = [file_key(k, n) for k in range(num_attentions) for n in wanted if n not in by_index.get(k, {})]
    if beyond or missing:
        problems = []
        if beyond:
            problems.append(f"keys for attentions the UNet does not have: {beyond[:10]}")
        if missing:
            problems.append(f"missing {missing[:10]}" + (f" ({len(missing)} in all)" if len(missing) > 10 else ""))
        raise WeightFileError(f"{where}: unexpected ip_adapter keys: an incomplete LoRA (one needs "
                              f"to_{{q,k,v,out}}_lora down and up for attentions 0..{num_attentions - 1}): "
                              + "; ".join(problems))
    lora = []
    for k in range(num_attentions):
        entry = {}
        for proj in LORA_PROJECTIONS:
            down, up = (by_index[k][f"{_LORA_FILE_NAMES[proj]}.{d}"] for d in ("down", "up"))
            if down.ndim != 2 or up.ndim != 2 or down.shape[1] != up.shape[0]:
                raise WeightFileError(f"{where}: ip_adapter.{k}.{_LORA_FILE_NAMES[proj]}_lora: down "
                                      f"{tuple(down.T.shape)} and up {tuple(up.T.shape)} are not a rank-r pair")
            entry[proj] = {"down": down, "up": up}
        lora.append(entry)
    return lora


def _check_expected(found: ProjectionConfig, expect: ProjectionConfig | str, path) -> None:
    wanted = expect if isinstance(expect, ProjectionConfig) else ProjectionConfig(variant=expect)  # validates
    if found.variant != wanted.variant:
        raise WeightFileError(f"{path}: holds a {found.variant} IP-Adapter ({found}), expected {wanted.variant}")
    if isinstance(expect, ProjectionConfig) and found != expect:
        diffs = [f"{f.name}: file {getattr(found, f.name)}, expected {getattr(expect, f.name)}"
                 for f in dataclasses.fields(ProjectionConfig) if getattr(found, f.name) != getattr(expect, f.name)]
        raise WeightFileError(f"{path}: holds a {found.variant} IP-Adapter of other sizes than expected: "
                              + "; ".join(diffs))


def load_ip_adapter(path: str | os.PathLike, expect: ProjectionConfig | str | None = None,
                    shortcut: bool | None = None) -> IPAdapter:
    """Read a published-layout IP-Adapter (``.safetensors``, or ``.bin`` through torch's safe loader).

    The variant (plain, plus, full-face, FaceID, FaceID-Plus), sizes and a FaceID LoRA are detected from the
    tensors; a tensor that none of them uses is an error. Arrays come back float32.
    expect: None accepts whatever the file holds; a variant name ("plain", "plus", "full", "faceid",
    "faceid_plus") or a whole `ProjectionConfig` (e.g. the one a training config describes) makes any other
    content a `WeightFileError` naming what differs.
    shortcut: FaceID-Plus only: run it as PlusV2 (``ProjectionConfig.shortcut``). Plus and PlusV2 files hold
    the same tensors, so None takes it from the file's metadata (files ``save_ip_adapter`` wrote) or else from
    its name, as h94 publishes them (``ip-adapter-faceid-plusv2_sd15.bin``: "plusv2" in the name).
    """
    from ipadapter_jax.weights.remote_files import local_file

    path = local_file(path)  # gs:// and other URLs: a cached local copy
    state = read_ip_adapter_state(path)
    try:
        projection = detect_projection(state["image_proj"])
    except WeightFileError as e:
        raise WeightFileError(f"{path}: {e}") from None
    if projection.variant == FACEID_PLUS:
        projection = dataclasses.replace(projection, shortcut=_plusv2(path) if shortcut is None else bool(shortcut))
    elif shortcut:
        raise ValueError(f"{path}: shortcut=True is for FaceID-Plus adapters; this file holds a {projection.variant} "
                         "IP-Adapter")
    if expect is not None:
        _check_expected(projection, expect, path)
    expected = jax.eval_shape(
        lambda: projection_module(projection).init(jax.random.key(0), dummy_projection_input(projection)))["params"]
    image_proj = torch_to_flax(state["image_proj"], expected, what=f"{path}: image_proj", dtype=np.float32)
    layers, lora = _layers_from_state(state["ip_adapter"], str(path))
    params = {"image_proj": image_proj, "layers": [{k: v.astype(np.float32) for k, v in layer.items()}
                                                   for layer in layers]}
    if lora is not None:
        params["lora"] = jax.tree.map(lambda a: a.astype(np.float32), lora)
    return IPAdapter(projection, params)


def _plusv2(path: Path) -> bool:
    if path.suffix == ".safetensors":
        import safetensors

        with safetensors.safe_open(str(path), framework="numpy") as f:
            recorded = (f.metadata() or {}).get("face_shortcut")
        if recorded is not None:
            return recorded == "true"
    return "plusv2" in path.name.lower()


def ip_adapter_state_dict(adapter: IPAdapter, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The flat ``image_proj.*`` / ``ip_adapter.*`` tensors of the published layout."""
    out = {f"image_proj.{k}": v.astype(dtype) for k, v in flax_to_torch(adapter.params["image_proj"]).items()}
    torch_layout = lambda a: np.ascontiguousarray(np.asarray(jax.device_get(a)).T.astype(dtype))  # noqa: E731
    for i, layer in enumerate(adapter.params["layers"]):
        for name in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{2 * i + 1}.{name}.weight"] = torch_layout(layer[name])
    for k, entry in enumerate(adapter.params.get("lora") or []):
        for proj in LORA_PROJECTIONS:
            for part in ("down", "up"):
                out[f"ip_adapter.{k}.{_LORA_FILE_NAMES[proj]}_lora.{part}.weight"] = torch_layout(entry[proj][part])
    return out


def save_ip_adapter(adapter: IPAdapter, path: str | os.PathLike, dtype: Any = np.float32) -> None:
    """Write ``adapter`` as a published-layout ``.safetensors`` (loads in diffusers' ``load_ip_adapter``
    and the reference implementation). ``dtype=np.float16`` matches the published files' size."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: IP-Adapters are written as .safetensors only")
    write_safetensors(ip_adapter_state_dict(adapter, dtype), path, metadata=_file_metadata(adapter))


def _file_metadata(adapter: IPAdapter) -> dict[str, str]:
    out = {"format": "pt", "ip_adapter_variant": adapter.variant}
    if adapter.variant == FACEID_PLUS:
        out["face_shortcut"] = "true" if adapter.projection.shortcut else "false"  # PlusV2; the tensors cannot say
    return out


def ip_adapter_file_bytes(adapter: IPAdapter, dtype: Any = np.float32) -> bytes:
    """The bytes ``save_ip_adapter`` writes, in memory (the trainer's exports, local or at a URL)."""
    return safetensors_bytes(ip_adapter_state_dict(adapter, dtype), metadata=_file_metadata(adapter))
