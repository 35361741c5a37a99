"""A toy ControlNet: structure control for the toy world, trained on the shapes' edge maps.

``python -m ipadapter_jax.toy.controlnet --base ipadapter_jax/assets/toy/base --out ipadapter_jax/assets/toy/controlnet``

The ControlNet starts as diffusers' ``ControlNetModel.from_unet`` does (a copy of the toy UNet's encoder
half, zero convolutions at zero) and learns, with the base frozen, to make the base draw the shape whose
outline the control image shows: the base's own diffusion loss (v-prediction, Min-SNR weighting, as the
base was trained) on the toy shapes, with the control image the edge map of the picture being denoised.
Half of the captions are replaced by the empty one (as the ControlNet paper does), so the edges alone must
carry the structure. The control image is 32x32 like the pictures, so the control-image embedding has three
stages (4x down to the 8x8 latents).

Check (``structure_check``): held-out pictures' edge maps drive generations with and without the ControlNet
(the same seeds); the edges of each generation are compared with the control edges (F1 with one pixel of
slack), and the pixel classifier reads the shape drawn from the edges alone (empty caption).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from ipadapter_jax.diffusion.noise_schedule import NoiseSchedule, add_noise
from ipadapter_jax.diffusion.samplers import from_diffusers_config, sample_loop
from ipadapter_jax.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_params_from_unet
from ipadapter_jax.models.vae import decode_latents
from ipadapter_jax.toy.classify import classify
from ipadapter_jax.toy.shapes_dataset import make_examples
from ipadapter_jax.toy.tiny_unet import encode_captions, latent_moments, min_snr_loss, train_with_ema

CONTROLNET_STREAM, CHECK_STREAM = 40, 41  # make_examples streams of the training and check pictures
EDGE_THRESHOLD = 40.0  # Sobel magnitude (per channel, in 0..255 steps) above which a pixel is an edge


def edge_map(images: np.ndarray) -> np.ndarray:
    """uint8 pictures ``[..., H, W, 3]`` -> uint8 control images of the same shape: white (255) where the
    largest per-channel Sobel gradient exceeds ``EDGE_THRESHOLD``, black elsewhere, in all three channels
    (the look of a Canny control image). The border is replicated, so the picture's frame is no edge."""
    x = np.asarray(images, np.float32)
    lead = x.shape[:-3]
    x = x.reshape((-1,) + x.shape[-3:])
    # Sobel over the two spatial axes only (ndimage.sobel would also smooth across pictures and channels),
    # normalised so that a step of height c gives about c at the edge.
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    shift = lambda dy, dx: p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    gx = sum(k * (shift(dy, 1) - shift(dy, -1)) for dy, k in ((-1, 1), (0, 2), (1, 1))) / 4.0
    gy = sum(k * (shift(1, dx) - shift(-1, dx)) for dx, k in ((-1, 1), (0, 2), (1, 1))) / 4.0
    edges = (np.sqrt(gx * gx + gy * gy).max(axis=-1) > EDGE_THRESHOLD).astype(np.uint8) * 255
    return np.repeat(edges[..., None], 3, axis=-1).reshape(lead + x.shape[1:])


@dataclasses.dataclass(frozen=True)
class ToyControlNetSettings:
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 64)
    num_images: int = 8192
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 5e-4
    warmup_steps: int = 50
    drop_text: float = 0.5
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.99
    seed: int = 0
    check_images: int = 48
    check_steps: int = 20
    check_guidance: float = 4.0

    @classmethod
    def miniature(cls, seed: int = 0) -> "ToyControlNetSettings":
        """A few steps of everything: for tests of the trainer itself (the ControlNet learns nothing)."""
        return cls(num_images=64, steps=2, batch_size=8, warmup_steps=1, seed=seed, check_images=4, check_steps=2)


@dataclasses.dataclass
class ToyControlNet:
    config: ControlNetConfig
    params: dict
    final_loss: float
    seconds: float


