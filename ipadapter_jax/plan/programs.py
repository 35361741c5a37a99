"""The programs a TPU plan compiles: the training step (``train_program``) and the sampler
(``sample_program``) of a config, each as a ``Program``: the jitted function, its abstract arguments and how to
count its work.

``train_program`` is ``train.program.build_train_program``, the builder ``train.py`` compiles its step with,
given a mesh of the slice's compile-only devices and abstract weights built from model configs. Two data paths:
  - ``online``: what ``train.py`` runs: the batch carries pixels and every frozen encoder (VAE, text
    encoder(s), CLIP image encoder) runs inside the step.
  - ``cached``: what ``data.cache_latents`` runs: the batch carries the encodings written ahead of training
    by ``python -m ipadapter_jax.cache`` (VAE posterior moments, text conditioning, image features; see
    ``cache.batch``) and the only frozen weights on the chips are the UNet's.

``sample_program`` is ``pipeline.denoise.generate`` (project the image prompt, every sampler step with
classifier-free guidance under ``fori_loop``, VAE decode) on abstract weights, with the config's validation
settings (sampler, steps, guidance) at its training resolution, its inputs laid out by the pipeline's own
``sharded_batch.generate_input_shardings``. The text and image encoders run once per call outside ``generate``
and are not part of the plan. XLA's cost model counts a loop body once, so the plan also compiles one guided
UNet step on its own and adds ``steps - 1`` of it to the time and FLOPs of ``generate``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ipadapter_jax.diffusion.samplers import make_sampler
from ipadapter_jax.models.vae import decode_latents
from ipadapter_jax.pipeline.denoise import (GenerateInputs, GenerateSettings, GenerateWeights, generate,
                                            guided_prediction, unet_variables)
from ipadapter_jax.train.program import abstract_tree

LATENT_PATHS = ("online", "cached")


@dataclasses.dataclass
class Program:
    """jitted / args: the function as it runs (shardings, donation) and its abstract arguments, each a
    ``ShapeDtypeStruct`` carrying its sharding.
    model_fn / model_args: the same computation without rematerialisation and with XLA attention, unsharded:
      the FLOPs an MFU is measured in (see ``figures.model_flops``).
    extra_model_flops: FLOPs to add to XLA's count of ``model_fn`` (work XLA counts once but runs more often,
      such as the iterations of a loop after the first).
    tracing: a context manager active while tracing and lowering ``jitted`` (and ``repeat_jitted``): the
      device mesh (``jax.set_mesh``), which Pallas kernels need to run per device, and any patches.
    model_tracing: the same for ``model_fn`` (patches only: it is lowered unsharded, for CPU).
    repeat_jitted / repeat_args / repeat_count: a part of ``jitted`` that runs ``repeat_count`` more times
      than XLA's cost model counts (a loop body): compiled on its own, its time and FLOPs are added.
    """

    name: str
    jitted: Any
    args: tuple
    model_fn: Callable
    model_args: tuple
    images_per_step: int
    mesh_shape: dict
    description: list[str]
    tracing: Callable[[], Any] = contextlib.nullcontext
    model_tracing: Callable[[], Any] = contextlib.nullcontext
    extra_model_flops: Callable[[], float] | None = None
    repeat_jitted: Any = None
    repeat_args: tuple = ()
    repeat_count: int = 0
    lowering: Callable[[], Any] | None = None  # how the builder lowers ``jitted`` (default: under ``tracing``)

    def lower(self):
        """``jitted`` lowered on ``args``: by the program builder's own lowering where it has one (the train
        step's ``TrainProgram.lower``, the very call ``train.py`` compiles with)."""
        if self.lowering is not None:
            return self.lowering()
        with self.tracing():
            return self.jitted.lower(*self.args)

    def model_flops(self) -> float | None:
        from ipadapter_jax.plan.figures import model_flops

        flops = model_flops(self.model_fn, self.model_args)
        if flops is not None and self.extra_model_flops is not None:
            flops += self.extra_model_flops()
        return flops


