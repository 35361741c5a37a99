"""Laying a generation batch over a device mesh: the one path by which ``IPAdapterPipeline`` (and so
``sample.py`` and ``evaluate``) and the training loop's validation grids spread ``generate`` over every chip.

The starting noise is split over the mesh's batch axes (``data`` x ``fsdp`` under the default rules); the
text and image conditioning is small and replicated, so no layout of its negative/positive halves has to
match the noise's. A batch that does not divide over the devices is padded (by repeating its last item, so
the padding is ordinary finite work) and the padding is cut from the images afterwards: never an error.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ipadapter_jax.train.config import MeshConfig
from ipadapter_jax.train.sharding import batch_sharding, make_mesh, put_host_tree, replicated


def local_mesh(devices: Any = None, fsdp: int = 1) -> Mesh:
    """A ``data`` x ``fsdp`` mesh over this process's devices (default: all of them)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
    return make_mesh(len(devices) // fsdp, fsdp, devices)


def batch_multiple(mesh: Mesh, mesh_config: MeshConfig) -> int:
    """How many ways the batch axis is split: a padded batch is a multiple of this."""
    spec = batch_sharding(mesh, mesh_config, 1).spec[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return math.prod(mesh.shape[a] for a in axes)


def padded_batch(batch: int, mesh: Mesh, mesh_config: MeshConfig) -> int:
    """``batch`` rounded up to a multiple of the ways the batch is split."""
    multiple = batch_multiple(mesh, mesh_config)
    return -(-batch // multiple) * multiple


def generate_input_shardings(mesh: Mesh, mesh_config: MeshConfig, noise, context, added, features) -> tuple:
    """The layout of ``generate``'s per-call inputs (arrays or ``ShapeDtypeStruct``): noise split over the batch
    axes, conditioning replicated. ``place_generate_inputs`` places with it and ``plan.programs.sample_program``
    plans with it, so a plan compiles the pipeline's program."""
    rep = replicated(mesh)
    conditioning = jax.tree.map(lambda _: rep, (context, added, features))
    return (batch_sharding(mesh, mesh_config, len(np.shape(noise))), *conditioning)


def _pad_halves(x: np.ndarray, copies: int, batch: int, padded: int) -> np.ndarray:
    """``[copies * batch, ...]`` (negative half first) -> ``[copies * padded, ...]``, each half padded."""
    if padded == batch:
        return x
    halves = x.reshape(copies, batch, *x.shape[1:])
    pad = np.repeat(halves[:, -1:], padded - batch, axis=1)
    return np.concatenate([halves, pad], axis=1).reshape(copies * padded, *x.shape[1:])


def place_generate_inputs(mesh: Mesh, mesh_config: MeshConfig, noise, context, added, features: list,
                          copies: int) -> tuple[Any, Any, Any, list, int]:
    """Pad and place ``generate``'s per-call inputs on ``mesh``.

    noise: ``[B, h, w, C]``; context / added leaves: ``[copies * B, ...]``; features: per adapter (each leaf)
    ``[copies, ...]`` (one reference for the batch, left as it is) or ``[copies * B, ...]``.
    Returns the placed ``(noise, context, added, features)`` and the true batch ``B`` to cut the images to.
    """
    batch = int(np.shape(noise)[0])
    padded = padded_batch(batch, mesh, mesh_config)
    host = lambda x: np.asarray(jax.device_get(x))  # noqa: E731
    noise = host(noise)
    if padded != batch:
        noise = np.concatenate([noise, np.repeat(noise[-1:], padded - batch, axis=0)])
    pad = lambda x: _pad_halves(host(x), copies, batch, padded)  # noqa: E731
    context = pad(context)
    added = None if added is None else jax.tree.map(pad, added)
    # A feature is an array or, for FaceID-Plus, a (face embeddings, hidden states) pair.
    features = [jax.tree.map(lambda f: host(f) if np.shape(f)[0] == copies else pad(f), f) for f in features]
    inputs = (noise, context, added, features)
    noise, context, added, features = put_host_tree(inputs, generate_input_shardings(mesh, mesh_config, *inputs))
    return noise, context, added, features, batch


def place_replicated(tree: Any, mesh: Mesh) -> Any:
    """Small per-call values (scales, guidance) replicated on ``mesh``."""
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    return put_host_tree(host, jax.tree.map(lambda _: replicated(mesh), host))
