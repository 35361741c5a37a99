"""Images/s of our IP-Adapter train step against a PyTorch reference step doing the same work.

Both sides: frozen VAE encode + CLIP text + CLIP image encoders, noise and timesteps, the UNet with decoupled
image cross-attention (diffusers' ``IPAdapterAttnProcessor2_0`` + image projection on the PyTorch side, loaded
with ``_load_ip_adapter_weights`` from the same adapter file), MSE loss, backward, global-norm clipping and
AdamW over the adapter parameters only. Same model, batch, resolution and thread count.

    python benchmarks/train_bench.py                     # the tiny world (written to a cache folder), CPU
    python benchmarks/train_bench.py --model sd15-full --resolution 256 --batch 1 --threads 1   # SD1.5 size
    python benchmarks/train_bench.py --model bench --resolution 128 --batch 2   # the small stand-in
    python benchmarks/train_bench.py --model /models/stable-diffusion-v1-5 \\
        --image-encoder /models/IP-Adapter/models/image_encoder --resolution 512 --batch 4 --dtype bfloat16

The two sides are timed in alternating chunks of ``--steps`` steps (``--repeats`` chunks each), so drift in
machine load hits both alike; the best chunk of each gives images/s, by wall clock and by process CPU time.
This is a benchmark, not a test: it prints numbers and asserts nothing. On a CPU shared with other jobs use
``--threads 1``: on one thread CPU time does not count time spent descheduled. PyTorch's OpenMP threads sleep
rather than spin while waiting (``OMP_WAIT_POLICY=PASSIVE``; ``--torch-spin`` keeps torch's default), since
spinning threads slow it down many times over when the machine is oversubscribed. glibc's malloc keeps freed
memory for reuse (``cpu_flags.keep_freed_memory``, both frameworks alike; ``--return-freed-memory`` leaves it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_models import MODELS, bench_model
from machine import machine_line, set_torch_wait_policy, versions_line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="diffusers SD folder; default: the tiny world; 'sd15-full' or "
                   "'bench': the random models of bench_models.py")
    p.add_argument("--image-encoder", default="", help="CLIPVisionModelWithProjection folder (default model/image_encoder)")
    p.add_argument("--variant", default="plain", choices=["plain", "plus"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="frozen weights' dtype")
    p.add_argument("--steps", type=int, default=10, help="timed steps per chunk")
    p.add_argument("--repeats", type=int, default=3, help="timed chunks per framework, alternating")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator warmup)")
    p.add_argument("--torch-spin", action="store_true",
                   help="leave OMP_WAIT_POLICY unset: torch's OpenMP threads spin between ops (its default)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="CPUs for both frameworks (default: all this process may use)")
    p.add_argument("--return-freed-memory", action="store_true",
                   help="leave glibc's malloc as it is (see ipadapter_jax.cpu_flags.keep_freed_memory)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    set_torch_wait_policy(spin=args.torch_spin)  # before torch starts OpenMP
    os.sched_setaffinity(0, cpus)  # before either framework starts its thread pool: XLA sizes it from this mask
    threads = len(cpus)
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ipadapter_jax.cpu_flags import apply_cpu_flags, keep_freed_memory

    kept = False if args.return_freed_memory else keep_freed_memory()
    xla_flags = apply_cpu_flags()
    from ipadapter_jax.testing.random_model import write_random_model

    if args.model in MODELS:
        model = bench_model(args.model)[0]
    else:
        cache = Path(tempfile.gettempdir()) / "ipadapter_jax_bench"
        model = Path(args.model) if args.model else write_random_model(cache / "tiny_model")
    image_encoder = Path(args.image_encoder) if args.image_encoder else model / "image_encoder"
    ours = make_ours(args, model, image_encoder)
    run_ours = ours.run
    run_ours(args.warmup)
    run_theirs = make_torch(args, model, image_encoder, ours.adapter_file, ours.batch)
    load_before = f"{os.getloadavg()[0]:.1f}"
    wall = {"ours": [], "torch": []}
    cpu = {"ours": [], "torch": []}
    for _ in range(args.repeats):  # alternating chunks, so drift in machine load hits both alike
        for name, fn in (("ours", run_ours), ("torch", run_theirs)):
            c0, t0 = time.process_time(), time.perf_counter()
            fn(args.steps)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    images = args.steps * args.batch
    print(machine_line(cpus, xla_flags, load_before) + f"; malloc keeps freed memory: {kept}")
    print(versions_line())
    print(f"work: model {args.model or 'tiny'} ({model}), {args.variant} adapter, batch {args.batch}, "
          f"{args.resolution}px, {args.dtype}; {args.repeats} chunks of {args.steps} steps each, alternating")
    for name, label in (("ours", "ipadapter_jax"), ("torch", "PyTorch")):
        print(f"{label:14s} {images / min(wall[name]):8.2f} images/s (best chunk, wall); "
              f"{images / min(cpu[name]):8.2f} images/CPU-s (best chunk, CPU time)")
    print("every chunk, wall (s): " + "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in v) for k, v in wall.items()))
    print("every chunk, CPU (s):  " + "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in v) for k, v in cpu.items()))
    if threads == 1:
        print(f"ratio by best CPU time (1 thread): {min(cpu['torch']) / min(cpu['ours']):.2f}x")
    print(f"ratio ours/PyTorch: {min(wall['torch']) / min(wall['ours']):.2f}x")


def _projection(args, modules):
    from ipadapter_jax.models.image_projection import ProjectionConfig

    cross = modules.unet_config.cross_attention_dim
    if args.variant == "plain":
        return ProjectionConfig("plain", modules.image_embed_dim, cross, 4)
    return ProjectionConfig("plus", modules.image_hidden_dim, cross, 16, hidden_dim=cross,
                            heads=max(1, cross // 64), dim_head=64, depth=4)


def _batch(args, modules):
    import numpy as np

    rng = np.random.default_rng(0)
    side = modules.clip_image_size
    batch = {"pixels": rng.uniform(-1, 1, (args.batch, args.resolution, args.resolution, 3)).astype(np.float32),
             "clip_pixels": rng.standard_normal((args.batch, side, side, 3)).astype(np.float32),
             "input_ids": rng.integers(0, 40, (args.batch, modules.text_length)).astype(np.int32),
             "drop_image": np.zeros(args.batch, bool)}
    if modules.is_sdxl:
        batch["input_ids_2"] = batch["input_ids"]
        batch["original_size"] = np.full((args.batch, 2), args.resolution, np.int32)
        batch["crop_top_left"] = np.zeros((args.batch, 2), np.int32)
    return batch


@dataclasses.dataclass
class OurStep:
    """Our side: ``run(n)`` takes n train steps and blocks until they are done; ``step`` is the jitted step and
    ``args()`` its current arguments (for a profile); the adapter file and batch are handed to PyTorch."""

    adapter_file: Path
    batch: dict
    run: Any
    step: Any
    args: Any


def make_ours(args, model: Path, image_encoder: Path) -> OurStep:
    import jax
    import jax.numpy as jnp

    from ipadapter_jax.models.adapter import IPAdapter
    from ipadapter_jax.train.config import OptimizerConfig
    from ipadapter_jax.train.frozen import load_frozen_models
    from ipadapter_jax.train.state import cross_attention_kv, make_optimizer, state_initializer
    from ipadapter_jax.train.step import StepSettings, make_train_step
    from ipadapter_jax.weights.ip_adapter_file import save_ip_adapter

    frozen_models = load_frozen_models(model, image_encoder, compute_dtype=args.dtype)
    modules = frozen_models.modules
    projection = _projection(args, modules)
    tx, schedule = make_optimizer(OptimizerConfig(), 1000)
    init = state_initializer(modules.unet_config, projection, tx)
    state = jax.jit(init)(jax.random.key(0), cross_attention_kv(modules.unet_config, frozen_models.host_params["unet"]))
    adapter_file = Path(tempfile.mkdtemp()) / "adapter.safetensors"
    save_ip_adapter(IPAdapter(projection, jax.device_get(state.params)), adapter_file)
    frozen = jax.tree.map(jnp.asarray, frozen_models.params_in(args.dtype))
    step = jax.jit(make_train_step(modules, tx, schedule, StepSettings(projection, args.resolution)),
                   donate_argnums=(0,))
    batch_np = _batch(args, modules)
    batch = jax.tree.map(jnp.asarray, batch_np)
    rng = jax.random.key(1)

    def run(n: int) -> None:
        nonlocal state
        for _ in range(n):
            state, metrics = step(state, frozen, batch, rng)
        jax.block_until_ready(metrics)

    # The step donates its state: a profile gets a copy each call.
    return OurStep(adapter_file, batch_np, run, step, lambda: (jax.tree.map(jnp.copy, state), frozen, batch, rng))


def make_torch(args, model: Path, image_encoder: Path, adapter_file: Path, batch_np: dict):
    """``run(n)``: n PyTorch reference train steps."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    vae = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=dtype).eval()
    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=dtype).eval()
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder", torch_dtype=dtype).eval()
    sdxl = (model / "text_encoder_2").is_dir()
    text_encoder_2 = (CLIPTextModelWithProjection.from_pretrained(model / "text_encoder_2", torch_dtype=dtype).eval()
                      if sdxl else None)
    encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder, torch_dtype=dtype).eval()
    scheduler = DDPMScheduler.from_pretrained(model / "scheduler")
    flat = load_file(str(adapter_file))
    unet._load_ip_adapter_weights([{p: {k[len(p) + 1:]: v for k, v in flat.items() if k.startswith(p + ".")}
                                    for p in ("image_proj", "ip_adapter")}])
    for module in (vae, unet, text_encoder, encoder) + ((text_encoder_2,) if sdxl else ()):
        module.requires_grad_(False)
    # The adapter's parameters. Ours train in float32 under bfloat16 compute; diffusers' processors need the
    # UNet's dtype, so with --dtype bfloat16 the PyTorch side keeps them in bfloat16.
    trainable = [unet.encoder_hid_proj] + [p for p in unet.attn_processors.values() if isinstance(p, torch.nn.Module)]
    params = []
    for module in trainable:
        module.to(dtype).requires_grad_(True)
        params += list(module.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    batch = {k: torch.from_numpy(v) for k, v in batch_np.items()}
    pixels = batch["pixels"].permute(0, 3, 1, 2).to(dtype)
    clip_pixels = batch["clip_pixels"].permute(0, 3, 1, 2).to(dtype)
    plus = args.variant == "plus"

    def step():
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy = scheduler.add_noise(latents, noise, t)
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
            added = {}
            if sdxl:
                out1 = text_encoder(batch["input_ids"].long(), output_hidden_states=True)
                out2 = text_encoder_2(batch["input_ids_2"].long(), output_hidden_states=True)
                text = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], -1)
                time_ids = torch.cat([batch["original_size"], batch["crop_top_left"],
                                      torch.full_like(batch["original_size"], args.resolution)], 1).to(dtype)
                added = {"text_embeds": out2.text_embeds, "time_ids": time_ids}
            else:
                text = text_encoder(batch["input_ids"].long())[0]
            out = encoder(clip_pixels, output_hidden_states=plus)
            features = out.hidden_states[-2] if plus else out.image_embeds
        added["image_embeds"] = [features.unsqueeze(1)]
        pred = unet(noisy, t, text, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss

    def run(n: int) -> None:
        for _ in range(n):
            step()

    run(args.warmup)
    return run


if __name__ == "__main__":
    main()
