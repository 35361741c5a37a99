"""Command-line sampling: ``python sample.py --model DIR --ip-adapter FILE --image ref.png --prompt "..."``.

Writes ``OUT/000.png``, ``OUT/001.png``, ... (settings in each PNG's text metadata) and ``OUT/grid.png``.
With no ``--model`` it uses the built-in toy model (see ``ipadapter_jax/toy``) once that is present.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from ipadapter_jax.cli_errors import UserError, run_cli
from ipadapter_jax.compilation_cache import enable_compilation_cache
from ipadapter_jax.weights.remote_files import is_url


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="diffusers-format SD / SDXL folder (default: the built-in toy model)")
    p.add_argument("--ip-adapter", nargs="*", default=None, help="IP-Adapter file(s), published layout")
    p.add_argument("--image-encoder", nargs="+", default=None,
                   help="CLIPVisionModelWithProjection folder, or one per adapter (default: for each adapter, the "
                        "first whose width fits of MODEL/image_encoder, beside the adapter, h94's models/image_encoder)")
    p.add_argument("--image", nargs="*", default=None,
                   help="reference image(s), one per adapter that reads an image (FaceID-Plus: the face crop)")
    p.add_argument("--face-embeds", action="append", default=None, metavar="F.npy",
                   help="face embeddings for a FaceID adapter ([512] or [faces, 512] .npy, as python -m "
                        "ipadapter_jax.tools.face_embeds writes); repeat the flag or give a comma list, one per "
                        "FaceID adapter")
    p.add_argument("--lora-scale", type=float, default=1.0, help="FaceID LoRA weight")
    p.add_argument("--s-scale", type=float, default=None, help="FaceID-PlusV2 shortcut weight (default 1.0)")
    p.add_argument("--prompt", default="", help="text prompt ('' for image-only prompting)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--scale", type=float, default=0.6, help="IP-Adapter scale (lambda)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--scheduler", choices=["ddim", "euler", "dpm++2m", "pndm"], default=None,
                   help="sampler (default: the one the model's scheduler config names; SD1.5's is pndm)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", default="samples", help="output folder")
    return p


def default_model_paths() -> dict[str, str | list[str]]:
    """The built-in toy world's base model, adapter and example image, if present."""
    from ipadapter_jax import toy_assets

    return toy_assets.default_sampling_paths()


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def make_grid(images: Sequence[np.ndarray]) -> Image.Image:
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h, w = images[0].shape[:2]
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(to_pil(image), ((i % cols) * w, (i // cols) * h))
    return grid


def read_reference_images(paths: Sequence[str]) -> list[Image.Image]:
    """The reference images, decoded now: a missing or undecodable file is reported before the base model
    is loaded (which takes far longer than reading a picture)."""
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"--image {path}: no such file")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for a file that is not an image
            raise UserError(f"--image {path}: not an image PIL can read ({exc})") from exc
    return images


def face_embeds_paths(values: Sequence[str] | None) -> list[str]:
    """``--face-embeds`` as given (repeated, or comma lists) -> one path per FaceID adapter."""
    return [path for value in values or [] for path in value.split(",") if path]


def read_face_embeds_files(paths: Sequence[str]) -> list:
    """Each ``--face-embeds`` file read now, so that a missing or garbled one is reported before the base model
    is loaded (the shape is checked against its adapter by the pipeline)."""
    from ipadapter_jax.conditioning import load_face_embeds

    return [load_face_embeds(path, "--face-embeds") for path in paths]


def check_arguments(args: argparse.Namespace) -> None:
    """Values and paths that are wrong on their face, checked before anything is loaded or compiled."""
    for name in ("num_images", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value < 8:
            raise UserError(f"--{name}={value} must be at least 8")
    # URLs (gs://...) are checked when the loaders fetch them (remote_files: one line for a missing one).
    if not is_url(args.model) and not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: no such folder")
    for path in args.ip_adapter or []:
        if not is_url(path) and not Path(path).is_file():
            raise UserError(f"--ip-adapter {path}: no such file")
    for path in args.image_encoder or []:
        if not Path(path).is_dir():
            raise UserError(f"--image-encoder {path}: no such folder")
    check_adapters_fit_base(Path(args.model), args.ip_adapter or [])


def check_adapters_fit_base(model_dir: Path, adapter_paths: Sequence[str]) -> None:
    """Each adapter against the base's ``unet/config.json`` before the base's weights are read: an adapter
    made for another base (an SDXL adapter on SD1.5) fails in seconds, not after loading the model."""
    from ipadapter_jax.models.adapter import check_adapter_fits
    from ipadapter_jax.models.unet_config import UNetConfig
    from ipadapter_jax.weights.ip_adapter_file import load_ip_adapter
    from ipadapter_jax.weights.safetensors_io import read_json

    config_file = model_dir / "unet" / "config.json"
    if not adapter_paths or not config_file.is_file():
        return  # nothing to check, or not a diffusers folder: from_pretrained says what is missing
    unet_config = UNetConfig.from_diffusers(read_json(config_file))
    for path in adapter_paths:
        try:
            check_adapter_fits(unet_config, load_ip_adapter(path))
        except ValueError as exc:
            raise UserError(f"--ip-adapter {path} does not fit the base {model_dir}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.model is None:
        defaults = default_model_paths()
        args.model = defaults["model"]
        args.ip_adapter = args.ip_adapter or defaults.get("ip_adapter")
        args.image = args.image or defaults.get("image")
        print(f"no --model: the toy base {args.model}, adapter {args.ip_adapter}, image {args.image}", flush=True)
    check_arguments(args)
    images_in = read_reference_images(args.image or [])
    faces_in = read_face_embeds_files(face_embeds_paths(args.face_embeds))
    enable_compilation_cache()
    started = time.time()
    print(f"loading {args.model} ...", flush=True)
    from ipadapter_jax.pipeline import IPAdapterPipeline

    pipe = IPAdapterPipeline.from_pretrained(args.model, ip_adapter=args.ip_adapter or None,
                                             image_encoder=args.image_encoder, dtype=args.dtype)
    reference = None if not images_in else (images_in if len(images_in) > 1 else images_in[0])
    from ipadapter_jax.diffusion.samplers import describe_sampler

    print(describe_sampler(args.scheduler, pipe.base.scheduler_config, args.steps), flush=True)
    print(f"loaded in {time.time() - started:.1f}s; compiling and sampling {args.num_images} image(s), "
          f"{args.steps} steps (the first run compiles; later runs reuse the compilation cache) ...", flush=True)
    started = time.time()
    images = pipe(args.prompt, num_images_per_prompt=args.num_images, ip_adapter_image=reference, ip_scale=args.scale,
                  negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed,
                  scheduler=args.scheduler, ip_adapter_face_embeds=faces_in or None,
                  lora_scale=args.lora_scale, s_scale=args.s_scale)
    print(f"sampled in {time.time() - started:.1f}s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["face_embeds"] = face_embeds_paths(args.face_embeds) or None
    for i, image in enumerate(images):
        info = PngImagePlugin.PngInfo()
        info.add_text("ipadapter_jax", json.dumps({**settings, "index": i}))
        to_pil(image).save(out / f"{i:03d}.png", pnginfo=info)
    make_grid(list(images)).save(out / "grid.png")
    print(f"wrote {len(images)} image(s) and grid.png to {out}", flush=True)
    return out


def cli(argv: Sequence[str] | None = None) -> None:
    """The ``sample.py`` entry point: ``main`` with one-line errors (see ipadapter_jax.cli_errors)."""
    run_cli("sample.py", main, argv)
