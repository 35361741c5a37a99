"""Sampling throughput, ours vs diffusers, side by side in one run (a benchmark, not a test).

Both pipelines load the same random model and a plain IP-Adapter from disk (``--model``, see
``bench_models.py``: ``sd15-full``, the published SD1.5 UNet/VAE/text-encoder configs and the ViT-H/14 image
encoder, or ``bench``, the small stand-in), then generate the same batch: DDIM steps with classifier-free
guidance 7.5 and an image prompt. Prints images/s for each and their ratio. Compilation (ours) and first-call
warm-up (both) are excluded and reported separately.

    python benchmarks/sample_bench.py --model sd15-full --size 256 --steps 10 --batch 1 --threads 1
    python benchmarks/sample_bench.py [--model bench] [--batch 2] [--size 128] [--steps 50] [--repeats 2]

``--threads N`` restricts the process to its first N CPUs: XLA sizes its thread pool from the affinity mask
and torch gets ``set_num_threads(N)``, so both use the same threads. On a machine shared with other jobs,
``--threads 1`` gives the steadier comparison; the process CPU time per run is printed too, and on one thread
it does not count time spent descheduled. torch's OpenMP threads are set to sleep rather than spin while
waiting (``OMP_WAIT_POLICY=PASSIVE``, see ``machine.set_torch_wait_policy``; ``--torch-spin`` leaves torch's
default): spinning threads slow torch down many times over on an oversubscribed machine. glibc's malloc keeps
freed memory for reuse (``cpu_flags.keep_freed_memory``, for both frameworks in this process;
``--return-freed-memory`` leaves it as it is).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

# Measure the checkout this script lives in, not whichever ipadapter_jax happens to be installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ipadapter_jax.cpu_flags import apply_cpu_flags, keep_freed_memory  # noqa: E402
from bench_models import MODELS, bench_model  # noqa: E402
from machine import machine_line, set_torch_wait_policy, versions_line  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench", choices=sorted(MODELS), help="see bench_models.py")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--torch-spin", action="store_true",
                   help="leave OMP_WAIT_POLICY unset: torch's OpenMP threads spin between ops (its default)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="CPUs for both frameworks (default: all this process may use)")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS after our CPU defaults (later wins)")
    p.add_argument("--no-default-flags", action="store_true", help="leave out ipadapter_jax.cpu_flags defaults")
    p.add_argument("--return-freed-memory", action="store_true",
                   help="leave glibc's malloc as it is (see ipadapter_jax.cpu_flags.keep_freed_memory)")
    args = p.parse_args()
    kept = False if args.return_freed_memory else keep_freed_memory()
    cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    set_torch_wait_policy(spin=args.torch_spin)  # before torch starts OpenMP
    os.sched_setaffinity(0, cpus)  # before either framework starts its thread pool
    threads = len(cpus)
    xla_flags = apply_cpu_flags(args.xla_flags, defaults=not args.no_default_flags)

    import torch
    from diffusers import DDIMScheduler, DiffusionPipeline

    from ipadapter_jax import IPAdapterPipeline
    from ipadapter_jax.testing.reference_pipelines import reference_image

    torch.set_num_threads(threads)
    folder, adapter = bench_model(args.model)
    image = reference_image(size=(96, 80))
    prompts = ["a red circle on a blue background"] * args.batch
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, 4, args.size // 8, args.size // 8, generator=gen)
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size)

    theirs = DiffusionPipeline.from_pretrained(folder)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.load_ip_adapter(str(folder), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
    theirs.set_ip_adapter_scale(0.6)
    theirs.set_progress_bar_config(disable=True)
    ours = IPAdapterPipeline.from_pretrained(folder, ip_adapter=adapter, image_encoder=folder / "image_encoder")

    def run_theirs():
        with torch.inference_mode():
            return theirs(prompts[0], ip_adapter_image=image, num_images_per_prompt=args.batch,
                          latents=latents.clone(), output_type="np", **kwargs).images

    def run_ours():
        return ours(prompts, ip_adapter_image=image, ip_scale=0.6, latents=latents.numpy(), scheduler="ddim",
                    **kwargs)

    load_before = f"{os.getloadavg()[0]:.1f}"
    t0 = time.perf_counter()
    first_ours = run_ours()
    compile_s = time.perf_counter() - t0
    first_theirs = run_theirs()
    timings = {"ours": [], "diffusers": []}
    cpu_times = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        for name, fn in (("ours", run_ours), ("diffusers", run_theirs)):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    best = {k: min(v) for k, v in timings.items()}
    rate = {k: args.batch / v for k, v in best.items()}
    print(machine_line(cpus, xla_flags, load_before) + f"; malloc keeps freed memory: {kept}")
    print(versions_line())
    print(f"work: model {args.model} ({folder}), batch {args.batch}, {args.size}x{args.size}px, {args.steps} DDIM "
          f"steps, CFG 7.5, plain IP-Adapter, float32")
    print(f"max |ours - diffusers| pixel difference: {np.abs(first_ours - first_theirs).max():.2e}")
    print(f"ours: first call (compile + run) {compile_s:.1f}s")
    for name in ("ours", "diffusers"):
        print(f"{name:9s}: {rate[name]:.3f} images/s (best of {args.repeats}: {best[name]:.2f}s per batch)")
    print("every run, wall (s): " + "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in v) for k, v in timings.items()))
    print("every run, CPU (s):  " + "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in v)
                                             for k, v in cpu_times.items()))
    if threads == 1:
        print(f"ratio by best CPU time (1 thread): {min(cpu_times['diffusers']) / min(cpu_times['ours']):.2f}x")
    print(f"ratio ours/diffusers: {rate['ours'] / rate['diffusers']:.2f}x")


if __name__ == "__main__":
    main()