def train_toy_controlnet(base, settings: ToyControlNetSettings = ToyControlNetSettings(),
                         log: Callable[[str], None] = print) -> ToyControlNet:
    """``base``: the toy base model (``pipeline.components.load_base_model``), frozen."""
    started = time.time()
    s = settings
    data = make_examples(s.num_images, s.seed, CONTROLNET_STREAM)
    edges = jnp.asarray(edge_map(data.images))  # uint8: a quarter of the float32 size
    text = base.text_encoders[0]
    unique = sorted(set(data.captions) | {""})
    contexts = jnp.asarray(encode_captions(text.module, text.params, base.tokenizers[0], unique))
    caption_index = jnp.asarray([unique.index(c) for c in data.captions], jnp.int32)
    empty_index = unique.index("")
    means, stds = latent_moments(base.vae.module, base.vae.params, data.images)

    unet, unet_params = base.unet.module, base.unet.params
    config = ControlNetConfig.from_unet(base.unet_config, conditioning_embedding_out_channels=tuple(
        s.conditioning_embedding_out_channels))
    controlnet = ControlNetModel(config)
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    k_init, k_train = jax.random.split(jax.random.key(s.seed))
    params = jax.jit(lambda k: controlnet_params_from_unet(config, unet_params, k))(k_init)

    def loss_fn(params, key):
        k_index, k_post, k_noise, k_time, k_drop = jax.random.split(key, 5)
        index = jax.random.randint(k_index, (s.batch_size,), 0, means.shape[0])
        x0 = (means[index] + stds[index] * jax.random.normal(k_post, means[index].shape)) * base.vae.config.scaling_factor
        dropped = jax.random.uniform(k_drop, (s.batch_size,)) < s.drop_text
        context = contexts[jnp.where(dropped, empty_index, caption_index[index])]
        noise = jax.random.normal(k_noise, x0.shape)
        t = jax.random.randint(k_time, (s.batch_size,), 0, schedule.num_train_timesteps)
        noisy = add_noise(schedule, x0, noise, t)
        control = edges[index].astype(jnp.float32) / 255.0
        res = controlnet.apply({"params": params}, noisy, t, context, control)
        pred = unet.apply({"params": unet_params}, noisy, t, context,
                          down_block_additional_residuals=res.down_block_residuals,
                          mid_block_additional_residual=res.mid_block_residual)
        return min_snr_loss(schedule, pred, x0, noise, t, s.min_snr_gamma)

    ema, loss = train_with_ema(loss_fn, params, k_train, s, log, "ControlNet")
    return ToyControlNet(config, ema, loss, time.time() - started)


