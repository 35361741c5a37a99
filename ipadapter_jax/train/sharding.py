"""The device mesh (axes ``data`` and ``fsdp``) and how every array is laid out on it.

Going from one chip to a pod is a config change: ``mesh.data`` x ``mesh.fsdp`` devices, logical axis rules
in the config. Two logical axes are used:
  - ``batch``: the leading axis of every batch array (default rule: over both ``data`` and ``fsdp``; FSDP is
    data parallelism whose weights are split too).
  - ``fsdp``: one axis of a large weight (frozen or trainable), chosen per array: the largest axis that
    ``fsdp`` divides. Weights under ``mesh.fsdp_min_size`` elements are replicated, since gathering a tiny
    array costs more than storing it. Optimizer state follows its parameter.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ipadapter_jax.train.config import MeshConfig

MESH_AXES = ("data", "fsdp")


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``data`` x ``fsdp`` mesh over ``devices`` (default: all), laid out for the interconnect."""
    devices = list(jax.devices() if devices is None else devices)
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, got {len(devices)}")
    try:
        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES)


def _rules(mesh_config: MeshConfig) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                 for name, axes in mesh_config.logical_axis_rules)


def logical_spec(names: Sequence[str | None], mesh_config: MeshConfig) -> PartitionSpec:
    """Logical axis names (None = replicated) -> mesh PartitionSpec through the config's rules."""
    return nn.logical_to_mesh_axes(tuple(names), _rules(mesh_config))


def batch_sharding(mesh: Mesh, mesh_config: MeshConfig, ndim: int) -> NamedSharding:
    """Leading axis over the ``batch`` rule, the rest replicated."""
    return NamedSharding(mesh, logical_spec(("batch",) + (None,) * (ndim - 1), mesh_config))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _fsdp_size(mesh: Mesh, mesh_config: MeshConfig) -> int:
    spec = logical_spec(("fsdp",), mesh_config)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def weight_spec(shape: Sequence[int], mesh: Mesh, mesh_config: MeshConfig) -> PartitionSpec:
    """One weight's spec: its largest axis divisible by the fsdp size over ``fsdp``, or replicated."""
    fsdp = _fsdp_size(mesh, mesh_config)
    if fsdp == 1 or not shape or int(np.prod(shape)) < mesh_config.fsdp_min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            names = [None] * len(shape)
            names[axis] = "fsdp"
            return logical_spec(names, mesh_config)
    return PartitionSpec()


def weight_shardings(abstract_tree: Any, mesh: Mesh, mesh_config: MeshConfig) -> Any:
    """A NamedSharding per leaf of a tree of arrays / ``ShapeDtypeStruct`` (scalars replicated)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, weight_spec(tuple(x.shape), mesh, mesh_config)),
                        abstract_tree)


def put_host_tree(host_tree: Any, shardings: Any) -> Any:
    """Host numpy arrays -> global jax.Arrays laid out by ``shardings``. Every process passes the full
    array and each device takes its slice, so this works unchanged on multi-host meshes."""
    def put(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.tree.map(put, host_tree, shardings)


def replicated_key(key: jax.Array, mesh: Mesh) -> jax.Array:
    """A PRNG key (or its raw data) as a key array replicated over ``mesh``. ``device_put`` cannot target
    other processes' devices, so local values are placed from the host and wrapped under ``jit``."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if isinstance(key, np.ndarray) or key.is_fully_addressable:
        key = put_host_tree(np.asarray(jax.device_get(key)), replicated(mesh))
    return jax.jit(jax.random.wrap_key_data, out_shardings=replicated(mesh))(key)
