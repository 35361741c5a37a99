"""``python -m ipadapter_jax.evaluate``: the paper's CLIP-I / CLIP-T protocol, written to a JSON report.

With no arguments: the toy base, the latest trained (or shipped) toy adapter, the toy held-out references
and the mini CLIP as judge. For a real run, e.g.::

    python -m ipadapter_jax.evaluate --model sd15/ --ip-adapter ip-adapter_sd15.safetensors \\
        --clip clip-vit-large-patch14/ --coco-captions annotations/captions_val2017.json \\
        --coco-images val2017/ --num-references 2000 --out eval.json

(``--coco-tfds`` reads the images through TFDS' ``coco/2017`` instead of ``--coco-images``.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_TOY_REFERENCES = 64


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ipadapter_jax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="diffusers-format SD / SDXL folder (default: the built-in toy base)")
    p.add_argument("--ip-adapter", help="IP-Adapter file (default with the toy base: the trained or shipped one)")
    p.add_argument("--image-encoder", help="CLIPVisionModelWithProjection folder (default: MODEL/image_encoder "
                                           "or beside the adapter)")
    p.add_argument("--clip", help="transformers CLIPModel folder that judges CLIP-I / CLIP-T (default with the "
                                  "toy base: the toy mini CLIP; the paper used CLIP ViT-L/14)")
    data = p.add_argument_group("references (default: the toy held-out set)")
    data.add_argument("--shards", help="webdataset shards (image + txt/json caption)")
    data.add_argument("--coco-captions", help="COCO captions_val2017.json: evaluate on COCO-2017 validation")
    data.add_argument("--coco-images", help="the unpacked val2017/ image folder")
    data.add_argument("--coco-tfds", action="store_true", help="read COCO-2017 images through TFDS (coco/2017)")
    data.add_argument("--tfds-data-dir", default=None, help="TFDS data_dir")
    data.add_argument("--reference", nargs="+", default=None, help="reference image file(s) instead")
    data.add_argument("--reference-caption", default="", help="caption of the --reference image(s)")
    data.add_argument("--num-references", type=int, default=None,
                      help=f"references used (default: all; {DEFAULT_TOY_REFERENCES} for the toy set)")
    g = p.add_argument_group("generation")
    g.add_argument("--scales", type=float, nargs="+", default=[1.0], help="IP-Adapter scales (lambda) to run")
    g.add_argument("--images-per-reference", type=int, default=4)
    g.add_argument("--prompt", default="", help="text prompt ('' = image prompt only, the paper's protocol)")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", default="evaluation.json", help="JSON report (written by process 0)")
    pod = p.add_argument_group("several processes (a TPU pod): references split over processes, one report")
    pod.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")
    pod.add_argument("--coordinator-address", default="", help="host:port of process 0, outside TPU pods")
    pod.add_argument("--num-processes", type=int, default=0, help="number of processes (with --coordinator-address)")
    pod.add_argument("--process-id", type=int, default=-1, help="this process's index (with --coordinator-address)")
    p.add_argument("--grid", help="also write a PNG: per scale, each reference followed by its generations "
                                  "(first 8 references)")
    return p


def _references(args):
    from ipadapter_jax.evaluate import references as refs

    n = args.num_references
    if args.reference:
        return "reference images", refs.file_references(args.reference, args.reference_caption)
    if args.coco_captions:
        if args.coco_tfds:
            return "coco2017 (tfds)", refs.coco_tfds_references(args.coco_captions, n, args.tfds_data_dir)
        if not args.coco_images:
            raise SystemExit("--coco-captions needs --coco-images DIR (val2017/) or --coco-tfds")
        return "coco2017", refs.coco_folder_references(args.coco_images, args.coco_captions, n)
    if args.shards:
        return args.shards, refs.shard_references(args.shards, n)
    return "toy held-out", refs.toy_references(n or DEFAULT_TOY_REFERENCES)


def _resolve_models(args) -> None:
    from ipadapter_jax import toy_assets

    if args.model is None:
        defaults = toy_assets.default_sampling_paths()
        args.model = defaults["model"]
        if args.ip_adapter is None:
            if "ip_adapter" not in defaults:
                raise SystemExit("no toy IP-Adapter found: train one (python train.py) or pass --ip-adapter FILE")
            args.ip_adapter = defaults["ip_adapter"][0]
        if args.clip is None:
            args.clip = str(toy_assets.ASSETS / "clip")
    if args.ip_adapter is None:
        raise SystemExit("--ip-adapter FILE is required with --model")
    if args.clip is None:
        raise SystemExit("--clip DIR (a transformers CLIPModel folder, e.g. openai/clip-vit-large-patch14) is "
                         "required with --model")


def write_grid(result_images, references, path, per_scale_labels) -> None:
    from ipadapter_jax.toy.text_to_image_check import image_grid

    rows = []
    for images in result_images:
        for ref, generated in list(zip(references, images))[:8]:
            ref_image = np.asarray(ref.image, np.float32) / 255.0
            if ref_image.shape != generated.shape[1:]:
                from PIL import Image

                h, w = generated.shape[1:3]
                ref_image = np.asarray(Image.fromarray(ref.image).resize((w, h)), np.float32) / 255.0
            rows.append(np.concatenate([ref_image[None], generated]))
    image_grid(rows).save(path)


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import jax

    if args.coordinator_address:
        jax.distributed.initialize(args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()
    from ipadapter_jax.compilation_cache import enable_compilation_cache

    enable_compilation_cache()
    _resolve_models(args)
    from ipadapter_jax.evaluate.clip_scorer import ClipScorer
    from ipadapter_jax.evaluate.protocol import run_protocol
    from ipadapter_jax.pipeline import IPAdapterPipeline

    started = time.time()
    data_name, references = _references(args)
    if not references:
        raise SystemExit("no references to evaluate on")
    print(f"{len(references)} references from {data_name}; loading {args.model} ...", flush=True)
    pipe = IPAdapterPipeline.from_pretrained(args.model, ip_adapter=args.ip_adapter,
                                             image_encoder=args.image_encoder, dtype=args.dtype)
    scorer = ClipScorer(args.clip)
    report = run_protocol(pipe, scorer, references, args.scales, keep_images=bool(args.grid),
                          images_per_reference=args.images_per_reference, prompt=args.prompt,
                          num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    if args.grid:  # each process kept its own references' images: process 0's make the grid
        images = [r.pop("images") for r in report["results"]]
        if jax.process_index() == 0:
            write_grid(images, references[::jax.process_count()], args.grid, args.scales)
    report = {
        "protocol": "IP-Adapter paper, section 4.2: per reference, images_per_reference generations from the "
                    "image prompt; CLIP-I = mean cosine of CLIP image embeddings (generation vs reference); "
                    "CLIP-T = mean CLIPScore (2.5 * max(cos, 0)) of generation vs the reference's caption",
        "model": str(args.model), "ip_adapter": str(args.ip_adapter), "clip": str(args.clip), "data": data_name,
        "num_references": len(references), "images_per_reference": args.images_per_reference,
        "prompt": args.prompt, "num_inference_steps": args.steps, "guidance_scale": args.guidance,
        "seed": args.seed, "seconds": round(time.time() - started, 1), **report,
    }
    if jax.process_index() != 0:
        return report
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for r in report["results"]:
        toy = (f", colour match {r['colour_match']:.3f}, shape match {r['shape_match']:.3f}"
               if "colour_match" in r else "")
        print(f"scale {r['scale']}: CLIP-I {r['clip_i']:.4f}, CLIP-T {r['clip_t']:.4f}{toy}")
    print(f"wrote {args.out}", flush=True)
    return report
