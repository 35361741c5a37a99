"""Local (per-process) numpy batches -> global, sharded jax.Arrays.

Each process passes its own ``local_batch`` (leading axis = this process's share of the global
batch, e.g. ``[global_batch // process_count, ...]``); the result is one global array per key whose
leading axis is the global batch, laid out over ``mesh`` by ``partition_spec``
(``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _is_numeric_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.ndim >= 1 and value.dtype.kind in "biuf"


def batch_partition_spec(mesh: Mesh, batch_axes: str | tuple[str, ...] | None = None) -> PartitionSpec:
    """Leading (batch) axis split over `batch_axes` (default: every mesh axis), other axes replicated."""
    axes = tuple(mesh.axis_names) if batch_axes is None else batch_axes
    return PartitionSpec(axes)


def make_global_array(local: np.ndarray, mesh: Mesh, partition_spec: PartitionSpec) -> jax.Array:
    """One local array -> global jax.Array (global leading size inferred from the sharding)."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, partition_spec), np.asarray(local))


def make_global_batch(
    local_batch: Mapping[str, Any],
    mesh: Mesh,
    partition_spec: PartitionSpec | Mapping[str, PartitionSpec] | None = None,
) -> dict[str, Any]:
    """Every numeric numpy array in `local_batch` -> a global jax.Array; other entries (captions, keys,
    counters) are returned unchanged.

    partition_spec: one spec for all arrays, a dict key -> spec (missing keys use the default), or
      None for `batch_partition_spec(mesh)` (batch over all mesh axes).
    """
    default = batch_partition_spec(mesh)
    out: dict[str, Any] = {}
    for key, value in local_batch.items():
        if not _is_numeric_array(value):
            out[key] = value
            continue
        if isinstance(partition_spec, Mapping):
            spec = partition_spec.get(key, default)
        else:
            spec = default if partition_spec is None else partition_spec
        out[key] = make_global_array(value, mesh, spec)
    return out
