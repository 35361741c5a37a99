"""The frozen models of IP-Adapter training (UNet, VAE, text encoder(s), CLIP image encoder).

A base model folder has diffusers' layout: ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` (and
``text_encoder_2/ tokenizer_2/`` for SDXL, recognised by ``UNetConfig.is_sdxl``). The image encoder (a
transformers ``CLIPVisionModelWithProjection`` folder such as h94/IP-Adapter's ``models/image_encoder``) is
``model_dir/image_encoder`` unless given separately; CLIP preprocessing is chosen as the pipeline chooses it
(``conditioning.clip_processing_config``). What the step computes from these models is in
``ipadapter_jax.conditioning`` (text, image prompt) and ``encode_latents`` here (VAE).

Weights are read on the host in float32 (the adapter's paper initialisation copies the UNet's to_k/to_v
from these); ``FrozenModels.params_in(dtype)`` gives the tree to place on the devices in the compute dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.conditioning import clip_processing_config
from ipadapter_jax.data.clip_image_processing import ClipImageProcessingConfig
from ipadapter_jax.diffusion.noise_schedule import NoiseSchedule
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig, encode_to_latents
from ipadapter_jax.weights.load_clip import build_clip_text_encoder, build_clip_vision_encoder
from ipadapter_jax.weights.load_clip import load_clip_text_encoder, load_clip_vision_encoder
from ipadapter_jax.weights.load_unet import WEIGHTS_NAME, unet_param_shapes
from ipadapter_jax.weights.load_vae import rename_legacy_attention_keys, vae_param_shapes
from ipadapter_jax.weights.remote_files import local_folder
from ipadapter_jax.weights.safetensors_io import WeightFileError, read_json, read_model_folder
from ipadapter_jax.weights.torch_layout import torch_to_flax


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenModules:
    """The static half of the frozen models: modules and configs, closed over by the jitted step.

    ``text_encoder_2`` is None for SD1.5-style models. Module compute dtypes are set here; the params (the
    other half, a pytree passed to the step) are cast to the same dtype.
    """

    unet: UNet2DConditionModel
    unet_config: UNetConfig
    unet_raw_config: dict
    vae: AutoencoderKL
    vae_config: VAEConfig
    text_encoder: Any
    text_encoder_2: Any
    image_encoder: Any
    image_encoder_config: Any
    schedule: NoiseSchedule
    scheduler_config: dict
    clip_image_config: ClipImageProcessingConfig
    tokenizer_dir: str
    tokenizer_2_dir: str | None
    text_length: int

    @property
    def is_sdxl(self) -> bool:
        return self.unet_config.is_sdxl

    @property
    def text_encoders(self) -> tuple:
        """The text encoder modules in ``conditioning.TEXT_ENCODERS`` order: one for SD, two for SDXL."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def image_embed_dim(self) -> int:
        """Width of the plain adapter's input (``image_embeds``)."""
        return self.image_encoder_config.projection_dim

    @property
    def image_hidden_dim(self) -> int:
        """Width of the Plus adapter's input (penultimate hidden states)."""
        return self.image_encoder_config.hidden_size

    @property
    def image_tokens(self) -> int:
        return self.image_encoder_config.num_positions

    @property
    def clip_image_size(self) -> int:
        return self.image_encoder_config.image_size

    @property
    def latent_downsample(self) -> int:
        return self.vae_config.downsample_factor


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenModels:
    modules: FrozenModules
    host_params: dict  # {"unet", "vae", "text_encoder", ["text_encoder_2"], "image_encoder"}: float32 numpy

    def params_in(self, dtype: Any) -> dict:
        """The host param tree cast to ``dtype`` (numpy; bfloat16 through ml_dtypes)."""
        dtype = jnp.dtype(dtype)
        return jax.tree.map(lambda x: np.asarray(x).astype(dtype), self.host_params)


@contextlib.contextmanager
def _on_host():
    # Loaders return jax arrays; building them on the host CPU backend keeps a full-size model off the
    # first accelerator (it is sharded onto the mesh afterwards). Without a CPU backend, load as is.
    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        yield
        return
    with jax.default_device(cpu):
        yield


def _to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def image_encoder_folder(model_dir: Path, image_encoder_dir: str | Path | None) -> Path:
    """The local image encoder folder: ``image_encoder_dir`` (a URL is copied into the cache, listing the bucket
    once; callers that need the folder twice resolve it once and pass the result), else the model's own."""
    return local_folder(image_encoder_dir) if image_encoder_dir else Path(model_dir) / "image_encoder"


