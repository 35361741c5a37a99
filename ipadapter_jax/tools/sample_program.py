"""The sampler of a config as a program to compile for a TPU slice: ``pipeline.denoise.generate`` (project the
image prompt, every sampler step with classifier-free guidance under ``fori_loop``, VAE decode) on abstract
weights, with the config's validation settings (sampler, steps, guidance) at its training resolution.

The text and image encoders run once per call outside ``generate`` and are not part of the plan. XLA's cost
model counts a loop body once, so the plan also compiles one guided UNet step on its own and adds
``steps - 1`` of it to the time and FLOPs of ``generate``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ipadapter_jax.diffusion.samplers import make_sampler
from ipadapter_jax.models.vae import decode_latents
from ipadapter_jax.pipeline.denoise import (GenerateInputs, GenerateSettings, GenerateWeights, generate,
                                            guided_prediction, unet_variables)
from ipadapter_jax.tools.plan_program import Program, unsharded, with_shardings


def _decode(vae_module, vae_params, latents):
    return decode_latents(vae_module, vae_params, latents)


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
    from ipadapter_jax.train.config import resolve_mesh_shape
    from ipadapter_jax.train.setup import projection_config
    from ipadapter_jax.train.sharding import make_mesh, replicated, weight_shardings
    from ipadapter_jax.train.state import cross_attention_kv
    from ipadapter_jax.tools.reference_models import abstract_frozen_models

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
    noise, context, added, features = with_shardings(inputs, generate_input_shardings(mesh, config.mesh, *inputs))
    rep = replicated(mesh)
    weights = {"unet": frozen["unet"], "vae": frozen["vae"], "adapter": adapter}
    weights = with_shardings(weights, weight_shardings(weights, mesh, config.mesh))
    abstract_sampler = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=rep),
                                    sampler)
    scales = jax.ShapeDtypeStruct((1, num_layers), f32, sharding=rep)
    guidance = jax.ShapeDtypeStruct((), f32, sharding=rep)

    def settings_for(unet, vae) -> GenerateSettings:
        return GenerateSettings(unet, cfg, functools.partial(_decode, vae), (projection,), guided=True)

    settings = settings_for(modules.unet, modules.vae)
    jitted = jax.jit(functools.partial(generate, settings))
    args = (GenerateWeights(weights["unet"], weights["vae"], [weights["adapter"]]),
            GenerateInputs(noise, abstract_sampler, context, added, features, scales, guidance))

    model_modules, _ = abstract_frozen_models(configs, m.compute_dtype, "xla", False, platform)
    # Both the UNet's and the VAE decoder's attention in XLA: the model count lowers for CPU.
    model_settings = settings_for(model_modules.unet, model_modules.vae)
    model_fn = functools.partial(generate, model_settings)
    model_args = unsharded(args)

    # One more loop iteration, on its own, for what the cost model counts only once: the UNet and the
    # adapter layers, not the VAE, the projection net or the sampler's tables.
    tokens = jax.ShapeDtypeStruct((2 * batch, projection.num_tokens, cfg.cross_attention_dim), dtype)
    step_args = (GenerateWeights(weights["unet"], None, [{"layers": weights["adapter"]["layers"]}]),
                 GenerateInputs(noise, None, context, added, (), scales, guidance), with_shardings(tokens, rep),
                 jax.ShapeDtypeStruct((), f32, sharding=rep))
    step = jax.jit(functools.partial(_guided_unet_step, settings))
    model_step = functools.partial(_guided_unet_step, model_settings)

    def extra_model_flops():
        from ipadapter_jax.tools.plan_figures import model_flops

        return (v.num_inference_steps - 1) * (model_flops(model_step, unsharded(step_args)) or 0.0)

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

