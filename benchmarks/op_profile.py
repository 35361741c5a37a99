"""Where the time goes, op by op: ours (a ``jax.profiler`` trace of the compiled program, with XLA:CPU's
per-thunk trace events) next to the reference (``torch.profiler``) on the same work (a tool, not a test).

    python benchmarks/op_profile.py --model sd15-full --what unet --batch 2 --size 256
    python benchmarks/op_profile.py --model sd15-full --what vae|image_encoder|train --side ours

``--what``: ``unet`` (one forward with the plain adapter; ``--batch`` is what the UNet sees, 2 = CFG for one
image), ``vae`` (one decode of ``--batch`` latents), ``image_encoder`` (one 224px image), ``train`` (one
train step at ``--batch`` images, as ``train_bench.py`` runs it). Ours is grouped three ways: by HLO op (with
its kind: the convolutions, dots, reductions, transcendental functions it contains), by kind, and by model
path (from the ops' ``op_name`` metadata, cut to ``--depth`` components). Theirs: ``key_averages`` by aten op
and by op and input shape. Times are sums over ``--repeats`` calls divided by the calls, in ms; with more
than one thread, per-op times add up the threads' work.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_models import MODELS, bench_model  # noqa: E402

_KINDS = ("convolution", "dot", "reduce", "exponential", "tanh", "erf", "rsqrt", "reverse", "transpose", "gather",
          "scatter", "sort", "custom-call", "concatenate", "pad", "dynamic-update-slice", "copy")


def parse_hlo(text: str) -> dict[str, tuple[str, str]]:
    """``{instruction name: (kind, op_name)}`` for the optimized HLO module text: kind lists the notable
    opcodes an instruction (or the computation a fusion calls) contains; op_name is its source path."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)  # computations start at column 0
        if header:
            current = header.group(1)
            computations[current] = []
        elif current is not None:
            computations[current].append(line)
    opcodes = {}
    for name, lines in computations.items():
        found = set()
        for line in lines:
            m = re.search(r"=\s*\S+\s+([\w\-]+)\(", line)
            if m and m.group(1) in _KINDS:
                found.add(m.group(1))
        opcodes[name] = found
    result = {}
    for lines in computations.values():
        for line in lines:
            m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(", line)
            if not m:
                continue
            name, opcode = m.groups()
            kinds = {opcode} & set(_KINDS)
            for called in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line):
                kinds |= opcodes.get(called, set())
            op_name = re.search(r'op_name="([^"]*)"', line)
            result[name] = ("+".join(sorted(kinds)) or opcode, op_name.group(1) if op_name else "")
    return result


def profile_ours(fn, make_args, repeats: int, depth: int, top: int) -> None:
    """``fn``: a jitted function; ``make_args()``: its arguments, fresh for each call (a train step donates
    its state)."""
    import jax
    from jax.profiler import ProfileData

    compiled = fn.lower(*make_args()).compile()
    info = parse_hlo(compiled.as_text())
    jax.block_until_ready(compiled(*make_args()))
    calls = [make_args() for _ in range(repeats)]
    folder = tempfile.mkdtemp(prefix="op_profile_")
    t0, c0 = time.perf_counter(), time.process_time()
    jax.profiler.start_trace(folder)
    for args in calls:
        jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    wall, cpu = (time.perf_counter() - t0) / repeats, (time.process_time() - c0) / repeats
    data = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[-1])
    per_op = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    per_op[stats["hlo_op"]] += event.duration_ns / 1e6 / repeats
    total = sum(per_op.values())
    print(f"ours: {1e3 * wall:.1f} ms wall, {1e3 * cpu:.1f} ms CPU per call (traced); op time {total:.1f} ms")
    by_kind, by_path = collections.Counter(), collections.Counter()
    for op, ms in per_op.items():
        kind, path = info.get(op, ("?", ""))
        by_kind[kind] += ms
        parts = [p for p in path.split("/") if p and not p.startswith(("jit(", "jvp(", "transpose("))]
        by_path["/".join(parts[:depth]) or "(none)"] += ms
    print(f"\n{'kind':40s} {'ms':>9s} {'share':>6s}")
    for kind, ms in by_kind.most_common():
        print(f"{kind[:40]:40s} {ms:9.2f} {100 * ms / total:5.1f}%")
    print(f"\n{'model path':70s} {'ms':>9s} {'share':>6s}")
    for path, ms in by_path.most_common(top):
        print(f"{path[-70:]:70s} {ms:9.2f} {100 * ms / total:5.1f}%")
    print(f"\n{'HLO op':28s} {'kind':28s} {'ms':>8s} {'share':>6s}  source")
    for op, ms in per_op.most_common(top):
        kind, path = info.get(op, ("?", ""))
        print(f"{op[:28]:28s} {kind[:28]:28s} {ms:8.2f} {100 * ms / total:5.1f}%  {path[-90:]}")