def train_program(config: Any, devices: list, configs: dict, latents: str = "online") -> Program:
    """``config``: a ``train.TrainConfig``; ``devices``: the slice's (compile-only) devices; ``configs``: the
    model config dicts (``reference_models.model_configs``)."""
    from ipadapter_jax.cache.batch import abstract_image_uncond, cached_frozen
    from ipadapter_jax.models.attention import resolve_attention_implementation
    from ipadapter_jax.plan.reference_models import abstract_frozen_models
    from ipadapter_jax.train.program import build_train_program, train_mesh
    from ipadapter_jax.train.setup import projection_config
    from ipadapter_jax.train.step import make_train_step

    if latents not in LATENT_PATHS:
        raise ValueError(f"latents={latents!r}: choose one of {LATENT_PATHS}")
    mesh = train_mesh(config, devices)
    m = config.model
    cached = latents == "cached"
    platform = devices[0].platform
    attention = resolve_attention_implementation(m.attention_implementation, platform)

    modules, frozen = abstract_frozen_models(configs, m.compute_dtype, attention, m.remat, platform)
    projection = projection_config(config, modules)
    if cached:
        frozen = cached_frozen(frozen, abstract_image_uncond(modules, projection.uses_hidden_states))
    program = build_train_program(config, mesh, modules, frozen, projection, cached_latents=cached)

    # The FLOPs an MFU is measured in: the same step without remat and with XLA attention, unsharded.
    model_modules, _ = abstract_frozen_models(configs, m.compute_dtype, "xla", False, platform)
    model_step = make_train_step(model_modules, program.tx, program.lr_schedule, program.settings)
    model_args = abstract_tree(program.args)

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


def _guided_unet_step(settings: GenerateSettings, weights: GenerateWeights, inputs: GenerateInputs, tokens, t):
    """One iteration of ``generate``'s loop body (the UNet on both halves and the guidance combination), on
    latents shaped like ``inputs.noise``."""
    variables = unet_variables(settings, weights, inputs.scales)
    return guided_prediction(settings, variables, [tokens], inputs, inputs.noise, t)


