"""The frozen models of a training config as modules plus abstract weights (``jax.ShapeDtypeStruct``), built
from model configs alone: what a memory / cost plan compiles against, with no weights on disk.

Configs come from the training config's ``model_dir`` when its ``*/config.json`` files exist there (only the
JSON is read), else from the published configs shipped in ``ipadapter_jax/reference_configs`` for the base
model: ``sd15`` (Stable Diffusion 1.5) or ``sdxl`` (SDXL base 1.0); the image encoder is h94's CLIP ViT-H/14
(``image_encoder``) unless the config's ``image_encoder_dir`` (or, with no ``image_encoder_dir``,
``model_dir/image_encoder``) holds a ``config.json``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ipadapter_jax.data.clip_image_processing import ClipImageProcessingConfig
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.models.vae import VAEConfig
from ipadapter_jax.weights.load_clip import init_clip_text_encoder, init_clip_vision_encoder
from ipadapter_jax.weights.load_unet import unet_param_shapes
from ipadapter_jax.weights.load_vae import vae_param_shapes

BASES = ("sd15", "sdxl")
# Published config files per base model; SDXL's VAE has SD1.5's architecture (only scaling_factor differs,
# which no shape or cost depends on) and SDXL's scheduler the same betas.
_REFERENCE_FILES = {
    "sd15": {"unet": "sd15_unet.json", "vae": "sd15_vae.json", "text_encoder": "sd15_text_encoder.json",
             "scheduler": "sd15_scheduler.json"},
    "sdxl": {"unet": "sdxl_unet.json", "vae": "sd15_vae.json", "text_encoder": "sd15_text_encoder.json",
             "text_encoder_2": "sdxl_text_encoder_2.json", "scheduler": "sd15_scheduler.json"},
}
_IMAGE_ENCODER_FILE = "ip_adapter_image_encoder_vit_h14.json"
_FOLDER_FILES = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
                 "text_encoder_2": "text_encoder_2/config.json", "scheduler": "scheduler/scheduler_config.json"}


def _reference(name: str) -> dict:
    return json.loads(resources.files("ipadapter_jax.reference_configs").joinpath(name).read_text())


def guess_base(model_dir: str) -> str:
    """``sdxl`` when the folder's UNet config has SDXL's text_time embedding or its name says XL, else ``sd15``."""
    unet = Path(model_dir) / _FOLDER_FILES["unet"]
    if unet.is_file():
        return "sdxl" if UNetConfig.from_diffusers(json.loads(unet.read_text())).is_sdxl else "sd15"
    return "sdxl" if "xl" in Path(model_dir).name.lower() else "sd15"


def model_configs(base: str, model_dir: str = "", image_encoder_dir: str = "") -> tuple[dict, str]:
    """``({"unet", "vae", "text_encoder", ["text_encoder_2"], "scheduler", "image_encoder"}: config dicts,
    where they came from)``."""
    if base not in BASES:
        raise ValueError(f"base model {base!r}: choose one of {BASES}")
    folder = Path(model_dir) if model_dir else None
    from_folder = folder is not None and (folder / _FOLDER_FILES["unet"]).is_file()
    configs = {}
    for part, name in _REFERENCE_FILES[base].items():
        configs[part] = (json.loads((folder / _FOLDER_FILES[part]).read_text()) if from_folder
                         else _reference(name))
    # As the trainer finds it (train.frozen.image_encoder_folder): the named folder, else the model's own.
    encoder_dir = Path(image_encoder_dir) if image_encoder_dir else folder / "image_encoder" if from_folder else None
    encoder = encoder_dir / "config.json" if encoder_dir is not None else None
    configs["image_encoder"] = (json.loads(encoder.read_text()) if encoder is not None and encoder.is_file()
                                else _reference(_IMAGE_ENCODER_FILE))
    source = f"config.json files in {folder}" if from_folder else f"published {base} configs (reference_configs/)"
    return configs, source


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), tree)


def abstract_frozen_models(configs: dict, compute_dtype: str, attention_implementation: str, remat: bool,
                           platform: str = "tpu"):
    """``(FrozenModules, abstract frozen params)`` as ``train.frozen.load_frozen_models`` would build them (the
    same ``frozen_modules`` construction), the params as ``ShapeDtypeStruct`` in ``compute_dtype`` (the tree
    the train step takes). ``platform``: of the devices planned for (``"auto"`` attention is resolved for it)."""
    from ipadapter_jax.train.frozen import frozen_modules

    dtype = jnp.dtype(compute_dtype)
    unet_config = UNetConfig.from_diffusers(configs["unet"])
    vae_config = VAEConfig.from_diffusers(configs["vae"])
    _, text_params = init_clip_text_encoder(configs["text_encoder"], dtype=dtype, shapes_only=True)
    params = {"unet": _cast(unet_param_shapes(unet_config), dtype),
              "vae": _cast(vae_param_shapes(vae_config), dtype),
              "text_encoder": text_params}
    sdxl = unet_config.is_sdxl
    if sdxl:
        _, params["text_encoder_2"] = init_clip_text_encoder(configs["text_encoder_2"], with_projection=True,
                                                             dtype=dtype, shapes_only=True)
    image_module, params["image_encoder"] = init_clip_vision_encoder(configs["image_encoder"], with_projection=True,
                                                                     dtype=dtype, shapes_only=True)
    size = image_module.config.image_size
    modules = frozen_modules(
        configs["unet"], vae_config, configs["text_encoder"], "text_projection" in text_params,
        configs["text_encoder_2"] if sdxl else None, image_module.config, configs["scheduler"],
        ClipImageProcessingConfig(shortest_edge=size, crop_height=size, crop_width=size), tokenizer_dir="",
        tokenizer_2_dir="", compute_dtype=dtype, attention_implementation=attention_implementation, remat=remat,
        platform=platform)
    return modules, params
