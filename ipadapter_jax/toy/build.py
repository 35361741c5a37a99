"""Rebuild the toy world from nothing: ``python -m ipadapter_jax.toy.build --out DIR``.

Writes, deterministically for a seed (same machine, same library versions):

    DIR/base/           diffusers StableDiffusionPipeline folder + image_encoder/ (the toy base model)
    DIR/clip/           the full mini CLIP (transformers CLIPModel): the judge of CLIP-I / CLIP-T
    DIR/example.png     a reference image (a blue square) for sample.py
    DIR/build_summary.json   settings, timings, sizes and the quality checks printed at the end

Order: tokenizer, mini CLIP (contrastive), tiny VAE, tiny UNet (on the VAE's latents, conditioned on the
CLIP text tower), then a check of the finished folder through the real pipeline: text-to-image generations
for every caption, read back by the pixel classifier. The shipped copy lives in ``ipadapter_jax/assets/toy``
(rebuild it with ``--out ipadapter_jax/assets/toy``; an ``ip_adapter.safetensors`` or a ``controlnet/`` there
was trained on the previous base and is removed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ipadapter_jax.toy.mini_clip import MiniClipSettings, train_mini_clip, write_clip_folder
from ipadapter_jax.toy.shapes_dataset import SUPERSAMPLE, ShapeSpec, render
from ipadapter_jax.toy.text_to_image_check import text_to_image_check
from ipadapter_jax.toy.tiny_unet import SCHEDULER_CONFIG, TinyUnetSettings, train_tiny_unet
from ipadapter_jax.toy.tiny_vae import TinyVaeSettings, train_tiny_vae
from ipadapter_jax.toy.toy_tokenizer import write_toy_tokenizer
from ipadapter_jax.weights.pipeline_folder import write_pipeline_folder

EXAMPLE = ShapeSpec("blue", "square", "white", left=9 * SUPERSAMPLE, top=8 * SUPERSAMPLE, size=15 * SUPERSAMPLE)


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    clip: MiniClipSettings = MiniClipSettings()
    vae: TinyVaeSettings = TinyVaeSettings()
    unet: TinyUnetSettings = TinyUnetSettings()
    check_images_per_caption: int = 4
    check_steps: int = 20

    @classmethod
    def miniature(cls, seed: int = 0) -> "BuildSettings":
        """Every piece at a few steps: for tests of the build itself (the models learn nothing)."""
        return cls(clip=MiniClipSettings(num_images=64, steps=2, batch_size=16, warmup_steps=1, eval_every=1,
                                         seed=seed),
                   vae=TinyVaeSettings(num_images=64, steps=2, batch_size=8, warmup_steps=1, seed=seed),
                   unet=TinyUnetSettings(num_images=64, steps=2, batch_size=8, warmup_steps=1, seed=seed),
                   check_images_per_caption=1, check_steps=2)

    @classmethod
    def full(cls, seed: int = 0) -> "BuildSettings":
        return cls(clip=MiniClipSettings(seed=seed), vae=TinyVaeSettings(seed=seed), unet=TinyUnetSettings(seed=seed))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _param_count(tree) -> int:
    import jax

    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def build(out: str | Path, settings: BuildSettings = BuildSettings(), log: Callable[[str], None] = print) -> dict:
    """Build everything into ``out``; returns the summary (also written to ``out/build_summary.json``)."""
    from ipadapter_jax.data.tokenize import CaptionTokenizer
    from ipadapter_jax.weights.load_clip import build_clip_text_encoder

    started, cpu_started = time.time(), time.process_time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "ip_adapter.safetensors", out / "controlnet", out / "controlnet_summary.json"):
        if stale.exists():
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            log(f"removed {stale}: it was trained on the previous base model")
    tokenizer_dir = write_toy_tokenizer(out / "base" / "tokenizer")
    tokenizer = CaptionTokenizer(tokenizer_dir)

    log("training the mini CLIP (text + image towers, contrastive) ...")
    clip = train_mini_clip(tokenizer_dir, settings.clip, log)
    log(f"  done in {clip.seconds:.0f}s; held-out zero-shot accuracy over the 12 captions: "
        f"{clip.heldout_accuracy:.3f}")
    log("training the tiny VAE ...")
    vae = train_tiny_vae(settings.vae, log)
    log(f"  done in {vae.seconds:.0f}s; held-out reconstruction error {vae.reconstruction_mae:.2f}/255, "
        f"scaling_factor {vae.config.scaling_factor:.4f}")
    log("training the tiny UNet (text-conditioned, on the VAE's latents) ...")
    text_config = {**clip.text_config, "architectures": ["CLIPTextModel"]}
    text_module, _ = build_clip_text_encoder(text_config)
    text_params = {"text_model": clip.text_params["text_model"]}
    unet = train_tiny_unet(vae, text_module, text_params, tokenizer, settings.unet, log)
    log(f"  done in {unet.seconds:.0f}s; final loss {unet.final_loss:.4f}")

    base = write_pipeline_folder(out / "base", unet=(unet.raw_config, unet.params), vae=(vae.config, vae.params),
                                 text_encoders=[clip.text_encoder()], tokenizer_dir=tokenizer_dir,
                                 scheduler_config=SCHEDULER_CONFIG, image_encoder=clip.image_encoder())
    clip_dir = write_clip_folder(out / "clip", tokenizer_dir, clip)
    Image.fromarray(render(EXAMPLE)).save(out / "example.png")

    log("checking the base through the pipeline: text-to-image for every caption, read by the classifier ...")
    check = text_to_image_check(base, settings.check_images_per_caption, settings.check_steps,
                                grid_path=out / "text_to_image.png")
    summary = {
        "seconds": {"clip": round(clip.seconds, 1), "vae": round(vae.seconds, 1), "unet": round(unet.seconds, 1),
                    "total": round(time.time() - started, 1),
                    # CPU time of all threads: on a shared machine the wall time says more about the others.
                    "total_cpu": round(time.process_time() - cpu_started, 1)},
        "parameters": {"text_encoder": _param_count(text_params), "image_encoder": _param_count(clip.vision_params),
                       "vae": _param_count(vae.params), "unet": _param_count(unet.params)},
        "bytes": {"base": _folder_bytes(base), "clip": _folder_bytes(clip_dir)},
        "clip_heldout_accuracy": round(clip.heldout_accuracy, 4),
        "vae_reconstruction_mae_255": round(vae.reconstruction_mae, 3),
        "vae_scaling_factor": vae.config.scaling_factor,
        "unet_final_loss": round(unet.final_loss, 5),
        "text_to_image": check,
        "settings": dataclasses.asdict(settings),
    }
    (out / "build_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    s, p, b, t = summary["seconds"], summary["parameters"], summary["bytes"], summary["text_to_image"]
    return "\n".join([
        "toy world built:",
        f"  time: CLIP {s['clip']}s, VAE {s['vae']}s, UNet {s['unet']}s, total {s['total']}s "
        f"(CPU time {s['total_cpu']}s)",
        f"  parameters: text encoder {p['text_encoder']:,}, image encoder {p['image_encoder']:,}, "
        f"VAE {p['vae']:,}, UNet {p['unet']:,}",
        f"  sizes: base {b['base'] / 2**20:.1f} MiB, clip {b['clip'] / 2**20:.1f} MiB",
        f"  mini CLIP held-out accuracy (12 captions, chance 0.083): {summary['clip_heldout_accuracy']:.3f}",
        f"  VAE reconstruction error: {summary['vae_reconstruction_mae_255']:.2f} / 255",
        f"  text-to-image ({t['images']} images, {t['steps']} DDIM steps, guidance {t['guidance_scale']}): "
        f"colour {t['colour_accuracy']:.3f} (chance {t['colour_chance']:.3f}), "
        f"shape {t['shape_accuracy']:.3f} (chance {t['shape_chance']:.3f}), "
        f"both {t['both_accuracy']:.3f} (chance {t['both_chance']:.3f})",
    ])


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m ipadapter_jax.toy.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (e.g. ipadapter_jax/assets/toy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--miniature", action="store_true",
                        help="a few steps of everything: checks the build end to end in about a minute")
    args = parser.parse_args(argv)
    from ipadapter_jax.compilation_cache import enable_compilation_cache

    enable_compilation_cache()
    settings = BuildSettings.miniature(args.seed) if args.miniature else BuildSettings.full(args.seed)
    return build(args.out, settings)


if __name__ == "__main__":
    main()
