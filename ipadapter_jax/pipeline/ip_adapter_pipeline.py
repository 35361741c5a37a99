"""``IPAdapterPipeline``: text + image-prompt generation from a diffusers-format SD / SDXL folder and
published-layout IP-Adapters, with the whole denoising loop compiled."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.diffusion.samplers import describe_sampler, from_diffusers_config, make_sampler
from ipadapter_jax.models.adapter import IPAdapter, check_adapter_fits
from ipadapter_jax.models.ip_scales import resolve_ip_scales
from ipadapter_jax.models.vae import decode_latents
from ipadapter_jax.conditioning import (face_prompt_features, image_prompt_features, prompt_conditioning,
                                        read_face_embeds)
from ipadapter_jax.models.image_projection import FACEID_PLUS
from ipadapter_jax.pipeline.components import BaseModel, ImageEncoder, load_base_model, load_image_encoder
from ipadapter_jax.pipeline.denoise import GenerateInputs, GenerateSettings, GenerateWeights, generate
from ipadapter_jax.pipeline.image_encoders import check_encoder_fits, image_encoder_dirs, takes_image
from ipadapter_jax.models.attention import resolve_attention_implementation
from ipadapter_jax.pipeline.sharded_batch import local_mesh, place_generate_inputs, place_replicated
from ipadapter_jax.train.config import MeshConfig
from ipadapter_jax.train.sharding import put_host_tree, weight_shardings
from ipadapter_jax.weights.ip_adapter_file import load_ip_adapter
from ipadapter_jax.weights.remote_files import local_file, local_folder

PathLike = str | os.PathLike
logger = logging.getLogger(__name__)


def _refuse_face_adapters(adapters: Sequence[IPAdapter], face_embeds: Any) -> None:
    """What the pipeline cannot run with FaceID adapters, one line each: no face embeddings given for them."""
    for adapter in adapters:
        if adapter.projection.uses_face_embeds and face_embeds is None:
            raise ValueError(f"a {adapter.variant} (FaceID) IP-Adapter takes face embeddings: pass "
                             f"ip_adapter_face_embeds= (sample.py --face-embeds F.npy), insightface's normed_embedding "
                             f"[{adapter.projection.embed_dim}] or [faces, {adapter.projection.embed_dim}] or a .npy "
                             f"file (python -m ipadapter_jax.tools.face_embeds), one per FaceID adapter")


def _per_adapter(value: Any, count: int, name: str) -> np.ndarray:
    """``[count]`` float32 from one number for every adapter or a list with one per adapter."""
    values = np.asarray(value, np.float32).reshape(-1)
    if values.size == 1:
        values = np.repeat(values, count)
    if values.shape != (count,) or not np.isfinite(values).all():
        raise ValueError(f"{name}: {value!r}; give a number, or a list with one per IP-Adapter ({count})")
    return values


class IPAdapterPipeline:
    """Stable Diffusion (1.x/2.x or XL) with zero or more IP-Adapters.

    ``pipe(prompt, ip_adapter_image=...)`` returns numpy float32 images ``(batch, height, width, 3)`` in
    [0, 1]. Image-only prompting, as in the paper: ``prompt=""``, ``ip_scale=1.0``.

    Sampling runs on every local device: a ``data`` x ``fsdp`` mesh over ``devices`` (default: all of this
    process's), the batch split over it (padded to a multiple of the device count and cut back), the UNet,
    VAE and adapter weights replicated, or split over ``fsdp`` devices when ``fsdp > 1`` (as in training).
    ``attention_implementation`` for the UNet and VAE decoder: ``"auto"`` (Pallas flash attention when the
    devices are TPUs, XLA elsewhere), ``"xla"``, ``"pallas"``, ...; resolved for the mesh's devices.
    """

    def __init__(self, base: BaseModel, adapters: Sequence[IPAdapter] = (),
                 image_encoder: ImageEncoder | Sequence[ImageEncoder] | None = None,
                 devices: Sequence[jax.Device] | None = None, fsdp: int = 1, attention_implementation: str = "auto"):
        for adapter in adapters:
            check_adapter_fits(base.unet_config, adapter)
        encoders = list(image_encoder) if isinstance(image_encoder, (list, tuple)) else [image_encoder] * len(adapters)
        if adapters and (len(encoders) != len(adapters)
                         or any(e is None and takes_image(a) for a, e in zip(adapters, encoders))):
            raise ValueError(f"{len(adapters)} IP-Adapters need an image encoder (image_encoder=DIR), or one per "
                             f"adapter")
        # Plain FaceID reads no image: its encoder, if any was given, is never used.
        encoders = [e if takes_image(a) else None for a, e in zip(adapters, encoders)]
        for i, (adapter, encoder) in enumerate(zip(adapters, encoders)):
            if encoder is not None:
                check_encoder_fits(adapter, encoder.encoder.config, f"IP-Adapter {i}")
        self.mesh = local_mesh(devices, fsdp)
        self.mesh_config = MeshConfig(data=self.mesh.shape["data"], fsdp=fsdp)
        # The denoising loop's weights live on the mesh once, not copied there on every call; the text and
        # image encoders run once per call and stay where they were loaded.
        place = lambda tree: put_host_tree(jax.device_get(tree), weight_shardings(tree, self.mesh, self.mesh_config))  # noqa: E731
        self.attention_implementation = resolve_attention_implementation(attention_implementation,
                                                                         self.mesh.devices.flat[0].platform)
        on_mesh = lambda part: dataclasses.replace(  # noqa: E731
            part, params=place(part.params),
            module=part.module.clone(attention_implementation=self.attention_implementation))
        base = dataclasses.replace(base, unet=on_mesh(base.unet), vae=on_mesh(base.vae))
        self.base = base
        self.adapters = [dataclasses.replace(a, params=place(a.params)) for a in adapters]
        self.image_encoders = encoders  # one per adapter (the same object where they share one)
        self.image_encoder = next((e for e in encoders if e is not None), None) if adapters else image_encoder
        vae = base.vae
        # One function object for the pipeline's lifetime: it is a static argument of the jitted loop.
        self._decode = functools.partial(_decode, vae.module)

    @classmethod
    def from_pretrained(cls, sd_dir: PathLike, ip_adapter: PathLike | Sequence[PathLike] | None = None,
                        image_encoder: PathLike | Sequence[PathLike] | None = None, dtype: str = "float32",
                        devices: Sequence[jax.Device] | None = None, fsdp: int = 1,
                        attention_implementation: str = "auto") -> "IPAdapterPipeline":
        """``sd_dir``: diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
        ``tokenizer/``, ``scheduler/``, and for SDXL ``text_encoder_2/``, ``tokenizer_2/``). ``ip_adapter``:
        one published-layout file or a list. ``image_encoder``: a transformers CLIPVisionModelWithProjection
        folder, or a list with one per adapter (a ViT-H and a bigG adapter together); when omitted, each
        adapter's is found where published layouts keep it, the first whose width fits the adapter (see
        ``pipeline/image_encoders.py``). ``dtype``: "float32" or "bfloat16". ``devices``, ``fsdp``,
        ``attention_implementation``: see the class docstring."""
        # gs:// and other URLs: cached local copies (see weights/remote_files.py).
        sd_dir = local_folder(sd_dir)
        specs = [] if ip_adapter is None else list(
            [ip_adapter] if isinstance(ip_adapter, (str, os.PathLike)) else ip_adapter)
        paths = [local_file(p) for p in specs]
        adapters = [load_ip_adapter(p) for p in paths]
        # Which encoder each adapter gets is settled from config files before any weights load.
        folders = image_encoder_dirs(image_encoder, sd_dir, specs, paths, adapters)
        base = load_base_model(sd_dir, dtype)
        loaded: dict[Path, ImageEncoder] = {}
        for folder in folders:
            if folder is not None and folder not in loaded:
                loaded[folder] = load_image_encoder(folder, dtype, base_folder=sd_dir)
        return cls(base, adapters, [loaded.get(f) for f in folders] or None, devices=devices, fsdp=fsdp,
                   attention_implementation=attention_implementation)

    def default_size(self) -> tuple[int, int]:
        size = self.base.unet_config.sample_size * self.base.vae_scale_factor
        return size, size

    def __call__(self, prompt: str | Sequence[str], ip_adapter_image: Any = None, ip_scale: Any = 0.6,
                 negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                 latents: Any = None, seed: int = 0, scheduler: str | None = None,
                 num_images_per_prompt: int = 1, ip_adapter_face_embeds: Any = None, lora_scale: Any = 1.0,
                 s_scale: Any = None) -> np.ndarray:
        """Generate ``num_images_per_prompt`` images per prompt, ``(len(prompts) * N, height, width, 3)``, each
        prompt's images together (as diffusers orders them).

        prompt: a string or a list (the batch). ip_adapter_image: one image (PIL or HWC array) for one adapter,
          or a list with one per adapter that reads an image (FaceID-Plus: the face crop; plain FaceID and
          Portrait read none); it conditions the whole batch. None, with no face embeddings: text only.
        ip_adapter_face_embeds: FaceID adapters: insightface's normed_embedding ``[512]``, ``[n, 512]`` (several
          faces of one person: Portrait) or a ``.npy`` path holding one; a list with one per FaceID adapter
          when several are loaded. The negative half is their projection of zero embeddings (FaceID-Plus: and
          of a zero image's hidden states), as h94's ``ip_adapter_faceid.py``.
        lora_scale: the FaceID LoRA's weight (h94's ``lora_scale``, diffusers' ``set_adapters`` weight), a
          number or one per adapter. s_scale: FaceID-PlusV2's shortcut weight (default 1.0). Both are data:
          changing them, like ``ip_scale``, does not recompile.
        ip_scale: a number, a per-block dict (see ``models/ip_scales.py``), or a list with one per adapter.
        latents: optional starting noise in diffusers' layout ``(batch * N, 4, height/8, width/8)``.
        scheduler: "ddim", "euler", "dpm++2m", "pndm", or None for the checkpoint's own scheduler config
          (SD1.5's is PNDM; a DDPM config samples with DDIM). Each call logs which one ran (INFO, this
          module's logger; ``describe_sampler``).
        """
        args, batch = self.generate_args(prompt, ip_adapter_image, ip_scale, negative_prompt, num_inference_steps,
                                         guidance_scale, height, width, latents, seed, scheduler,
                                         num_images_per_prompt, ip_adapter_face_embeds, lora_scale, s_scale)
        # Under the mesh: with Pallas attention (auto on TPU) the kernels run per device in a shard_map.
        with jax.set_mesh(self.mesh):
            return np.asarray(generate(*args), np.float32)[:batch]

    def generate_args(self, prompt, ip_adapter_image=None, ip_scale=0.6, negative_prompt=None,
                      num_inference_steps=50, guidance_scale=7.5, height=None, width=None, latents=None, seed=0,
                      scheduler=None, num_images_per_prompt=1, ip_adapter_face_embeds=None, lora_scale=1.0,
                      s_scale=None) -> tuple[tuple, int]:
        """The arguments ``pipeline.denoise.generate`` is called with, ``(settings, weights, inputs)`` (inputs
        placed on the mesh, the batch padded to a multiple of its devices), and the true batch size.
        ``generate.lower(*args)`` compiles what a call runs."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None if negative_prompt is None else (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt))
        if negatives is not None and len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        repeat = lambda items: [x for x in items for _ in range(int(num_images_per_prompt))]  # noqa: E731
        prompts, negatives = repeat(prompts), None if negatives is None else repeat(negatives)
        height, width = height or self.default_size()[0], width or self.default_size()[1]
        factor = self.base.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        guided = guidance_scale > 1.0
        sampler = (from_diffusers_config(self.base.scheduler_config, num_inference_steps) if scheduler is None
                   else make_sampler(scheduler, self.base.scheduler_config, num_inference_steps))
        logger.info(describe_sampler(scheduler, self.base.scheduler_config, num_inference_steps))

        shape = (len(prompts), height // factor, width // factor, self.base.unet_config.in_channels)
        if latents is None:
            noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        else:
            noise = jnp.transpose(jnp.asarray(np.asarray(latents), jnp.float32), (0, 2, 3, 1))
            if noise.shape != shape:
                raise ValueError(f"latents must be (batch, 4, h/8, w/8) = {(shape[0], shape[3], *shape[1:3])}, "
                                 f"got {tuple(np.shape(latents))}")

        base = self.base
        context, added = prompt_conditioning(
            [e.module for e in base.text_encoders], base.text_params, base.tokenizers, prompts, negatives, guided,
            height, width, zeros_for_empty_negative=base.is_sdxl and base.force_zeros_for_empty_prompt)
        adapters, features = self._image_conditioning(ip_adapter_image, ip_adapter_face_embeds, guided)
        scales = resolve_ip_scales(self.base.unet_config, ip_scale, len(adapters)) if adapters else np.zeros((0, 0))
        lora_scales = _per_adapter(lora_scale, len(self.adapters), "lora_scale")[:len(adapters)]
        if s_scale is not None and not any(a.variant == FACEID_PLUS and a.projection.shortcut for a in self.adapters):
            raise ValueError("s_scale is FaceID-PlusV2's shortcut weight, and no PlusV2 adapter is loaded")
        shortcut_scales = _per_adapter(1.0 if s_scale is None else s_scale, len(self.adapters),
                                       "s_scale")[:len(adapters)]
        noise, context, added, features, batch = place_generate_inputs(
            self.mesh, self.mesh_config, noise, context, added, features, 2 if guided else 1)
        scales, sampler, guidance, lora_scales, shortcut_scales = place_replicated(
            (np.asarray(scales, np.float32), sampler, np.asarray(guidance_scale, np.float32), lora_scales,
             shortcut_scales), self.mesh)
        settings = GenerateSettings(self.base.unet.module, self.base.unet_config, self._decode,
                                    tuple(a.projection for a in adapters), guided)
        weights = GenerateWeights(self.base.unet.params, self.base.vae.params, [a.params for a in adapters])
        inputs = GenerateInputs(noise, sampler, context, added, features, scales, guidance, lora_scales,
                                shortcut_scales)
        return (settings, weights, inputs), batch

    def _image_conditioning(self, ip_adapter_image, face_embeds, guided: bool):
        """Per adapter, its projection's input for one prompt (``[copies, ...]``, negative first when guided):
        the image encoder's features, face embeddings, or FaceID-Plus's (face embeddings, crop features)."""
        if (ip_adapter_image is None and face_embeds is None) or not self.adapters:
            return [], []
        _refuse_face_adapters(self.adapters, face_embeds)
        faces = iter(self._face_embeds(face_embeds))
        readers = [a for a in self.adapters if takes_image(a)]
        images = ([] if ip_adapter_image is None else list(ip_adapter_image)
                  if isinstance(ip_adapter_image, (list, tuple)) else [ip_adapter_image])
        if len(images) != len(readers):
            which = "" if len(readers) == len(self.adapters) else " that read an image (FaceID-Plus: the face crop)"
            raise ValueError(f"{len(images)} reference images for {len(readers)} IP-Adapters{which}: give one per "
                             f"adapter")
        images = iter(images)
        features = []
        for adapter, encoder in zip(self.adapters, self.image_encoders):
            clip = None if encoder is None else image_prompt_features(
                encoder.encoder.module, encoder.encoder.params, encoder.processing, [next(images)],
                adapter.projection.uses_hidden_states, guided)
            if not adapter.projection.uses_face_embeds:
                features.append(clip)
                continue
            face = face_prompt_features(next(faces), guided)
            if adapter.variant == FACEID_PLUS and face.ndim == 3:
                raise ValueError(f"a FaceID-Plus IP-Adapter takes one face embedding with its face crop, got "
                                 f"{face.shape[1]} faces (several faces of one person: the Portrait adapter)")
            features.append((face, clip) if adapter.variant == FACEID_PLUS else face)
        return self.adapters, features

    def _face_embeds(self, face_embeds) -> list[np.ndarray]:
        """One ``[n, E]`` array per FaceID adapter, from ``ip_adapter_face_embeds`` (see ``__call__``)."""
        takers = [a for a in self.adapters if a.projection.uses_face_embeds]
        if face_embeds is None:
            return []
        if not takers:
            raise ValueError("ip_adapter_face_embeds given, but no FaceID IP-Adapter is loaded")
        given = list(face_embeds) if isinstance(face_embeds, (list, tuple)) else [face_embeds]
        if len(given) != len(takers):
            raise ValueError(f"{len(given)} face embeddings for {len(takers)} FaceID IP-Adapters: give one per "
                             f"FaceID adapter (a list when several are loaded)")
        return [read_face_embeds(value, adapter.projection.embed_dim, f"face embeddings of FaceID adapter {i}")
                for i, (value, adapter) in enumerate(zip(given, takers))]


def _decode(vae_module, vae_params, latents):
    return decode_latents(vae_module, vae_params, latents)
