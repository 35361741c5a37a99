"""Where sampling time goes: one UNet forward (the work of one CFG step), one VAE decode, one image-encoder
and one text-encoder call, ours vs diffusers/transformers at the same shapes and weights (a benchmark, not
a test).

Same models as ``sample_bench.py`` (``--model``: ``sd15-full``, the published SD1.5 configs with random
weights, or ``bench``, the small stand-in; see ``bench_models.py``), plain IP-Adapter. Each measurement
alternates ours and theirs call by call, so machine-load drift hits both alike, and reports the minimum and
median over ``--repeats`` calls.

    python benchmarks/unet_bench.py --model sd15-full --size 256 --batch 1 --repeats 5 \
        --what unet,vae,image_encoder,text_encoder
    python benchmarks/unet_bench.py [--model bench] [--batch 2] [--size 128] [--repeats 20] [--what unet,vae]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import sys

import numpy as np

# Measure the checkout this script lives in, not whichever ipadapter_jax happens to be installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ipadapter_jax.cpu_flags import apply_cpu_flags  # noqa: E402
from bench_models import MODELS, bench_model  # noqa: E402


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """``({name: [wall seconds per call]}, {name: [process CPU seconds per call]})``; each fn must block
    until its result is ready. CPU time is the steadier measure on a shared machine when running on one
    thread (``taskset -c 0``): it does not count time spent descheduled. With more threads it also counts
    spin-waiting, so compare wall times there."""
    for fn in fns.values():
        fn()  # warm-up / compile
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def report(what: str, measured: tuple[dict, dict]) -> None:
    for kind, times in zip(("wall", "cpu"), measured):
        ours, theirs = min(times["ours"]), min(times["diffusers"])
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{what:10s} {kind:4s}  ours {1e3 * ours:7.1f} ms (median {1e3 * med['ours']:7.1f})  diffusers "
              f"{1e3 * theirs:7.1f} ms (median {1e3 * med['diffusers']:7.1f})  speed-up {theirs / ours:5.2f}x "
              f"(medians {med['diffusers'] / med['ours']:5.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench", choices=sorted(MODELS), help="see bench_models.py")
    p.add_argument("--batch", type=int, default=2, help="images; the UNet sees twice this (CFG)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--what", default="unet,vae")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS after our CPU defaults (later wins)")
    p.add_argument("--no-default-flags", action="store_true", help="leave out ipadapter_jax.cpu_flags defaults")
    args = p.parse_args()
    what = args.what.split(",")
    print("XLA_FLAGS:", apply_cpu_flags(args.xla_flags, defaults=not args.no_default_flags))

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import DiffusionPipeline

    from ipadapter_jax import IPAdapterPipeline
    from ipadapter_jax.models.adapter import adapter_variables
    from ipadapter_jax.models.ip_scales import resolve_ip_scales

    threads = len(os.sched_getaffinity(0))  # what XLA uses too (honours taskset)
    torch.set_num_threads(threads)
    print(f"threads: torch {torch.get_num_threads()}, XLA CPU {threads} (affinity)")
    folder, adapter_path = bench_model(args.model)
    theirs = DiffusionPipeline.from_pretrained(folder)
    theirs.load_ip_adapter(str(folder), subfolder="", weight_name=adapter_path.name, image_encoder_folder=None)
    theirs.set_ip_adapter_scale(0.6)
    ours = IPAdapterPipeline.from_pretrained(folder, ip_adapter=adapter_path, image_encoder=folder / "image_encoder")

    rng = np.random.default_rng(0)
    n = 2 * args.batch
    latent = args.size // 8
    cfg = ours.base.unet_config
    x = rng.standard_normal((n, latent, latent, cfg.in_channels), dtype=np.float32)
    ctx = rng.standard_normal((n, 77, cfg.cross_attention_dim), dtype=np.float32)
    adapter = ours.adapters[0]
    embeds = rng.standard_normal((n, 1, adapter.projection.embed_dim), dtype=np.float32)
    t = 500

    if "unet" in what:
        unet = ours.base.unet
        variables = {"params": unet.params,
                     **adapter_variables(cfg, [adapter.params["layers"]],
                                         jnp.asarray(resolve_ip_scales(cfg, 0.6, 1), jnp.float32))}
        tokens = adapter.project(jnp.asarray(embeds[:, 0]))
        fwd = jax.jit(lambda v, x, c, tok: unet.module.apply(v, x, jnp.full((x.shape[0],), t), c, None,
                                                             image_tokens=[tok]))
        jx, jc = jnp.asarray(x), jnp.asarray(ctx)
        tx, tc = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ctx)
        te = [torch.from_numpy(embeds)]

        def run_theirs():
            with torch.inference_mode():
                return theirs.unet(tx, t, encoder_hidden_states=tc, added_cond_kwargs={"image_embeds": te}).sample

        def run_ours():
            return fwd(variables, jx, jc, tokens).block_until_ready()

        diff = np.abs(np.asarray(run_ours()).transpose(0, 3, 1, 2) - run_theirs().numpy()).max()
        print(f"unet forward: batch {n}, {latent}x{latent} latents, max |ours - diffusers| {diff:.2e}")
        report("unet", interleaved({"ours": run_ours, "diffusers": run_theirs}, args.repeats))

    if "vae" in what:
        vae = ours.base.vae
        z = rng.standard_normal((args.batch, latent, latent, 4), dtype=np.float32)
        decode = jax.jit(lambda params, z: ours._decode(params, z))
        jz, tz = jnp.asarray(z), torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
        scale = theirs.vae.config.scaling_factor

        def run_theirs():
            with torch.inference_mode():
                return theirs.vae.decode(tz / scale).sample

        def run_ours():
            return decode(vae.params, jz).block_until_ready()

        print(f"vae decode: batch {args.batch}, {latent}x{latent} -> {args.size}x{args.size}")
        report("vae decode", interleaved({"ours": run_ours, "diffusers": run_theirs}, args.repeats))

    if "image_encoder" in what:
        from ipadapter_jax.pipeline.conditioning import _run_image_encoder

        encoder = ours.image_encoder.encoder
        side = encoder.config.image_size
        pixels = rng.standard_normal((1, side, side, 3), dtype=np.float32)
        jp, tp = jnp.asarray(pixels), torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())

        def run_theirs():
            with torch.inference_mode():
                return theirs.image_encoder(tp).image_embeds

        def run_ours():
            return _run_image_encoder(encoder.module, encoder.params, jp, False).block_until_ready()

        print(f"image encoder: 1 image, {side}x{side}")
        report("image enc", interleaved({"ours": run_ours, "diffusers": run_theirs}, args.repeats))

    if "text_encoder" in what:
        from ipadapter_jax.pipeline.conditioning import _run_text_encoder

        text = ours.base.text_encoders[0]
        ids = rng.integers(0, 40, (2, 77)).astype(np.int32)
        ji, ti = jnp.asarray(ids), torch.from_numpy(ids.astype(np.int64))

        def run_theirs():
            with torch.inference_mode():
                return theirs.text_encoder(ti)[0]

        def run_ours():
            return _run_text_encoder(text.module, text.params, ji)[0].block_until_ready()

        print("text encoder: 2 prompts (CFG), 77 tokens")
        report("text enc", interleaved({"ours": run_ours, "diffusers": run_theirs}, args.repeats))


if __name__ == "__main__":
    main()