def load_frozen_models(model_dir: str | Path, image_encoder_dir: str | Path | None = None, *,
                       compute_dtype: Any = jnp.bfloat16, attention_implementation: str = "xla",
                       remat: bool = False, platform: str | None = None) -> FrozenModels:
    """Read every frozen model of ``model_dir`` (see module docstring) into float32 host arrays.
    ``platform``: of the devices the models will run on, for ``attention_implementation="auto"`` (default:
    the default backend's)."""
    model_dir = local_folder(model_dir)  # gs:// and other URLs: a cached local copy
    image_encoder_dir = image_encoder_folder(model_dir, image_encoder_dir)
    if not model_dir.is_dir():
        raise WeightFileError(f"model_dir {model_dir}: no such folder")
    with _on_host():
        unet_raw = read_json(model_dir / "unet" / "config.json")
        unet_config = UNetConfig.from_diffusers(unet_raw)
        unet_params = torch_to_flax(read_model_folder(model_dir / "unet", WEIGHTS_NAME),
                                    unet_param_shapes(unet_config), what=f"UNet at {model_dir / 'unet'}",
                                    dtype=np.float32)
        vae_config = VAEConfig.from_diffusers(read_json(model_dir / "vae" / "config.json"))
        vae_params = torch_to_flax(rename_legacy_attention_keys(read_model_folder(model_dir / "vae", WEIGHTS_NAME)),
                                   vae_param_shapes(vae_config), what=f"VAE at {model_dir / 'vae'}",
                                   dtype=np.float32)
        _, text_params, text_config = load_clip_text_encoder(model_dir / "text_encoder", "float32")
        params = {"unet": unet_params, "vae": vae_params, "text_encoder": _to_numpy(text_params)}
        text_2_config = None
        if unet_config.is_sdxl:
            _, text_2_params, text_2_config = load_clip_text_encoder(model_dir / "text_encoder_2", "float32")
            params["text_encoder_2"] = _to_numpy(text_2_params)
        _, image_params, image_config = load_clip_vision_encoder(image_encoder_dir, "float32")
        params["image_encoder"] = _to_numpy(image_params)
    with_projection = "visual_projection" in params["image_encoder"]
    if not with_projection:
        raise WeightFileError(f"{image_encoder_dir}: the image encoder has no visual_projection; IP-Adapter "
                              f"needs a CLIPVisionModelWithProjection")
    scheduler_config = read_json(model_dir / "scheduler" / "scheduler_config.json")
    clip_image_config = clip_processing_config(image_encoder_dir, image_config.image_size, base_dir=model_dir)
    if (clip_image_config.crop_height, clip_image_config.crop_width) != (image_config.image_size,) * 2:
        raise WeightFileError(f"{image_encoder_dir}: CLIP preprocessing crops to {clip_image_config.crop_height}x"
                              f"{clip_image_config.crop_width} but the encoder takes {image_config.image_size}px")
    modules = frozen_modules(
        unet_raw, vae_config, text_config, "text_projection" in params["text_encoder"], text_2_config, image_config,
        scheduler_config, clip_image_config, tokenizer_dir=str(model_dir / "tokenizer"),
        tokenizer_2_dir=str(model_dir / "tokenizer_2"), compute_dtype=compute_dtype,
        attention_implementation=attention_implementation, remat=remat, platform=platform)
    return FrozenModels(modules, params)


def frozen_modules(unet_raw: dict, vae_config: VAEConfig, text_config: Any, text_projection: bool,
                   text_2_config: Any, image_config: Any, scheduler_config: dict,
                   clip_image_config: ClipImageProcessingConfig, *, tokenizer_dir: str, tokenizer_2_dir: str,
                   compute_dtype: Any, attention_implementation: str, remat: bool,
                   platform: str | None = None) -> FrozenModules:
    """The modules of the frozen models from their configs (dicts or parsed configs), the one construction
    the trainer (``load_frozen_models``) and the plans (``plan.reference_models``) share, so both build the
    same step. ``text_2_config`` is None for SD1.5-style models. ``attention_implementation="auto"`` is
    resolved for ``platform`` (``models.attention.resolve_attention_implementation``)."""
    from ipadapter_jax.models.attention import resolve_attention_implementation

    dtype = jnp.dtype(compute_dtype)
    attention = resolve_attention_implementation(attention_implementation, platform or jax.devices()[0].platform)
    unet_config = UNetConfig.from_diffusers(unet_raw)
    text_encoder, text_config = build_clip_text_encoder(text_config, with_projection=text_projection, dtype=dtype)
    text_2 = None
    if text_2_config is not None:
        text_2 = build_clip_text_encoder(text_2_config, with_projection=True, dtype=dtype)[0]
    image_encoder, image_config = build_clip_vision_encoder(image_config, with_projection=True, dtype=dtype)
    return FrozenModules(
        unet=UNet2DConditionModel(unet_config, dtype=dtype, attention_implementation=attention, remat=remat),
        unet_config=unet_config, unet_raw_config=unet_raw,
        vae=AutoencoderKL(vae_config, attention_implementation=attention, dtype=dtype),
        vae_config=vae_config, text_encoder=text_encoder, text_encoder_2=text_2,
        image_encoder=image_encoder, image_encoder_config=image_config,
        schedule=NoiseSchedule.from_config(scheduler_config), scheduler_config=scheduler_config,
        clip_image_config=clip_image_config, tokenizer_dir=tokenizer_dir,
        tokenizer_2_dir=tokenizer_2_dir if text_2 is not None else None,
        text_length=text_config.max_position_embeddings,
    )


def encode_latents(modules: FrozenModules, params: dict, pixels: jax.Array, rng: jax.Array | None) -> jax.Array:
    """VAE input ``[B, R, R, 3]`` in [-1, 1] -> scaled latents ``[B, R/f, R/f, C]`` float32; a posterior
    sample when ``rng`` is given (the reference training script's ``latent_dist.sample()``), else the mean."""
    return encode_to_latents(modules.vae, params["vae"], pixels, rng, modules.vae_config)