def profile_torch(fn, repeats: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    t0, c0 = time.perf_counter(), time.process_time()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        for _ in range(repeats):
            fn()
    wall, cpu = (time.perf_counter() - t0) / repeats, (time.process_time() - c0) / repeats
    print(f"\ntorch: {1e3 * wall:.1f} ms wall, {1e3 * cpu:.1f} ms CPU per call (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=top,
                                                              max_name_column_width=30, max_shapes_column_width=70))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15-full", choices=sorted(MODELS))
    p.add_argument("--what", default="unet", choices=["unet", "vae", "image_encoder", "train"])
    p.add_argument("--side", default="both", choices=["ours", "torch", "both"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=256, help="image side in pixels (latents are 1/8)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--depth", type=int, default=4, help="model-path components to group by")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--return-freed-memory", action="store_true",
                   help="leave glibc's malloc as it is (see cpu_flags.keep_freed_memory)")
    args = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.sched_setaffinity(0, cpus)
    from ipadapter_jax.cpu_flags import apply_cpu_flags, keep_freed_memory

    kept = keep_freed_memory() if not args.return_freed_memory else False
    print("XLA_FLAGS:", apply_cpu_flags("--xla_cpu_enable_xprof_traceme=true"), "threads:", len(cpus),
          "keep_freed_memory:", kept)
    folder, adapter_file = bench_model(args.model)
    rng = np.random.default_rng(0)
    if args.what == "train":
        import train_bench

        targs = train_bench.parse_args(["--model", args.model, "--batch", str(args.batch), "--resolution",
                                        str(args.size), "--warmup", "1", "--threads", str(len(cpus))])
        ours = train_bench.make_ours(targs, folder, folder / "image_encoder")
        if args.side in ("ours", "both"):
            profile_ours(ours.step, ours.args, args.repeats, args.depth, args.top)
        if args.side in ("torch", "both"):
            run = train_bench.make_torch(targs, folder, folder / "image_encoder", ours.adapter_file, ours.batch)
            profile_torch(lambda: run(1), args.repeats, args.top)
        return
    latent = args.size // 8
    if args.side in ("ours", "both"):
        fn, fargs = _ours(args, folder, adapter_file, rng, latent)
        profile_ours(fn, lambda: fargs, args.repeats, args.depth, args.top)
    if args.side in ("torch", "both"):
        profile_torch(_theirs(args, folder, adapter_file, np.random.default_rng(0), latent), args.repeats, args.top)


def _ours(args, folder, adapter_file, rng, latent):
    import jax
    import jax.numpy as jnp

    if args.what == "unet":
        from ipadapter_jax.models.adapter import adapter_variables
        from ipadapter_jax.models.ip_scales import resolve_ip_scales
        from ipadapter_jax.weights.ip_adapter_file import load_ip_adapter
        from ipadapter_jax.weights.load_unet import load_unet

        module, params, cfg = load_unet(folder / "unet")
        adapter = load_ip_adapter(adapter_file)
        variables = {"params": params, **adapter_variables(cfg, [adapter.params["layers"]], jnp.asarray(
            resolve_ip_scales(cfg, 0.6, 1), jnp.float32))}
        n = args.batch
        x = jnp.asarray(rng.standard_normal((n, latent, latent, 4), dtype=np.float32))
        ctx = jnp.asarray(rng.standard_normal((n, 77, cfg.cross_attention_dim), dtype=np.float32))
        tokens = adapter.project(jnp.asarray(rng.standard_normal((n, adapter.projection.embed_dim), np.float32)))
        fn = jax.jit(lambda v, x, c, tok: module.apply(v, x, jnp.full((x.shape[0],), 500), c, None,
                                                       image_tokens=[tok]))
        return fn, (variables, x, ctx, tokens)
    if args.what == "vae":
        from ipadapter_jax.models.vae import decode_latents
        from ipadapter_jax.weights.load_vae import load_vae

        module, params, _ = load_vae(folder / "vae")
        z = jnp.asarray(rng.standard_normal((args.batch, latent, latent, 4), dtype=np.float32))
        return jax.jit(lambda p, z: decode_latents(module, p, z)), (params, z)
    from ipadapter_jax.weights.load_clip import load_clip_vision_encoder

    module, params, config = load_clip_vision_encoder(folder / "image_encoder")
    side = config.image_size
    pixels = jnp.asarray(rng.standard_normal((1, side, side, 3), dtype=np.float32))
    return jax.jit(lambda p, x: module.apply({"params": p}, x).image_embeds), (params, pixels)


def _theirs(args, folder, adapter_file, rng, latent):
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.what == "unet":
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        flat = load_file(str(adapter_file))
        unet._load_ip_adapter_weights([{p: {k[len(p) + 1:]: v for k, v in flat.items() if k.startswith(p + ".")}
                                        for p in ("image_proj", "ip_adapter")}])
        n = args.batch
        x = torch.from_numpy(rng.standard_normal((n, 4, latent, latent), dtype=np.float32))
        ctx = torch.from_numpy(rng.standard_normal((n, 77, unet.config.cross_attention_dim), dtype=np.float32))
        embeds = [torch.from_numpy(rng.standard_normal((n, 1, flat["image_proj.proj.weight"].shape[1]),
                                                       dtype=np.float32))]

        def run():
            with torch.inference_mode():
                return unet(x, 500, ctx, added_cond_kwargs={"image_embeds": embeds}).sample
        return run
    if args.what == "vae":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        z = torch.from_numpy(rng.standard_normal((args.batch, 4, latent, latent), dtype=np.float32))

        def run():
            with torch.inference_mode():
                return vae.decode(z / vae.config.scaling_factor).sample
        return run
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").eval()
    side = encoder.config.image_size
    pixels = torch.from_numpy(rng.standard_normal((1, 3, side, side), dtype=np.float32))

    def run():
        with torch.inference_mode():
            return encoder(pixels).image_embeds
    return run


if __name__ == "__main__":
    main()