def sample_program(config: Any, devices: list, configs: dict, batch: int) -> Program:
    """``batch`` images per call (global, padded to the mesh as the pipeline pads it), guided (two UNet
    halves), one plain/Plus adapter from the config, inputs laid out by the pipeline's own
    ``sharded_batch.generate_input_shardings``."""
    from ipadapter_jax.models.adapter import new_ip_adapter
    from ipadapter_jax.models.attention import resolve_attention_implementation
    from ipadapter_jax.pipeline.sharded_batch import generate_input_shardings, padded_batch
    from ipadapter_jax.plan.reference_models import abstract_frozen_models
    from ipadapter_jax.train.config import resolve_mesh_shape
    from ipadapter_jax.train.setup import projection_config
    from ipadapter_jax.train.sharding import make_mesh, replicated, weight_shardings
    from ipadapter_jax.train.state import cross_attention_kv

    data, fsdp = resolve_mesh_shape(config.mesh, len(devices))
    if data * fsdp != len(devices):
        raise ValueError(f"sample: mesh data={data} x fsdp={fsdp} does not cover the {len(devices)} devices")
    mesh = make_mesh(data, fsdp, devices)
    batch = padded_batch(batch, mesh, config.mesh)
    m, v = config.model, config.validation
    platform = devices[0].platform
    attention = resolve_attention_implementation(m.attention_implementation, platform)

    modules, frozen = abstract_frozen_models(configs, m.compute_dtype, attention, False, platform)
    projection = projection_config(config, modules)
    kv = cross_attention_kv(modules.unet_config, frozen["unet"])
    adapter = jax.eval_shape(
        lambda kv: new_ip_adapter(modules.unet_config, kv, projection, jax.random.key(0)).params, kv)
    cfg = modules.unet_config
    sampler = make_sampler(v.sampler, modules.scheduler_config, v.num_inference_steps)
    side = config.data.resolution // modules.latent_downsample
    dtype = jnp.dtype(m.compute_dtype)
    f32 = jnp.float32
    num_layers = len(cfg.cross_attention_layers())
    feature_shape = ((2, modules.image_tokens, modules.image_hidden_dim) if projection.uses_hidden_states
                     else (2, modules.image_embed_dim))
    noise = jax.ShapeDtypeStruct((batch, side, side, cfg.in_channels), f32)
    context = jax.ShapeDtypeStruct((2 * batch, modules.text_length, cfg.cross_attention_dim), dtype)
    added = None
    if modules.is_sdxl:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": jax.ShapeDtypeStruct((2 * batch, pooled), dtype),
                 "time_ids": jax.ShapeDtypeStruct((2 * batch, 6), f32)}
    features = [jax.ShapeDtypeStruct(feature_shape, f32)]
    inputs = (noise, context, added, features)
    noise, context, added, features = abstract_tree(inputs, generate_input_shardings(mesh, config.mesh, *inputs))
    rep = replicated(mesh)
    weights = {"unet": frozen["unet"], "vae": frozen["vae"], "adapter": adapter}
    weights = abstract_tree(weights, weight_shardings(weights, mesh, config.mesh))
    abstract_sampler = abstract_tree(sampler, rep)
    scales = jax.ShapeDtypeStruct((1, num_layers), f32, sharding=rep)
    guidance = jax.ShapeDtypeStruct((), f32, sharding=rep)

    def settings_for(unet, vae) -> GenerateSettings:
        return GenerateSettings(unet, cfg, functools.partial(decode_latents, vae), (projection,), guided=True)

    settings = settings_for(modules.unet, modules.vae)
    jitted = jax.jit(functools.partial(generate, settings))
    args = (GenerateWeights(weights["unet"], weights["vae"], [weights["adapter"]]),
            GenerateInputs(noise, abstract_sampler, context, added, features, scales, guidance))

    model_modules, _ = abstract_frozen_models(configs, m.compute_dtype, "xla", False, platform)
    # Both the UNet's and the VAE decoder's attention in XLA: the model count lowers for CPU.
    model_settings = settings_for(model_modules.unet, model_modules.vae)
    model_fn = functools.partial(generate, model_settings)
    model_args = abstract_tree(args)

    # One more loop iteration, on its own, for what the cost model counts only once: the UNet and the
    # adapter layers, not the VAE, the projection net or the sampler's tables.
    tokens = jax.ShapeDtypeStruct((2 * batch, projection.num_tokens, cfg.cross_attention_dim), dtype)
    step_args = (GenerateWeights(weights["unet"], None, [{"layers": weights["adapter"]["layers"]}]),
                 GenerateInputs(noise, None, context, added, (), scales, guidance), abstract_tree(tokens, rep),
                 jax.ShapeDtypeStruct((), f32, sharding=rep))
    step = jax.jit(functools.partial(_guided_unet_step, settings))
    model_step = functools.partial(_guided_unet_step, model_settings)

    def extra_model_flops():
        from ipadapter_jax.plan.figures import model_flops

        return (v.num_inference_steps - 1) * (model_flops(model_step, abstract_tree(step_args)) or 0.0)

    description = [
        f"sample: generate() with {v.sampler} x {v.num_inference_steps} steps, guidance (2 UNet halves), "
        f"{batch} images of {config.data.resolution}px per call, one {projection.variant} adapter, "
        f"compute {m.compute_dtype}, attention {attention}",
        f"mesh data={data} x fsdp={fsdp}; loop body compiled once more on its own to count "
        f"{v.num_inference_steps - 1} further steps",
    ]
    return Program(name="sample", jitted=jitted, args=args, model_fn=model_fn, model_args=model_args,
                   images_per_step=batch, mesh_shape={"data": data, "fsdp": fsdp}, description=description,
                   tracing=lambda: jax.set_mesh(mesh), extra_model_flops=extra_model_flops, repeat_jitted=step,
                   repeat_args=step_args, repeat_count=v.num_inference_steps - 1)

