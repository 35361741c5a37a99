"""A tiny random base model and tiny synthetic shards, so that training runs end to end on a laptop CPU.

Stand-in until a trained toy model ships (a later issue replaces this module): everything is generated
deterministically from a seed, nothing is downloaded.

``write_tiny_model(folder, seed, arch)`` writes a diffusers-layout folder read by the normal loader
(``frozen.load_frozen_models``), so the tiny run exercises the same code path as SD1.5 / SDXL:
  unet/ vae/ text_encoder/ tokenizer/ [text_encoder_2/ tokenizer_2/ for sdxl] scheduler/ image_encoder/
The weights are random (flax initialisers); the VAE's ``scaling_factor`` is set so the latents of the
synthetic images have unit standard deviation, as the diffusion process assumes.

``write_shape_shards(folder, ...)`` writes webdataset shards of coloured shapes on a coloured background
with captions "a red circle": the caption names the shape and its colour, while the background colour,
position and size are only in the image, so an image prompt carries information the text does not.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from ipadapter_jax.data.synthetic import write_tar, write_tiny_clip_tokenizer
from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.diffusion.noise_schedule import NoiseSchedule
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL, VAEConfig, encode_to_latents
from ipadapter_jax.train.tiny_pretrain import pretrain_unet
from ipadapter_jax.weights.load_clip import build_clip_text_encoder, init_clip_text_encoder, init_clip_vision_encoder
from ipadapter_jax.weights.load_unet import save_unet, unet_param_shapes
from ipadapter_jax.weights.load_vae import save_vae, vae_param_shapes
from ipadapter_jax.weights.safetensors_io import write_safetensors
from ipadapter_jax.weights.torch_layout import flax_to_torch

TEXT_LENGTH = 77  # CLIP's caption length, which the pipeline's tokenizers assume
IMAGE_ENCODER_SIZE = 32  # the tiny CLIP image encoder's input side
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square", "triangle")
PRETRAIN_STEPS = 300  # text-conditioned UNet training steps (see tiny_pretrain)
PRETRAIN_IMAGES = 512  # synthetic images the UNet is pretrained on
MARKER = "tiny_world.json"  # written last: a folder without it is incomplete and is rebuilt

TINY_UNET = {
    "sd15": dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, layers_per_block=1,
                 attention_head_dim=4, norm_num_groups=8, sample_size=8),
    "sdxl": dict(block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=48, layers_per_block=1,
                 attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8, norm_num_groups=8, sample_size=8),
}
TINY_VAE = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, latent_channels=4, norm_num_groups=8,
                sample_size=64)
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def _text_config(vocab_size: int, hidden: int, projection: int, with_projection: bool) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "vocab_size": vocab_size, "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_attention_heads": 2, "num_hidden_layers": 2,
            "max_position_embeddings": TEXT_LENGTH, "hidden_act": "quick_gelu", "projection_dim": projection,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def _vision_config(projection: int) -> dict:
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
            "image_size": IMAGE_ENCODER_SIZE, "patch_size": 8, "num_channels": 3, "hidden_act": "quick_gelu",
            "projection_dim": projection}


def _clip_preprocessor_config() -> dict:
    return {"do_resize": True, "size": {"shortest_edge": IMAGE_ENCODER_SIZE}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": IMAGE_ENCODER_SIZE, "width": IMAGE_ENCODER_SIZE},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def random_params(shapes: dict, rng: np.random.Generator) -> dict:
    """float32 numpy params for a tree of ``ShapeDtypeStruct``: kernels ``N(0, 1/fan_in)``, norm scales 1,
    biases 0, embeddings ``N(0, 0.02)``. Drawn with numpy so that no initialiser has to be compiled (a
    jitted UNet init alone takes tens of seconds to compile on a small CPU)."""
    def draw(path, leaf):
        name, shape = path[-1].key, tuple(leaf.shape)
        if name == "scale":
            return np.ones(shape, np.float32)
        if name == "bias":
            return np.zeros(shape, np.float32)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def _write_tokenizer(folder: Path) -> str:
    """The data package's tiny CLIP BPE vocabulary, plus the ``tokenizer_config.json`` a diffusers tokenizer
    folder has (so transformers' ``CLIPTokenizer`` pads and truncates to 77 like SD's)."""
    write_tiny_clip_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": TEXT_LENGTH, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return str(folder)


def _write_transformers_folder(folder: Path, config: dict, params: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.astype(np.float32) for k, v in flax_to_torch(params).items()}
    write_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _vae_scaling_factor(config: VAEConfig, params: dict, images: np.ndarray) -> float:
    """1 / std of the (unscaled) latents of ``images``, so scaled latents have unit variance."""
    module = AutoencoderKL(config)
    unscaled = VAEConfig(**{**config.__dict__, "scaling_factor": 1.0})
    latents = jax.jit(lambda p, x: encode_to_latents(module, p, x, None, unscaled))(params, jnp.asarray(images))
    return float(1.0 / np.std(np.asarray(latents)))


def write_tiny_model(folder: str | os.PathLike, seed: int = 0, arch: str = "sd15",
                     pretrain_steps: int = PRETRAIN_STEPS) -> Path:
    """A tiny diffusers-layout base model (plus ``image_encoder/``) in ``folder``; returns the folder.

    Random encoders and VAE; the sd15 UNet gets ``pretrain_steps`` of text-conditioned diffusion training
    on synthetic shapes (see ``tiny_pretrain``), the sdxl one stays random (it only serves shape checks).
    Deterministic in the arguments; reuses a complete folder written earlier with the same ones."""
    folder = Path(folder)
    marker = {"seed": seed, "arch": arch, "pretrain_steps": pretrain_steps, "version": 7}
    if (folder / MARKER).is_file() and json.loads((folder / MARKER).read_text()) == marker:
        return folder
    if arch not in TINY_UNET:
        raise ValueError(f"tiny world arch {arch!r}: choose one of {sorted(TINY_UNET)}")
    rng = np.random.default_rng(seed)

    tokenizer_dir = _write_tokenizer(folder / "tokenizer")
    vocab_size = len(json.loads((Path(tokenizer_dir) / "vocab.json").read_text()))
    unet_raw = TINY_UNET[arch]
    cross = unet_raw["cross_attention_dim"]
    if arch == "sd15":
        text_configs = [("text_encoder", _text_config(vocab_size, cross, cross, False))]
    else:
        pooled = unet_raw["projection_class_embeddings_input_dim"] - 6 * unet_raw["addition_time_embed_dim"]
        text_configs = [("text_encoder", _text_config(vocab_size, 16, 16, False)),
                        ("text_encoder_2", _text_config(vocab_size, cross - 16, pooled, True))]
        _write_tokenizer(folder / "tokenizer_2")
    text_params = []
    for name, config in text_configs:
        _, shapes = init_clip_text_encoder(config, shapes_only=True)
        text_params.append(random_params(shapes, rng))
        _write_transformers_folder(folder / name, config, text_params[-1])

    vision = _vision_config(projection=32)
    _, shapes = init_clip_vision_encoder(vision, shapes_only=True)
    _write_transformers_folder(folder / "image_encoder", vision, random_params(shapes, rng))
    (folder / "image_encoder" / "preprocessor_config.json").write_text(json.dumps(_clip_preprocessor_config()))

    vae_config = VAEConfig.from_diffusers(TINY_VAE)
    vae_params = random_params(vae_param_shapes(vae_config), rng)
    # A trained VAE's posterior is narrow; a random one's is wider than its mean's spread, which would bury
    # the images in sampling noise. Pin the log-variance at the clamp's floor (posterior std ~ 3e-7).
    latent = vae_config.latent_channels
    vae_params["quant_conv"]["kernel"][..., latent:] = 0.0
    vae_params["quant_conv"]["bias"][latent:] = -30.0
    probe = np.stack([np.asarray(_shape_image(64, 64, np.random.default_rng(i))[0], np.float32) / 127.5 - 1
                      for i in range(16)])
    vae_config = VAEConfig(**{**vae_config.__dict__, "scaling_factor": _vae_scaling_factor(vae_config, vae_params, probe)})
    save_vae(vae_config, vae_params, folder / "vae")

    unet_config = UNetConfig.from_diffusers(unet_raw)
    unet_params = random_params(unet_param_shapes(unet_config), rng)
    if arch == "sd15" and pretrain_steps:
        unet_params = _pretrained_unet(folder, unet_config, unet_params, vae_config, vae_params, text_params[0],
                                       text_configs[0][1], pretrain_steps, seed)
    save_unet(unet_params, unet_raw, folder / "unet")

    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    pipeline = "StableDiffusionPipeline" if arch == "sd15" else "StableDiffusionXLPipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (folder / MARKER).write_text(json.dumps(marker))
    return folder


def _pretrained_unet(folder: Path, unet_config: UNetConfig, unet_params: dict, vae_config: VAEConfig,
                     vae_params: dict, text_params: dict, text_config: dict, steps: int, seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    images, captions = zip(*(_shape_image(64, 64, rng) for _ in range(PRETRAIN_IMAGES)))
    pixels = np.stack([np.asarray(im, np.float32) / 127.5 - 1 for im in images])
    tokenizer = CaptionTokenizer(folder / "tokenizer", max_length=TEXT_LENGTH)
    text_module = build_clip_text_encoder(text_config)[0]
    encode_text = jax.jit(lambda ids: text_module.apply({"params": text_params}, ids,
                                                        output_hidden_states=False).last_hidden_state)
    latents = jax.jit(lambda x: encode_to_latents(AutoencoderKL(vae_config), vae_params, x, None, vae_config))(pixels)
    schedule = NoiseSchedule.from_config(SCHEDULER)
    return pretrain_unet(UNet2DConditionModel(unet_config), unet_params, np.asarray(latents),
                         np.asarray(encode_text(tokenizer(list(captions)))), np.asarray(encode_text(tokenizer([""])))[0],
                         schedule, steps=steps, seed=seed)


def _shape_image(width: int, height: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    size = int(rng.uniform(0.3, 0.7) * side)
    left = int(rng.integers(0, width - size + 1))
    top = int(rng.integers(0, height - size + 1))
    box = (left, top, left + size, top + size)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(left + size // 2, top), (left, top + size), (left + size, top + size)], fill=COLOURS[colour])
    return image, f"a {colour} {shape}"


def shape_samples(count: int, seed: int, prefix: str) -> list[tuple[str, bytes]]:
    """``count`` samples as tar members ``(name, bytes)``: ``<key>.png`` and ``<key>.txt``."""
    rng = np.random.default_rng(seed)
    members = []
    for i in range(count):
        width, height = int(rng.integers(64, 97)), int(rng.integers(64, 97))
        image, caption = _shape_image(width, height, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        key = f"{prefix}{i:05d}"
        members += [(f"{key}.png", buffer.getvalue()), (f"{key}.txt", caption.encode())]
    return members


def write_shape_shards(folder: str | os.PathLike, num_shards: int = 8, samples_per_shard: int = 32,
                       seed: int = 0, heldout_samples: int = 64) -> str:
    """``folder/train-{00000..N-1}.tar`` and ``folder/heldout-00000.tar``; returns the training shard spec
    (a brace pattern). Existing complete shards from the same arguments are reused."""
    folder = Path(folder)
    marker = {"num_shards": num_shards, "samples_per_shard": samples_per_shard, "seed": seed,
              "heldout_samples": heldout_samples, "version": 1}
    spec = str(folder / f"train-{{00000..{num_shards - 1:05d}}}.tar")
    if (folder / MARKER).is_file() and json.loads((folder / MARKER).read_text()) == marker:
        return spec
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        write_tar(folder / f"train-{s:05d}.tar", shape_samples(samples_per_shard, seed * 1000 + s, f"s{s:03d}_"))
    write_tar(folder / "heldout-00000.tar", shape_samples(heldout_samples, seed * 1000 + 999, "heldout_"))
    (folder / MARKER).write_text(json.dumps(marker))
    return spec


def heldout_shard(folder: str | os.PathLike) -> str:
    return str(Path(folder) / "heldout-00000.tar")
