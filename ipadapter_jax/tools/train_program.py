"""The training step of a config as a program to compile for a TPU slice: ``train.program.build_train_program``,
the builder ``train.py`` compiles its step with, given a mesh of the slice's compile-only devices and abstract
weights built from model configs.

Two data paths:
  - ``online``: what ``train.py`` runs: the batch carries pixels and every frozen encoder (VAE, text
    encoder(s), CLIP image encoder) runs inside the step.
  - ``cached``: what ``data.cache_latents`` runs: the batch carries the encodings written ahead of training
    by ``tools.cache_latents`` (VAE posterior moments, text conditioning, image features; see
    ``train.cached_batch``) and the only frozen weights on the chips are the UNet's.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec

from ipadapter_jax.tools.plan_program import Program, unsharded

LATENT_PATHS = ("online", "cached")


def train_program(config: Any, devices: list, configs: dict, latents: str = "online") -> Program:
    """``config``: a ``train.TrainConfig``; ``devices``: the slice's (compile-only) devices; ``configs``: the
    model config dicts (``reference_models.model_configs``)."""
    from ipadapter_jax.models.attention import resolve_attention_implementation
    from ipadapter_jax.train.cached_batch import abstract_cached_frozen
    from ipadapter_jax.train.program import build_train_program, train_mesh
    from ipadapter_jax.train.setup import projection_config
    from ipadapter_jax.train.step import make_train_step
    from ipadapter_jax.tools.reference_models import abstract_frozen_models

    if latents not in LATENT_PATHS:
        raise ValueError(f"latents={latents!r}: choose one of {LATENT_PATHS}")
    mesh = train_mesh(config, devices)
    m = config.model
    cached = latents == "cached"
    platform = devices[0].platform
    attention = resolve_attention_implementation(m.attention_implementation, platform)

    def frozen_for(modules, frozen):
        projection = projection_config(config, modules)
        if cached:
            frozen = abstract_cached_frozen(modules, projection.uses_hidden_states, frozen["unet"])
        return projection, frozen

    modules, frozen = abstract_frozen_models(configs, m.compute_dtype, attention, m.remat, platform)
    projection, frozen = frozen_for(modules, frozen)
    program = build_train_program(config, mesh, modules, frozen, projection, cached_latents=cached)

    # The FLOPs an MFU is measured in: the same step without remat and with XLA attention, unsharded.
    model_modules, _ = abstract_frozen_models(configs, m.compute_dtype, "xla", False, platform)
    model_step = make_train_step(model_modules, program.tx, program.lr_schedule, program.settings)
    model_args = unsharded(program.args)

    _, frozen_args, _, _ = program.args
    fsdp_params = sum(x.size for x in jax.tree.leaves(frozen_args) if x.sharding.spec != PartitionSpec())
    total_params = sum(x.size for x in jax.tree.leaves(frozen_args))
    data, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    description = [
        f"train step ({latents} latents): global batch {config.batch_size}, {config.data.resolution}px, "
        f"compute {m.compute_dtype}, attention {attention}"
        + (f" ({m.attention_implementation} on {platform})" if attention != m.attention_implementation else "")
        + f", remat {m.remat}, grad accumulation {config.optimizer.grad_accum_steps}",
        f"mesh data={data} x fsdp={fsdp}; frozen weights split over fsdp: {fsdp_params / max(total_params, 1):.0%} "
        f"of {total_params / 1e9:.2f} B parameters",
    ]
    return Program(
        name="train", jitted=program.jitted, args=program.args, model_fn=model_step, model_args=model_args,
        images_per_step=config.batch_size, mesh_shape={"data": data, "fsdp": fsdp}, description=description,
        tracing=lambda: jax.set_mesh(mesh), lowering=program.lower,
    )
