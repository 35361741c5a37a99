"""A tiny text-conditioned SD-style UNet for the toy world, trained with this project's own UNet and noise
schedule on the coloured-shapes latents of the tiny VAE.

SD1.5's layout scaled down: cross-attention (to the mini CLIP's text hidden states) at both resolutions
(8x8 and 4x4) and in the mid block, so an IP-Adapter has seven cross-attention layers to attach to. Text is
replaced by the empty caption 10% of the time so classifier-free guidance works; the weights kept are an
exponential moving average of the trained ones (sharper samples for the same steps).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ipadapter_jax.conditioning import encode_text
from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.diffusion.noise_schedule import NoiseSchedule, add_noise, snr, training_target
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL
from ipadapter_jax.toy.shapes_dataset import IMAGE_SIZE, make_examples, render
from ipadapter_jax.toy.tiny_vae import TinyVae, to_signed

UNET_STREAM = 30  # make_examples stream of the UNet's training images
LATENT_SIZE = 8

# SD1.5's scheduler (scaled-linear betas) with v-prediction, which trains faster and samples better than
# epsilon-prediction for a model this small; DDIM with "trailing" timesteps, so that even a few-step sampling
# starts at the last (noisiest) timestep, where the pure-noise start actually is.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "trailing", "trained_betas": None,
    "rescale_betas_zero_snr": False,
}


@dataclasses.dataclass(frozen=True)
class TinyUnetSettings:
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    heads: int = 4
    norm_num_groups: int = 8
    num_images: int = 8192
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    drop_text: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.995
    seed: int = 0

    def raw_config(self, cross_attention_dim: int) -> dict:
        """The diffusers ``unet/config.json`` dict."""
        n = len(self.block_out_channels)
        return {
            "sample_size": LATENT_SIZE, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
            "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
            "down_block_types": ["CrossAttnDownBlock2D"] * n, "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["CrossAttnUpBlock2D"] * n, "cross_attention_dim": cross_attention_dim,
            "attention_head_dim": self.heads, "norm_num_groups": self.norm_num_groups, "norm_eps": 1e-5,
            "downsample_padding": 1, "mid_block_scale_factor": 1, "use_linear_projection": False,
            "upcast_attention": False,
        }


@dataclasses.dataclass
class TinyUnet:
    raw_config: dict
    params: dict
    final_loss: float
    seconds: float


def encode_captions(text_module, text_params, tokenizer: CaptionTokenizer, captions) -> np.ndarray:
    """``[len(captions), 77, hidden]``: the SD conditioning of ``captions`` (``conditioning.encode_text``)."""
    encode = jax.jit(lambda p, ids: encode_text((text_module,), {"text_encoder": p}, [ids]).context)
    return np.asarray(encode(text_params, jnp.asarray(tokenizer(list(captions)))), np.float32)


def latent_moments(vae_module: AutoencoderKL, vae_params, images_uint8) -> tuple[jax.Array, jax.Array]:
    """The VAE posterior's mean and standard deviation ``[N, h, w, C]`` of uint8 images ``[N, H, W, 3]``
    (unscaled: a training latent is ``(mean + std * noise) * scaling_factor``)."""
    encode = jax.jit(lambda x: vae_module.apply({"params": vae_params}, x, method=AutoencoderKL.encode))
    moments = [encode(to_signed(images_uint8[i:i + 512])) for i in range(0, len(images_uint8), 512)]
    means = jnp.concatenate([m for m, _ in moments])
    stds = jnp.exp(0.5 * jnp.concatenate([lv for _, lv in moments]))
    return means, stds


def min_snr_loss(schedule: NoiseSchedule, pred: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array,
                 gamma: float) -> jax.Array:
    """The toy models' diffusion loss: squared error to the schedule's target, per example, with Min-SNR
    weighting (Hang et al. 2023) for v-prediction, ``min(SNR, gamma) / (SNR + 1)``."""
    per_example = jnp.mean(jnp.square(pred - training_target(schedule, x0, noise, t)), axis=(1, 2, 3))
    ratio = snr(schedule, t)
    weight = jnp.minimum(ratio, gamma) / (ratio + 1.0)
    return jnp.mean(weight * per_example)


def train_with_ema(loss_fn: Callable[[Any, jax.Array], jax.Array], params: Any, key: jax.Array, settings: Any,
                   log: Callable[[str], None], what: str) -> tuple[Any, float]:
    """The toy models' optimisation (the UNet's and the ControlNet's): ``settings.steps`` AdamW steps on
    ``loss_fn(params, key)`` with gradients clipped at 1, the learning rate constant after
    ``settings.warmup_steps`` (as SD was trained, the EMA doing the averaging a decay would), and an EMA of
    the weights. Returns ``(EMA weights as float32 numpy, mean loss of the last 50 steps)``."""
    lr = optax.linear_schedule(0.0, settings.learning_rate, settings.warmup_steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))
    opt_state = tx.init(params)
    ema = params

    @jax.jit
    def step(params, opt_state, ema, i):
        loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(key, i))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = jnp.minimum(settings.ema_decay, (1.0 + i) / (10.0 + i))
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return params, opt_state, ema, loss

    recent = []
    for i in range(settings.steps):
        params, opt_state, ema, loss = step(params, opt_state, ema, i)
        recent = (recent + [float(loss)])[-50:]
        if (i + 1) % max(1, settings.steps // 10) == 0 or i == 0:
            log(f"  {what} step {i + 1}/{settings.steps}: loss {np.mean(recent):.4f} (mean of the last {len(recent)})")
    return jax.tree.map(lambda x: np.asarray(x, np.float32), ema), float(np.mean(recent))


def train_tiny_unet(vae: TinyVae, text_module, text_params, tokenizer: CaptionTokenizer,
                    settings: TinyUnetSettings = TinyUnetSettings(), log: Callable[[str], None] = print, *,
                    raw_config: dict | None = None, params: dict | None = None,
                    image_size: int = IMAGE_SIZE) -> TinyUnet:
    """``text_module``/``text_params``: the SD text encoder (``CLIPTextModel``). ``raw_config`` and ``params``:
    another UNet to train and its starting weights (default: ``settings``' layout, initialised here);
    ``image_size``: the side the toy images are rendered at (``ipadapter_jax.testing``'s random world
    pretrains its UNet this way at 64 px)."""
    started = time.time()
    s = settings
    data = make_examples(s.num_images, s.seed, UNET_STREAM)
    images = data.images if image_size == IMAGE_SIZE else np.stack([render(spec, image_size) for spec in data.specs])
    unique = sorted(set(data.captions) | {""})
    contexts = jnp.asarray(encode_captions(text_module, text_params, tokenizer, unique))
    caption_index = jnp.asarray([unique.index(c) for c in data.captions], jnp.int32)
    empty_index = unique.index("")

    means, stds = latent_moments(AutoencoderKL(vae.config), vae.params, images)

    raw = raw_config or s.raw_config(cross_attention_dim=int(contexts.shape[-1]))
    config = UNetConfig.from_diffusers(raw)
    unet = UNet2DConditionModel(config)
    schedule = NoiseSchedule.from_config(SCHEDULER_CONFIG)
    key = jax.random.key(s.seed)
    k_init, k_train = jax.random.split(key)
    if params is None:
        params = jax.jit(lambda k: unet.init_params(k, LATENT_SIZE, int(contexts.shape[1])))(k_init)
    params = jax.tree.map(jnp.asarray, params)

    def loss_fn(params, key):
        k_index, k_post, k_noise, k_time, k_drop = jax.random.split(key, 5)
        index = jax.random.randint(k_index, (s.batch_size,), 0, means.shape[0])
        z = means[index] + stds[index] * jax.random.normal(k_post, means[index].shape)
        x0 = z * vae.config.scaling_factor
        dropped = jax.random.uniform(k_drop, (s.batch_size,)) < s.drop_text
        context = contexts[jnp.where(dropped, empty_index, caption_index[index])]
        noise = jax.random.normal(k_noise, x0.shape)
        t = jax.random.randint(k_time, (s.batch_size,), 0, schedule.num_train_timesteps)
        pred = unet.apply({"params": params}, add_noise(schedule, x0, noise, t), t, context)
        return min_snr_loss(schedule, pred, x0, noise, t, s.min_snr_gamma)

    ema, loss = train_with_ema(loss_fn, params, k_train, s, log, "UNet")
    return TinyUnet(raw, ema, loss, time.time() - started)
