"""Writing a diffusers pipeline folder (SD or SDXL) with the IP-Adapter image encoder, from Flax params, in the
layout of the published checkpoints:

    model_index.json  scheduler/  tokenizer/  text_encoder/  [tokenizer_2/  text_encoder_2/]  unet/  vae/
    image_encoder/  feature_extractor/

``feature_extractor/`` (and ``image_encoder/preprocessor_config.json``) hold the ``CLIPImageProcessor`` for
the image encoder's input size: diffusers' pipelines and ours preprocess image prompts with it. diffusers'
``DiffusionPipeline.from_pretrained`` loads the folder, image encoder included; so do
``IPAdapterPipeline.from_pretrained`` and the trainer. The one writer of such folders: the toy world's build
(trained weights) and the random test and benchmark models (``ipadapter_jax.testing``) both use it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from ipadapter_jax.atomic_files import write_atomic
from ipadapter_jax.conditioning import TEXT_ENCODERS, TOKENIZERS
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.models.vae import VAEConfig
from ipadapter_jax.weights.load_unet import save_unet
from ipadapter_jax.weights.load_vae import save_vae
from ipadapter_jax.weights.transformers_folders import clip_image_processor_config, write_transformers_folder

DIFFUSERS_VERSION = "0.35.0"  # the oldest diffusers the test extras accept
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(tokenizer_dir: str | Path, folder: str | Path) -> Path:
    """The CLIP tokenizer files of ``tokenizer_dir`` into ``folder`` (nothing to do when they are the same)."""
    folder = Path(folder)
    if folder.resolve() == Path(tokenizer_dir).resolve():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(tokenizer_dir) / name, folder / name)
    return folder


def write_image_encoder_folder(folder: str | Path, config: dict, params: Any) -> Path:
    """A ``CLIPVisionModelWithProjection`` folder with the ``preprocessor_config.json`` of its input size (as
    h94's ``models/image_encoder`` has)."""
    folder = write_transformers_folder(folder, config, params)
    _write_json(folder / "preprocessor_config.json", clip_image_processor_config(config["image_size"]))
    return folder


def model_index(sdxl: bool) -> dict:
    """``model_index.json``: the pipeline class and each component's library and class."""
    text = {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if sdxl:
        text.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                    tokenizer_2=["transformers", "CLIPTokenizer"])
        extra = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}
    else:
        extra = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                 "safety_checker": [None, None]}
    return {**extra, "_diffusers_version": DIFFUSERS_VERSION, **text,
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def write_pipeline_folder(folder: str | Path, *, unet: tuple[dict, Any], vae: tuple[VAEConfig, Any],
                          text_encoders: Sequence[tuple[dict, Any]], tokenizer_dir: str | Path,
                          scheduler_config: dict, image_encoder: tuple[dict, Any]) -> Path:
    """Write the whole folder; returns it.

    unet: (diffusers ``unet/config.json`` dict, Flax params); vae: (``VAEConfig``, Flax params).
    text_encoders: (transformers config dict, Flax params) per encoder, one for SD, two for SDXL (which the
      UNet config says); the first is a ``CLIPTextModel``, SDXL's second a ``CLIPTextModelWithProjection``.
    tokenizer_dir: a CLIP tokenizer folder, copied for every text encoder.
    scheduler_config: a ``DDIMScheduler`` config dict. image_encoder: a ``CLIPVisionModelWithProjection``'s.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sdxl = UNetConfig.from_diffusers(unet[0]).is_sdxl
    if len(text_encoders) != (2 if sdxl else 1):
        raise ValueError(f"{len(text_encoders)} text encoders for an {'SDXL' if sdxl else 'SD'} UNet")
    _write_json(folder / "model_index.json", model_index(sdxl))
    _write_json(folder / "scheduler" / "scheduler_config.json",
                {"_class_name": "DDIMScheduler", **scheduler_config, "_diffusers_version": DIFFUSERS_VERSION})
    for name, tokenizer, (config, params) in zip(TEXT_ENCODERS, TOKENIZERS, text_encoders):
        copy_tokenizer(tokenizer_dir, folder / tokenizer)
        write_transformers_folder(folder / name, config, params)
    processor = json.loads((write_image_encoder_folder(folder / "image_encoder", *image_encoder)
                            / "preprocessor_config.json").read_text())
    _write_json(folder / "feature_extractor" / "preprocessor_config.json",
                {**processor, "feature_extractor_type": "CLIPFeatureExtractor"})
    save_vae(vae[0], vae[1], folder / "vae")
    save_unet(unet[1], unet[0], folder / "unet")
    return folder
