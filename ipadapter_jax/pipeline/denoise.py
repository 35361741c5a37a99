"""The whole text+image-to-image generation as one jitted function: project the image prompt, run every
sampler step with classifier-free guidance under ``lax.fori_loop``, decode with the VAE.

Nothing here depends on how inputs were encoded, so the pipeline, the training loop's validation grids,
the sampler plan and benchmarks share it. ``generate(settings, weights, inputs)`` takes three things:

- ``GenerateSettings``: what the program is compiled for (modules, adapter projections, guidance on/off).
  Frozen and hashed: a new value compiles a new program.
- ``GenerateWeights``: the UNet's, the VAE decoder's and the adapters' params (placed once, reused).
- ``GenerateInputs``: the per-call arrays (noise, sampler, conditioning, scales, guidance scale).

A new generation mode (ControlNet residuals, an img2img start step, inpainting masks, IP-Adapter attention
masks, per-step scale schedules) adds a field to the settings (static: the extra module or option, defaulting
to off) and/or to the inputs (arrays, defaulting to None), and reads them in ``guided_prediction`` or
``generate``; the signature, and every caller that does not use the mode, stay as they are.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.diffusion.samplers import sample_loop
from ipadapter_jax.models.adapter import adapter_variables
from ipadapter_jax.models.image_projection import FACEID_PLUS, ProjectionConfig, projection_module
from ipadapter_jax.models.unet_config import UNetConfig


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """The static half of a generation: part of the compiled program's cache key, so every field is hashable
    and compared by value (keep one ``decode`` object for a pipeline's lifetime: functions compare by
    identity).

    unet: the UNet module (its dtype is the compute dtype); unet_config: its config.
    decode: ``(decoder_params, latents) -> images in [-1, 1]``.
    projections: one ``ProjectionConfig`` per IP-Adapter, in the order of ``GenerateWeights.adapters``.
    guided: classifier-free guidance (conditioning carries a negative half first).
    """

    unet: nn.Module
    unet_config: UNetConfig
    decode: Callable[[Any, jax.Array], jax.Array]
    projections: tuple[ProjectionConfig, ...] = ()
    guided: bool = True

    @property
    def copies(self) -> int:
        """UNet batch halves per latent: negative and positive when guided."""
        return 2 if self.guided else 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateWeights:
    """unet: UNet params; decoder: what ``settings.decode`` takes; adapters: per adapter
    ``{"image_proj": ..., "layers": [...]}`` (``IPAdapter.params``; FaceID files add their ``"lora"``, which
    then runs on the UNet's attentions in the same loop)."""

    unet: Any
    decoder: Any
    adapters: Sequence[Any] = ()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateInputs:
    """The per-call arrays.

    noise: ``[B, h, w, C]`` unit-variance starting latents (NHWC).
    sampler: the sampler state (``diffusion.samplers``: timesteps and coefficients as arrays).
    context, added_cond: text conditioning, ``[copies * B, T, C]`` (negative half first when guided), and
      SDXL's ``{"text_embeds", "time_ids"}`` likewise (None for SD).
    image_features: per adapter, the input its projection net takes, negative half first when guided (zero
      embedding / zero-image hidden states; FaceID: zero face embeddings), batch ``copies`` (one reference for
      the whole batch) or ``copies * B``: the encoder's features, FaceID's face embeddings ``[., E]`` or
      ``[., n, E]``, or FaceID-Plus's pair ``(face embeddings, face-crop hidden states)``.
    scales: ``[num_adapters, num_cross_attention_layers]`` IP-Adapter scales.
    guidance_scale: scalar float32.
    lora_scales: ``[num_adapters]`` weights of the FaceID adapters' LoRAs (entries of adapters without one are
      unused); None for 1.
    shortcut_scales: ``[num_adapters]`` FaceID-PlusV2's ``s_scale`` (used for adapters whose projection has
      ``shortcut``); None for 1.
    """

    noise: jax.Array
    sampler: Any
    context: jax.Array
    added_cond: dict | None = None
    image_features: Sequence[jax.Array] = ()
    scales: jax.Array | None = None
    guidance_scale: jax.Array | None = None
    lora_scales: jax.Array | None = None
    shortcut_scales: jax.Array | None = None


def unet_variables(settings: GenerateSettings, weights: GenerateWeights, scales: jax.Array | None,
                   lora_scales: jax.Array | None = None) -> dict:
    """The UNet's variables: its params, plus the adapters' ``ip_adapter`` / ``ip_scale`` collections (and the
    FaceID LoRAs at ``lora_scales``, data: a new weight is no new program)."""
    variables = {"params": weights.unet}
    if settings.projections:
        variables.update(adapter_variables(settings.unet_config, [p["layers"] for p in weights.adapters], scales,
                                           [p.get("lora") for p in weights.adapters], lora_scales))
    return variables


def image_tokens(settings: GenerateSettings, weights: GenerateWeights, inputs: GenerateInputs) -> list[jax.Array]:
    """Each adapter's image tokens ``[copies * B, num_tokens, C]`` in the compute dtype."""
    dtype = settings.unet.dtype or jnp.float32
    batch = inputs.noise.shape[0]
    tokens = []
    for a, (projection, params, features) in enumerate(zip(settings.projections, weights.adapters,
                                                           inputs.image_features)):
        features = jax.tree.map(lambda f: f.astype(jnp.float32), features)
        extra = ()
        if projection.variant == FACEID_PLUS:  # PlusV2's shortcut weight as data; v1 runs without one
            extra = (None if not projection.shortcut or inputs.shortcut_scales is None
                     else inputs.shortcut_scales[a],)
        t = projection_module(projection).apply({"params": params["image_proj"]}, features, *extra)
        if t.shape[0] == settings.copies:  # one reference image (per half) conditions the whole batch
            t = jnp.repeat(t, batch, axis=0)
        tokens.append(t.astype(dtype))
    return tokens


def guided_prediction(settings: GenerateSettings, variables: dict, tokens: Sequence[jax.Array],
                      inputs: GenerateInputs, latents: jax.Array, t: jax.Array) -> jax.Array:
    """One step's model output for ``latents [B, h, w, C]`` at timestep ``t``: the UNet on every half, then
    classifier-free guidance. The loop body of ``generate`` (and what the sampler plan compiles once more)."""
    dtype = settings.unet.dtype or jnp.float32
    x = jnp.concatenate([latents] * settings.copies).astype(dtype)
    out = settings.unet.apply(variables, x, jnp.broadcast_to(t, (x.shape[0],)), inputs.context.astype(dtype),
                              inputs.added_cond, image_tokens=list(tokens)).astype(jnp.float32)
    if settings.guided:
        uncond, cond = jnp.split(out, 2)
        out = uncond + inputs.guidance_scale * (cond - uncond)
    return out


@functools.partial(jax.jit, static_argnames=("settings",))
def generate(settings: GenerateSettings, weights: GenerateWeights, inputs: GenerateInputs) -> jax.Array:
    """Images ``[B, H, W, 3]`` in [0, 1] (float32)."""
    variables = unet_variables(settings, weights, inputs.scales, inputs.lora_scales)
    tokens = image_tokens(settings, weights, inputs)
    denoise = functools.partial(guided_prediction, settings, variables, tokens, inputs)
    latents = sample_loop(inputs.sampler, denoise, inputs.noise.astype(jnp.float32))
    images = settings.decode(weights.decoder, latents)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