def controlnet_generator(base, config: ControlNetConfig, steps: int, guidance: float):
    """``generate(controlnet_params, captions, control uint8 [N, 32, 32, 3], conditioning_scale, seed)`` ->
    float pictures ``[N, 32, 32, 3]`` in [0, 1]: DDIM with classifier-free guidance and the ControlNet on
    both halves (as diffusers' ControlNet pipelines, outside guess mode), compiled once. For the check only:
    ``IPAdapterPipeline`` takes ControlNets itself once its denoising loop does."""
    net, unet, text = ControlNetModel(config), base.unet.module, base.text_encoders[0]
    sampler = from_diffusers_config(base.scheduler_config, steps)

    @jax.jit
    def run(unet_params, net_params, vae_params, noise, context, control, scale):
        def denoise(latents, t):
            x = jnp.concatenate([latents, latents])
            tt = jnp.broadcast_to(t, (x.shape[0],))
            res = net.apply({"params": net_params}, x, tt, context, control, scale)
            out = unet.apply({"params": unet_params}, x, tt, context,
                             down_block_additional_residuals=res.down_block_residuals,
                             mid_block_additional_residual=res.mid_block_residual)
            uncond, cond = jnp.split(out, 2)
            return uncond + guidance * (cond - uncond)

        latents = sample_loop(sampler, denoise, noise)
        return jnp.clip(decode_latents(base.vae.module, vae_params, latents) / 2 + 0.5, 0.0, 1.0)

    def generate(net_params, captions: Sequence[str], control: np.ndarray, conditioning_scale: float, seed: int):
        unique = sorted(set(captions) | {""})
        encoded = encode_captions(text.module, text.params, base.tokenizers[0], unique)
        context = np.concatenate([encoded[[unique.index("")] * len(captions)],
                                  encoded[[unique.index(c) for c in captions]]])
        pixels = np.concatenate([control, control]).astype(np.float32) / 255.0
        f = base.vae_scale_factor
        noise = jax.random.normal(jax.random.key(seed), (len(captions), control.shape[1] // f,
                                                         control.shape[2] // f, base.unet_config.in_channels))
        return np.asarray(run(base.unet.params, net_params, base.vae.params, noise, jnp.asarray(context),
                              jnp.asarray(pixels), jnp.float32(conditioning_scale)))

    return generate


def edge_f1(generated: np.ndarray, control: np.ndarray) -> np.ndarray:
    """Per picture, F1 of the generation's edges against the control edges, each counted as matched within
    one pixel of the other (``generated`` float in [0, 1] or uint8; ``control`` uint8 edge maps)."""
    generated = np.asarray(generated)
    if generated.dtype != np.uint8:
        generated = (np.clip(generated, 0, 1) * 255).round().astype(np.uint8)
    ours, want = edge_map(generated)[..., 0] > 0, np.asarray(control)[..., 0] > 0
    grow = lambda m: ndimage.binary_dilation(m, np.ones((1, 3, 3), bool))  # noqa: E731
    recall = (want & grow(ours)).sum((1, 2)) / np.maximum(want.sum((1, 2)), 1)
    precision = (ours & grow(want)).sum((1, 2)) / np.maximum(ours.sum((1, 2)), 1)
    return 2 * precision * recall / np.maximum(precision + recall, 1e-9)


def structure_check(base, controlnet: ToyControlNet, settings: ToyControlNetSettings = ToyControlNetSettings(),
                    grid_path: str | Path | None = None) -> dict:
    """Held-out pictures' edges drive generations at conditioning scale 0 (the base alone) and 1, with the
    empty caption and with the full one; the same seeds for both scales."""
    from ipadapter_jax.toy.text_to_image_check import image_grid

    s = settings
    data = make_examples(s.check_images, s.seed, CHECK_STREAM, partial_captions=False)
    control = edge_map(data.images)
    generate = controlnet_generator(base, controlnet.config, s.check_steps, s.check_guidance)
    report, rows = {"images": s.check_images, "steps": s.check_steps, "guidance_scale": s.check_guidance}, []
    for prompt in ("empty", "full"):
        captions = [""] * len(data) if prompt == "empty" else data.captions
        for scale in (0.0, 1.0):
            images = generate(controlnet.params, captions, control, scale, s.seed)
            readings = [classify(image) for image in images]
            key = f"{prompt}_caption_scale_{scale:g}"
            report[key] = {
                "edge_f1": round(float(edge_f1(images, control).mean()), 4),
                "shape_accuracy": round(float(np.mean([r.shape == sp.shape for r, sp in zip(readings, data.specs)])), 4),
                "colour_accuracy": round(float(np.mean([r.colour == sp.colour
                                                        for r, sp in zip(readings, data.specs)])), 4),
            }
            rows.append(images[:8])
    if grid_path is not None:
        image_grid([data.images[:8], control[:8]] + rows).save(grid_path)
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m ipadapter_jax.toy.controlnet",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the toy base folder (ipadapter_jax/assets/toy/base)")
    parser.add_argument("--out", required=True, help="output ControlNet folder (diffusers ControlNetModel layout)")
    parser.add_argument("--grid", default=None, help="also save a picture grid of the check here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--miniature", action="store_true", help="a few steps: checks the trainer end to end")
    args = parser.parse_args(argv)
    from ipadapter_jax.compilation_cache import enable_compilation_cache
    from ipadapter_jax.pipeline.components import load_base_model
    from ipadapter_jax.weights.load_controlnet import save_controlnet

    enable_compilation_cache()
    cpu_started = time.process_time()
    settings = ToyControlNetSettings.miniature(args.seed) if args.miniature else ToyControlNetSettings(seed=args.seed)
    base = load_base_model(args.base)
    print("training the toy ControlNet (edge maps, base frozen) ...")
    trained = train_toy_controlnet(base, settings)
    out = Path(args.out)
    save_controlnet(trained.params, trained.config, out)
    print(f"  done in {trained.seconds:.0f}s; final loss {trained.final_loss:.4f}; wrote {out}")
    print("checking: held-out edge maps, generations with and without the ControlNet ...")
    summary = {
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(trained.params))),
        "bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
        "seconds": {"train": round(trained.seconds, 1), "total_cpu": None},
        "final_loss": round(trained.final_loss, 5),
        "check": structure_check(base, trained, settings, args.grid),
        "settings": dataclasses.asdict(settings),
    }
    summary["seconds"]["total_cpu"] = round(time.process_time() - cpu_started, 1)
    (out.parent / f"{out.name}_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(json.dumps(summary, indent=2, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
