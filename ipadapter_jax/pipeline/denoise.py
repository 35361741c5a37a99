"""The whole text+image-to-image generation as one jitted function: project the image prompt, run every
sampler step with classifier-free guidance under ``lax.fori_loop``, decode with the VAE.

Nothing here depends on how inputs were encoded, so the pipeline, the training loop's validation grids and
benchmarks share it.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.diffusion.samplers import sample_loop
from ipadapter_jax.models.adapter import adapter_variables
from ipadapter_jax.models.image_projection import ProjectionConfig, projection_module
from ipadapter_jax.models.unet_config import UNetConfig


@functools.partial(jax.jit, static_argnames=("unet", "unet_config", "projections", "guided", "decode"))
def generate(
    unet: nn.Module,
    unet_config: UNetConfig,
    projections: tuple[ProjectionConfig, ...],
    guided: bool,
    decode: Any,
    unet_params: Any,
    decoder_params: Any,
    adapter_params: Sequence[Any],
    scales: jax.Array,
    sampler: Any,
    noise: jax.Array,
    context: jax.Array,
    added_cond: dict | None,
    image_features: Sequence[jax.Array],
    guidance_scale: jax.Array,
) -> jax.Array:
    """Images ``[B, H, W, 3]`` in [0, 1] (float32).

    noise: ``[B, h, w, 4]`` unit-variance starting latents (NHWC).
    context, added_cond: text conditioning, ``[2B, T, C]`` negative half first when ``guided``, else ``[B, ...]``.
    image_features: per adapter, the encoder output the projection net takes, negative half first when
      ``guided`` (zero embedding / zero-image hidden states), batch 1 or full batch.
    scales: ``[num_adapters, num_cross_attention_layers]``.
    decode: ``latents -> images in [-1, 1]`` given ``decoder_params`` (static; hashable).
    """
    dtype = unet.dtype or jnp.float32
    batch = noise.shape[0]
    copies = 2 if guided else 1
    tokens = []
    for projection, params, features in zip(projections, adapter_params, image_features):
        t = projection_module(projection).apply({"params": params["image_proj"]}, features.astype(jnp.float32))
        if t.shape[0] == copies:  # one reference image (per half) conditions the whole batch
            t = jnp.repeat(t, batch, axis=0)
        tokens.append(t.astype(dtype))
    variables = {"params": unet_params}
    if projections:
        variables.update(adapter_variables(unet_config, [p["layers"] for p in adapter_params], scales))

    def denoise(latents, t):
        x = jnp.concatenate([latents] * copies).astype(dtype)
        out = unet.apply(variables, x, jnp.broadcast_to(t, (x.shape[0],)), context.astype(dtype), added_cond,
                         image_tokens=tokens).astype(jnp.float32)
        if guided:
            uncond, cond = jnp.split(out, 2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    latents = sample_loop(sampler, denoise, noise.astype(jnp.float32))
    images = decode(decoder_params, latents)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
