"""Loading the frozen parts of a diffusers-format Stable Diffusion folder (SD1.x/2.x or SDXL) and the
IP-Adapter image encoder, each through its own Flax loader."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from ipadapter_jax.conditioning import TEXT_ENCODERS, TOKENIZERS, clip_processing_config, text_encoder_names
from ipadapter_jax.data.clip_image_processing import ClipImageProcessingConfig
from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.weights.load_clip import load_clip_text_encoder, load_clip_vision_encoder
from ipadapter_jax.weights.load_unet import load_unet
from ipadapter_jax.weights.load_vae import load_vae
from ipadapter_jax.weights.safetensors_io import WeightFileError, read_json

# The diffusers pipeline classes whose folders this loads (SD 1.x/2.x, SDXL); which of the two a folder is,
# its UNet config says (``UNetConfig.is_sdxl``).
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
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
    def is_sdxl(self) -> bool:
        return self.unet_config.is_sdxl

    @property
    def text_params(self) -> dict:
        """The text encoders' params by ``conditioning.TEXT_ENCODERS`` name."""
        return dict(zip(TEXT_ENCODERS, [e.params for e in self.text_encoders]))

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
    """Read ``model_index.json`` (a pipeline class this loads), then each component folder."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise WeightFileError(f"{folder}/model_index.json: _class_name {index.get('_class_name')!r} is not one of "
                              f"{sorted(PIPELINE_CLASSES)}")
    dtype = resolve_dtype(dtype)
    unet = Encoder(*load_unet(folder / "unet", dtype))
    names = text_encoder_names(unet.config.is_sdxl)
    return BaseModel(
        folder=folder,
        unet=unet,
        vae=Encoder(*load_vae(folder / "vae", dtype)),
        text_encoders=[Encoder(*load_clip_text_encoder(folder / n, dtype)) for n in names],
        tokenizers=[CaptionTokenizer(folder / t) for t in TOKENIZERS[:len(names)]],
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", unet.config.is_sdxl)),
    )


def load_image_encoder(folder: str | Path, dtype: Any = "float32", base_folder: Path | None = None) -> ImageEncoder:
    """The CLIP image encoder and its preprocessing (``conditioning.clip_processing_config``: the base
    model's ``feature_extractor/``, else the encoder folder's, else diffusers' default)."""
    encoder = Encoder(*load_clip_vision_encoder(Path(folder), resolve_dtype(dtype)))
    return ImageEncoder(encoder, clip_processing_config(folder, encoder.config.image_size, base_dir=base_folder))
