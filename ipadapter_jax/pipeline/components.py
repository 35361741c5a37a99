"""Loading the frozen parts of a diffusers-format Stable Diffusion folder (SD1.x/2.x or SDXL) and the
IP-Adapter image encoder, each through its own Flax loader."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from ipadapter_jax.data.clip_image_processing import ClipImageProcessingConfig
from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.weights.load_clip import load_clip_text_encoder, load_clip_vision_encoder
from ipadapter_jax.weights.load_unet import load_unet
from ipadapter_jax.weights.load_vae import load_vae
from ipadapter_jax.weights.safetensors_io import WeightFileError, read_json

SD, SDXL = "sd", "sdxl"
_KINDS = {"StableDiffusionPipeline": SD, "StableDiffusionXLPipeline": SDXL}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Encoder:
    """A Flax module with its params and config."""

    module: Any
    params: Any
    config: Any


@dataclasses.dataclass
class BaseModel:
    """The frozen Stable Diffusion parts. ``text_encoders``/``tokenizers`` have one entry for SD, two for
    SDXL (CLIP ViT-L then OpenCLIP bigG, as diffusers orders them)."""

    kind: str
    folder: Path
    unet: Encoder
    vae: Encoder
    text_encoders: list[Encoder]
    tokenizers: list[CaptionTokenizer]
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool

    @property
    def unet_config(self) -> UNetConfig:
        return self.unet.config

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor


@dataclasses.dataclass
class ImageEncoder:
    encoder: Encoder
    processing: ClipImageProcessingConfig


def resolve_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def load_base_model(folder: str | Path, dtype: Any = "float32") -> BaseModel:
    """Read ``model_index.json`` to tell SD from SDXL, then each component folder."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    kind = _KINDS.get(index.get("_class_name"))
    if kind is None:
        raise WeightFileError(f"{folder}/model_index.json: _class_name {index.get('_class_name')!r} is not one of "
                              f"{sorted(_KINDS)}")
    dtype = resolve_dtype(dtype)
    names = ["text_encoder"] + (["text_encoder_2"] if kind == SDXL else [])
    tokenizers = ["tokenizer"] + (["tokenizer_2"] if kind == SDXL else [])
    return BaseModel(
        kind=kind,
        folder=folder,
        unet=Encoder(*load_unet(folder / "unet", dtype)),
        vae=Encoder(*load_vae(folder / "vae", dtype)),
        text_encoders=[Encoder(*load_clip_text_encoder(folder / n, dtype)) for n in names],
        tokenizers=[CaptionTokenizer(folder / t) for t in tokenizers],
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", kind == SDXL)),
    )


def load_image_encoder(folder: str | Path, dtype: Any = "float32", base_folder: Path | None = None) -> ImageEncoder:
    """The CLIP image encoder and its preprocessing: the base model's ``feature_extractor/`` when it has one
    (as diffusers' pipelines use), else the encoder folder's ``preprocessor_config.json``, else diffusers'
    default (``CLIPImageProcessor`` at the encoder's image size)."""
    folder = Path(folder)
    encoder = Encoder(*load_clip_vision_encoder(folder, resolve_dtype(dtype)))
    candidates = ([base_folder / "feature_extractor"] if base_folder else []) + [folder]
    for candidate in candidates:
        if (candidate / "preprocessor_config.json").is_file():
            processing = ClipImageProcessingConfig.from_dict(read_json(candidate / "preprocessor_config.json"))
            break
    else:
        size = encoder.config.image_size
        processing = ClipImageProcessingConfig(shortest_edge=size, crop_height=size, crop_width=size)
    return ImageEncoder(encoder, processing)
