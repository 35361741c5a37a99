"""The training step of a config as a program to compile for a TPU slice: the trainer's own step function,
mesh, shardings and donation (``ipadapter_jax.train``), applied to abstract inputs.

Two data paths:
  - ``online``: what ``train.py`` runs: the batch carries pixels and every frozen encoder (VAE, text
    encoder(s), CLIP image encoder) runs inside the step.
  - ``cached``: what ``data.cache_latents`` runs: the batch carries the encodings written ahead of training
    by ``tools.cache_latents`` (VAE posterior moments, text conditioning, image features; see
    ``train.cached_batch``) and the only frozen weights on the chips are the UNet's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import PartitionSpec

from ipadapter_jax.tools.plan_program import Program, unsharded, with_shardings

LATENT_PATHS = ("online", "cached")


def train_program(config: Any, devices: list, configs: dict, latents: str = "online") -> Program:
    """``config``: a ``train.TrainConfig``; ``devices``: the slice's (compile-only) devices; ``configs``: the
    model config dicts (``reference_models.model_configs``)."""
    from ipadapter_jax.train.cached_batch import abstract_cached_frozen
    from ipadapter_jax.train.config import check_against_devices
    from ipadapter_jax.train.setup import projection_config
    from ipadapter_jax.train.sharding import batch_sharding, make_mesh, replicated, weight_shardings
    from ipadapter_jax.train.state import make_optimizer, state_initializer, state_shardings
    from ipadapter_jax.train.step import StepSettings, abstract_batch, make_train_step
    from ipadapter_jax.tools.reference_models import abstract_cross_attention_kv, abstract_frozen_models

    if latents not in LATENT_PATHS:
        raise ValueError(f"latents={latents!r}: choose one of {LATENT_PATHS}")
    data, fsdp = check_against_devices(config, len(devices), 1)
    mesh = make_mesh(data, fsdp, devices)
    m = config.model
    cached = latents == "cached"

    def build(attention: str, remat: bool, micro_batch_sharding):
        modules, frozen = abstract_frozen_models(configs, m.compute_dtype, attention, remat)
        projection = projection_config(config, _ModulesHolder(modules))
        if cached:
            frozen = abstract_cached_frozen(modules, projection.uses_hidden_states, frozen["unet"])
        tx, lr_schedule = make_optimizer(config.optimizer, config.num_steps)
        init = state_initializer(modules.unet_config, projection, tx)
        kv = abstract_cross_attention_kv(modules.unet_config, frozen["unet"])
        state = jax.eval_shape(init, jax.random.key(0), kv)
        settings = StepSettings(projection, config.data.resolution, config.optimizer.grad_accum_steps,
                                config.loss.noise_offset, config.loss.min_snr_gamma, m.sample_posterior,
                                cached_latents=cached)
        step = make_train_step(modules, tx, lr_schedule, settings, micro_batch_sharding=micro_batch_sharding)
        batch = abstract_batch(modules, config.batch_size, config.data.resolution, settings)
        return modules, frozen, state, tx, step, batch

    modules, frozen, state, tx, step, batch = build(
        m.attention_implementation, m.remat, lambda ndim: batch_sharding(mesh, config.mesh, ndim))
    rep = replicated(mesh)
    frozen_sh = weight_shardings(frozen, mesh, config.mesh)
    state_sh = state_shardings(state, lambda tree: weight_shardings(tree, mesh, config.mesh), rep)
    batch_sh = {k: batch_sharding(mesh, config.mesh, v.ndim) for k, v in batch.items()}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    jitted = jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                     donate_argnums=(0,))
    args = (with_shardings(state, state_sh), with_shardings(frozen, frozen_sh), with_shardings(batch, batch_sh),
            rng)

    _, _, _, _, model_step, _ = build("xla", False, None)
    model_args = (unsharded(state), unsharded(frozen), unsharded(batch), jax.ShapeDtypeStruct((), rng.dtype))

    fsdp_params = sum(x.size for x, s in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_sh))
                      if s.spec != PartitionSpec())
    total_params = sum(x.size for x in jax.tree.leaves(frozen))
    description = [
        f"train step ({latents} latents): global batch {config.batch_size}, {config.data.resolution}px, "
        f"compute {m.compute_dtype}, attention {m.attention_implementation}, remat {m.remat}, "
        f"grad accumulation {config.optimizer.grad_accum_steps}",
        f"mesh data={data} x fsdp={fsdp}; frozen weights split over fsdp: {fsdp_params / max(total_params, 1):.0%} "
        f"of {total_params / 1e9:.2f} B parameters",
    ]
    return Program(
        name="train", jitted=jitted, args=args, model_fn=model_step, model_args=model_args,
        images_per_step=config.batch_size, mesh_shape={"data": data, "fsdp": fsdp}, description=description,
        tracing=lambda: jax.set_mesh(mesh),
    )


@dataclasses.dataclass(frozen=True)
class _ModulesHolder:
    # ``setup.projection_config`` reads ``frozen_models.modules``; the plan has modules but no weights.
    modules: Any

