"""Reading and writing safetensors files and diffusers/transformers model folders, without torch.

The reader parses the format itself (8-byte header length, JSON header, raw little-endian buffers) so that
bfloat16 tensors come back as ``ml_dtypes.bfloat16`` numpy arrays and a truncated or malformed file is
reported by name instead of surfacing as a crash deep inside a library.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np
import safetensors.numpy

from ipadapter_jax.atomic_files import atomic_path, write_atomic

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class WeightFileError(ValueError):
    """A weight file or folder is missing, truncated, malformed or does not match the model."""


def _not_safetensors_hint(start: bytes) -> str:
    # A header length that exceeds the file is what a pickle or zip reads as; name what it really is.
    if start.startswith(b"PK\x03\x04"):
        return ": not a safetensors file but a zip archive (PyTorch's torch.save format); it is not unpickled"
    if start[:1] == b"\x80":
        return ": not a safetensors file but a Python pickle (PyTorch's legacy format); it is not unpickled"
    return ""


def _tensor_layout(path: Path, name: str, info) -> tuple[np.dtype, int, int, tuple[int, ...]]:
    """(dtype, begin, end, shape) of one header entry, validated."""
    if not isinstance(info, dict):
        raise WeightFileError(f"{path}: malformed header entry for tensor {name!r}: {info!r}")
    if info.get("dtype") not in _DTYPES:
        raise WeightFileError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r} "
                              f"(supported: {', '.join(_DTYPES)})")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise WeightFileError(f"{path}: tensor {name!r}: malformed shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise WeightFileError(f"{path}: tensor {name!r}: malformed data_offsets {offsets!r}")
    return np.dtype(_DTYPES[info["dtype"]]), offsets[0], offsets[1], tuple(shape)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy arrays (copied out of the file)."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise WeightFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        start = f.read(8)
        (header_len,) = struct.unpack("<Q", start)
        if header_len > size - 8:
            hint = _not_safetensors_hint(start)
            raise WeightFileError(f"{path}{hint}" if hint else
                                  f"{path}: truncated safetensors file (header of {header_len} bytes, file {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightFileError(f"{path}: malformed safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise WeightFileError(f"{path}: malformed safetensors header: a JSON {type(header).__name__}, "
                                  f"not an object")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        out: dict[str, np.ndarray] = {}
        if not header:
            return out
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for name, info in header.items():
                dtype, begin, end, shape = _tensor_layout(path, name, info)
                if data_start + end > size:
                    raise WeightFileError(
                        f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end}, "
                        f"file has {size}"
                    )
                if end - begin != int(np.prod(shape)) * dtype.itemsize:
                    raise WeightFileError(f"{path}: tensor {name!r}: byte range does not match shape {shape}")
                out[name] = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape)),
                                          offset=data_start + begin).reshape(shape).copy()
    return out


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """A whole ``.safetensors`` file in memory (for storage written as one object, e.g. a ``gs://`` workdir)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return safetensors.numpy.save(arrays, metadata=dict(metadata) if metadata else None)


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write atomically: a crash mid-write never leaves a half file under the final name."""
    # np.require, not np.ascontiguousarray: that one turns 0-d tensors (CLIPModel's logit_scale) into shape
    # [1], which transformers then rejects as a size mismatch.
    arrays = {k: np.require(v, requirements="C") for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        safetensors.numpy.save_file(arrays, str(tmp), metadata=dict(metadata) if metadata else None)


def write_model_folder(state: Mapping[str, np.ndarray], config: Mapping, folder: str | os.PathLike,
                       weights_name: str, dtype: Any = np.float32) -> Path:
    """A diffusers/transformers model folder as their ``save_pretrained`` writes it: ``config.json`` and
    ``{weights_name}.safetensors`` of ``state`` (torch layout) cast to ``dtype`` (None keeps each tensor's:
    ml_dtypes.bfloat16 is written as BF16), each file written whole. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.asarray(v) if dtype is None else np.asarray(v, dtype) for k, v in sorted(state.items())}
    write_safetensors(tensors, folder / f"{weights_name}.safetensors", metadata={"format": "pt"})
    write_atomic(folder / "config.json", json.dumps(dict(config), indent=2, sort_keys=True))
    return folder


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightFileError(f"{path}: not valid JSON: {e}") from None


def read_model_folder(folder: str | os.PathLike, weights_name: str) -> dict[str, np.ndarray]:
    """Tensors of a diffusers/transformers model folder: ``{weights_name}.safetensors`` or its sharded
    ``{weights_name}.safetensors.index.json`` with the shards beside it."""
    folder = Path(folder)
    single = folder / f"{weights_name}.safetensors"
    index = folder / f"{weights_name}.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightFileError(f"{index}: no 'weight_map'")
        shards = set(weight_map.values())
        for shard in shards:
            # Shards sit beside the index: a path could make us read any file on the machine.
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise WeightFileError(f"{index}: shard {shard!r} is not a file name in the folder")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(shards):
            tensors.update(read_safetensors(folder / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise WeightFileError(f"{index}: tensors listed in the index are absent from the shards: {missing[:10]}")
        return tensors
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
    raise WeightFileError(f"{folder}: expected {single.name} or {index.name}; found: {found}")
