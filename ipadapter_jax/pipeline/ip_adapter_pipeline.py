"""``IPAdapterPipeline``: text + image-prompt generation from a diffusers-format SD / SDXL folder and
published-layout IP-Adapters, with the whole denoising loop compiled."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.diffusion.samplers import from_diffusers_config, make_sampler
from ipadapter_jax.models.adapter import IPAdapter, check_adapter_fits
from ipadapter_jax.models.ip_scales import resolve_ip_scales
from ipadapter_jax.models.vae import decode_latents
from ipadapter_jax.pipeline.components import BaseModel, ImageEncoder, load_base_model, load_image_encoder
from ipadapter_jax.pipeline.conditioning import as_image_list, encode_image_prompt, encode_text, pil_or_array
from ipadapter_jax.pipeline.denoise import generate
from ipadapter_jax.weights.ip_adapter_file import load_ip_adapter
from ipadapter_jax.weights.remote_files import is_url, local_file, local_folder
from ipadapter_jax.weights.safetensors_io import WeightFileError

PathLike = str | os.PathLike


def _find_image_encoder(sd_dir: Path, adapter_paths: Sequence[Path], adapter_urls: Sequence[str] = ()) -> Path | None:
    """Where published layouts keep it: ``<sd_dir>/image_encoder`` or ``image_encoder/`` beside the adapter
    file (h94's ``models/image_encoder``)."""
    for candidate in [sd_dir / "image_encoder"] + [p.parent / "image_encoder" for p in adapter_paths]:
        if (candidate / "config.json").is_file():
            return candidate
    for adapter in adapter_urls:  # beside an adapter at a URL: copied only when it is there
        try:
            return local_folder(adapter.rsplit("/", 1)[0] + "/image_encoder")
        except WeightFileError:
            continue
    return None


class IPAdapterPipeline:
    """Stable Diffusion (1.x/2.x or XL) with zero or more IP-Adapters.

    ``pipe(prompt, ip_adapter_image=...)`` returns numpy float32 images ``(batch, height, width, 3)`` in
    [0, 1]. Image-only prompting, as in the paper: ``prompt=""``, ``ip_scale=1.0``.
    """

    def __init__(self, base: BaseModel, adapters: Sequence[IPAdapter] = (), image_encoder: ImageEncoder | None = None):
        for adapter in adapters:
            check_adapter_fits(base.unet_config, adapter)
        if adapters and image_encoder is None:
            raise ValueError("IP-Adapters need an image encoder (image_encoder=DIR)")
        self.base = base
        self.adapters = list(adapters)
        self.image_encoder = image_encoder
        vae = base.vae
        # One function object for the pipeline's lifetime: it is a static argument of the jitted loop.
        self._decode = functools.partial(_decode, vae.module)

    @classmethod
    def from_pretrained(cls, sd_dir: PathLike, ip_adapter: PathLike | Sequence[PathLike] | None = None,
                        image_encoder: PathLike | None = None, dtype: str = "float32") -> "IPAdapterPipeline":
        """``sd_dir``: diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
        ``tokenizer/``, ``scheduler/``, and for SDXL ``text_encoder_2/``, ``tokenizer_2/``). ``ip_adapter``:
        one published-layout file or a list. ``image_encoder``: a transformers CLIPVisionModelWithProjection
        folder (found beside the adapter or in ``sd_dir`` when omitted). ``dtype``: "float32" or "bfloat16"."""
        # gs:// and other URLs: cached local copies (see weights/remote_files.py).
        sd_dir = local_folder(sd_dir)
        specs = [] if ip_adapter is None else list(
            [ip_adapter] if isinstance(ip_adapter, (str, os.PathLike)) else ip_adapter)
        paths = [local_file(p) for p in specs]
        base = load_base_model(sd_dir, dtype)
        adapters = [load_ip_adapter(p) for p in paths]
        encoder = None
        if adapters:
            folder = local_folder(image_encoder) if image_encoder is not None else _find_image_encoder(
                sd_dir, paths, [str(p) for p in specs if is_url(p)])
            if folder is None:
                raise FileNotFoundError("no image encoder: pass image_encoder=DIR (a CLIPVisionModelWithProjection "
                                        "folder), or put it in <sd_dir>/image_encoder")
            encoder = load_image_encoder(folder, dtype, base_folder=sd_dir)
        return cls(base, adapters, encoder)

    def default_size(self) -> tuple[int, int]:
        size = self.base.unet_config.sample_size * self.base.vae_scale_factor
        return size, size

    def __call__(self, prompt: str | Sequence[str], ip_adapter_image: Any = None, ip_scale: Any = 0.6,
                 negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                 latents: Any = None, seed: int = 0, scheduler: str | None = None) -> np.ndarray:
        """Generate one image per prompt.

        prompt: a string or a list (the batch). ip_adapter_image: one image (PIL or HWC array) for one adapter,
          or a list with one per adapter; it conditions the whole batch. None: text only.
        ip_scale: a number, a per-block dict (see ``models/ip_scales.py``), or a list with one per adapter.
        latents: optional starting noise in diffusers' layout ``(batch, 4, height/8, width/8)``.
        scheduler: "ddim", "euler", "dpm++2m", or None for the checkpoint's own scheduler config.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None if negative_prompt is None else (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt))
        if negatives is not None and len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        height, width = height or self.default_size()[0], width or self.default_size()[1]
        factor = self.base.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        guided = guidance_scale > 1.0
        sampler = (from_diffusers_config(self.base.scheduler_config, num_inference_steps) if scheduler is None
                   else make_sampler(scheduler, self.base.scheduler_config, num_inference_steps))

        shape = (len(prompts), height // factor, width // factor, self.base.unet_config.in_channels)
        if latents is None:
            noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        else:
            noise = jnp.transpose(jnp.asarray(np.asarray(latents), jnp.float32), (0, 2, 3, 1))
            if noise.shape != shape:
                raise ValueError(f"latents must be (batch, 4, h/8, w/8) = {(shape[0], shape[3], *shape[1:3])}, "
                                 f"got {tuple(np.shape(latents))}")

        context, added = encode_text(self.base, prompts, negatives, guided, height, width)
        adapters, features = self._image_conditioning(ip_adapter_image, guided)
        scales = resolve_ip_scales(self.base.unet_config, ip_scale, len(adapters)) if adapters else np.zeros((0, 0))
        images = generate(
            self.base.unet.module, self.base.unet_config, tuple(a.projection for a in adapters), guided,
            self._decode, self.base.unet.params, self.base.vae.params, [a.params for a in adapters],
            jnp.asarray(scales, jnp.float32), sampler, noise, context, added, features,
            jnp.asarray(guidance_scale, jnp.float32))
        return np.asarray(images, np.float32)

    def _image_conditioning(self, ip_adapter_image, guided: bool):
        if ip_adapter_image is None or not self.adapters:
            return [], []
        images = as_image_list(ip_adapter_image)
        if len(images) != len(self.adapters):
            raise ValueError(f"{len(images)} reference images for {len(self.adapters)} IP-Adapters: give one per "
                             f"adapter")
        features = [encode_image_prompt(self.image_encoder, adapter.projection, [pil_or_array(image)], guided)
                    for adapter, image in zip(self.adapters, images)]
        return self.adapters, features


def _decode(vae_module, vae_params, latents):
    return decode_latents(vae_module, vae_params, latents)
