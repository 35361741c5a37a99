"""Writing the toy base model as a diffusers ``StableDiffusionPipeline`` folder, plus the IP-Adapter image
encoder, exactly in the layout of the real checkpoints:

    model_index.json  scheduler/  tokenizer/  text_encoder/  unet/  vae/  image_encoder/  feature_extractor/

``feature_extractor/`` is the ``CLIPImageProcessor`` for the 32x32 image encoder (diffusers' pipelines and
ours preprocess IP-Adapter reference images with it). diffusers' ``StableDiffusionPipeline.from_pretrained``
loads the folder, image encoder included; so do ``IPAdapterPipeline.from_pretrained`` and the training code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ipadapter_jax.toy import transformers_folders as tf
from ipadapter_jax.toy.mini_clip import MiniClip
from ipadapter_jax.toy.tiny_unet import SCHEDULER_CONFIG, TinyUnet
from ipadapter_jax.toy.tiny_vae import TinyVae
from ipadapter_jax.weights.load_unet import save_unet
from ipadapter_jax.weights.load_vae import save_vae

DIFFUSERS_VERSION = "0.35.0"  # the oldest diffusers the test extras accept

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(tokenizer_dir: str | Path, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(Path(tokenizer_dir) / name, folder / name)
    return folder


def write_base_folder(folder: str | Path, tokenizer_dir: str | Path, clip: MiniClip, vae: TinyVae,
                      unet: TinyUnet) -> Path:
    """Write the whole diffusers folder; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "model_index.json", MODEL_INDEX)
    _write_json(folder / "scheduler" / "scheduler_config.json",
                {**SCHEDULER_CONFIG, "_diffusers_version": DIFFUSERS_VERSION})
    copy_tokenizer(tokenizer_dir, folder / "tokenizer")
    clip.save_text_encoder(folder / "text_encoder")
    clip.save_image_encoder(folder / "image_encoder")
    processor = {**tf.clip_image_processor_config(clip.vision_config["image_size"]),
                 "feature_extractor_type": "CLIPFeatureExtractor"}
    _write_json(folder / "feature_extractor" / "preprocessor_config.json", processor)
    save_vae(vae.config, vae.params, folder / "vae")
    save_unet(unet.params, unet.raw_config, folder / "unet")
    return folder


def write_clip_folder(folder: str | Path, tokenizer_dir: str | Path, clip: MiniClip) -> Path:
    """The full mini CLIP (``CLIPModel``) with its tokenizer and image processor: what evaluation loads."""
    folder = clip.save_clip_model(folder)
    copy_tokenizer(tokenizer_dir, folder)
    return folder
