"""The train step as one program: the single builder that ``train.py`` (through ``setup.build_setup``), the TPU
plans (``plan.programs.train_program``) and the tests call, so the step a plan compiles for a TPU slice is the
step the trainer runs on it.

What differs between a run and a plan is only what the builder is given: the trainer passes its mesh over
the local devices and the frozen params it loaded; a plan passes a mesh of compile-only TPU devices and
``jax.ShapeDtypeStruct`` params built from model configs. Everything else (optimizer, state and batch
shardings, donation, the jitted step, and tracing under ``jax.set_mesh(mesh)``, which the Pallas kernels need
to run per device in a ``shard_map``) is here, once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from ipadapter_jax.models.image_projection import ProjectionConfig
from ipadapter_jax.train.config import TrainConfig, check_against_devices
from ipadapter_jax.train.sharding import batch_sharding, make_mesh, replicated, weight_shardings
from ipadapter_jax.train.state import TrainState, cross_attention_kv, make_optimizer, state_initializer, state_shardings
from ipadapter_jax.train.step import StepSettings, abstract_batch, make_train_step


def train_mesh(config: TrainConfig, devices: list, process_count: int = 1) -> Mesh:
    """The config's ``data`` x ``fsdp`` mesh over ``devices`` (checked against the batch and processes)."""
    data, fsdp = check_against_devices(config, len(devices), process_count)
    return make_mesh(data, fsdp, devices)


def abstract_tree(tree: Any, shardings: Any = None) -> Any:
    """``ShapeDtypeStruct`` leaves for the arrays (or structs) of ``tree``; ``shardings``: none (unsharded), one
    ``Sharding`` for every leaf, or a tree of them matching ``tree``."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass(eq=False)
class TrainProgram:
    """The jitted train step with its shardings and abstract arguments.

    ``jitted(state, frozen, batch, rng) -> (state, metrics)``: state donated; ``args`` are the abstract
    arguments (``ShapeDtypeStruct`` with shardings) it is lowered on. ``init_state(rng, kv)`` makes a fresh
    state already laid out by ``state_shardings``.
    """

    mesh: Mesh
    settings: StepSettings
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    step_fn: Any  # the pure step, unjitted
    jitted: Any
    init_state: Any
    state_shardings: TrainState
    frozen_shardings: Any
    batch_shardings: dict
    args: tuple  # (state, frozen, batch, rng) as ShapeDtypeStructs with shardings

    @property
    def abstract_state(self) -> TrainState:
        return self.args[0]

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    def lower(self):
        # Under the mesh: the Pallas attention reads it from the tracing context to run per device.
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*self.args)

    def compile(self):
        return self.lower().compile()


def build_train_program(config: TrainConfig, mesh: Mesh, modules: Any, frozen: Any, projection: ProjectionConfig,
                        *, cached_latents: bool = False, init_adapter: Any = None) -> TrainProgram:
    """The train step of ``config`` on ``mesh``.

    modules: ``train.frozen.FrozenModules``; frozen: the frozen tree the step takes (``{"unet", "vae",
    "text_encoder", ...}``, or ``{"unet", "image_uncond"}`` with cached latents), arrays or
    ``ShapeDtypeStruct`` in the compute dtype: only shapes and dtypes are read. init_adapter: an ``IPAdapter``
    to fine-tune from (else the paper's initialisation from the UNet's to_k / to_v).
    """
    frozen = abstract_tree(frozen)
    rep = replicated(mesh)
    tx, lr_schedule = make_optimizer(config.optimizer, config.num_steps)
    init = state_initializer(modules.unet_config, projection, tx, init_adapter)
    kv = cross_attention_kv(modules.unet_config, frozen["unet"])
    state = jax.eval_shape(init, jax.random.key(0), kv)
    state_sh = state_shardings(state, lambda tree: weight_shardings(tree, mesh, config.mesh), rep)
    frozen_sh = weight_shardings(frozen, mesh, config.mesh)
    settings = StepSettings(projection, config.data.resolution, config.optimizer.grad_accum_steps,
                            config.loss.noise_offset, config.loss.min_snr_gamma, config.model.sample_posterior,
                            cached_latents=cached_latents)
    step_fn = make_train_step(modules, tx, lr_schedule, settings,
                              micro_batch_sharding=lambda ndim: batch_sharding(mesh, config.mesh, ndim))
    batch = abstract_batch(modules, config.batch_size, config.data.resolution, settings)
    batch_sh = {k: batch_sharding(mesh, config.mesh, v.ndim) for k, v in batch.items()}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                     donate_argnums=(0,))
    args = (abstract_tree(state, state_sh), abstract_tree(frozen, frozen_sh), abstract_tree(batch, batch_sh), rng)
    return TrainProgram(mesh=mesh, settings=settings, tx=tx, lr_schedule=lr_schedule, step_fn=step_fn,
                        jitted=jitted, init_state=jax.jit(init, out_shardings=state_sh), state_shardings=state_sh,
                        frozen_shardings=frozen_sh, batch_shardings=batch_sh, args=args)
