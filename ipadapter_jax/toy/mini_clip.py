"""A mini CLIP for the toy world: text and image towers trained contrastively on coloured-shapes images.

The loss is CLIP's image -> text contrastive term with every caption of the world as a candidate: a softmax
over the twelve caption embeddings ("a red circle", ...), one positive per image. The symmetric text -> image
term is left out: with twelve captions a batch holds many images per caption, and that term (with all of
them as positives) made the towers collapse to a constant output. Images get light noise and blur so that
the encoder also reads the slightly soft images a VAE decodes (CLIP-I is computed on generations).

The result is written three ways: ``text_encoder/`` (transformers ``CLIPTextModel``, SD's text encoder, no
projection), ``image_encoder/`` (``CLIPVisionModelWithProjection``, IP-Adapter's image encoder) and a full
``CLIPModel`` folder (both projections and ``logit_scale``: what CLIP-I / CLIP-T evaluation loads).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ipadapter_jax.data.clip_image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.toy.shapes_dataset import IMAGE_SIZE, all_full_captions, make_examples
from ipadapter_jax.weights import transformers_folders as tf
from ipadapter_jax.weights.load_clip import init_clip_text_encoder, init_clip_vision_encoder
from ipadapter_jax.weights.pipeline_folder import copy_tokenizer

CLIP_STREAM, CLIP_EVAL_STREAM = 10, 11  # make_examples streams of the training and held-out images


@dataclasses.dataclass(frozen=True)
class MiniClipSettings:
    text_hidden: int = 64  # also the UNet's cross_attention_dim (SD feeds it the text hidden states)
    text_layers: int = 2
    vision_hidden: int = 64
    vision_layers: int = 3
    heads: int = 4
    patch_size: int = 8  # a 4x4 grid of patches: 4x cheaper than 4-pixel patches and it learns shapes faster
    projection_dim: int = 64  # the image embedding an IP-Adapter projects
    num_images: int = 16384
    steps: int = 2000  # at most: training stops once the held-out accuracy reaches target_accuracy
    batch_size: int = 64
    # Constant after the warmup: with a cosine decay (at any peak from 1e-4 to 1e-3) the vision tower lost its
    # shape features mid-run and fell back to colour only; constant rates up to 3e-4 trained steadily.
    learning_rate: float = 2.5e-4
    warmup_steps: int = 50
    eval_every: int = 100  # held-out accuracy is measured this often; the best parameters seen are kept
    target_accuracy: float = 0.99
    logit_scale: float = 20.0  # a fixed softmax temperature (1/20): twelve classes need no learned one
    seed: int = 0


@dataclasses.dataclass
class MiniClip:
    """``text_params``: ``{"text_model", "text_projection"}``; ``vision_params``: ``{"vision_model",
    "visual_projection"}``; configs are transformers config dicts of the with-projection models."""

    text_config: dict
    vision_config: dict
    text_params: dict
    vision_params: dict
    logit_scale: float
    heldout_accuracy: float
    seconds: float

    def text_encoder(self) -> tuple[dict, dict]:
        """SD's ``text_encoder/`` as (transformers config, params): a ``CLIPTextModel`` (no projection)."""
        return {**self.text_config, "architectures": ["CLIPTextModel"]}, {"text_model": self.text_params["text_model"]}

    def image_encoder(self) -> tuple[dict, dict]:
        """IP-Adapter's ``image_encoder/`` as (transformers config, params): a ``CLIPVisionModelWithProjection``."""
        return self.vision_config, self.vision_params


def write_clip_folder(folder: str | Path, tokenizer_dir: str | Path, clip: MiniClip) -> Path:
    """The full mini CLIP (``CLIPModel``: both towers, both projections, ``logit_scale``) with its tokenizer
    and image processor: what CLIP-I / CLIP-T evaluation loads."""
    config = tf.clip_model_config(clip.text_config, clip.vision_config, clip.text_config["projection_dim"],
                                  clip.logit_scale)
    folder = tf.write_transformers_folder(folder, config, {**clip.text_params, **clip.vision_params},
                                          {"logit_scale": np.asarray(clip.logit_scale, np.float32)})
    processor = tf.clip_image_processor_config(clip.vision_config["image_size"])
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True))
    copy_tokenizer(tokenizer_dir, folder)
    return folder


def normalise_pixels(images_01: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` in [0, 1] -> CLIP-normalised, as ``CLIPImageProcessor`` does."""
    return (images_01 - jnp.asarray(OPENAI_CLIP_MEAN, jnp.float32)) / jnp.asarray(OPENAI_CLIP_STD, jnp.float32)


def _augment(images_01: jax.Array, key: jax.Array) -> jax.Array:
    """A random mix with a 3x3 box blur and Gaussian noise, per image."""
    k_blur, k_noise, k_level = jax.random.split(key, 3)
    padded = jnp.pad(images_01, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = images_01.shape[1:3]
    blurred = sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    batch = images_01.shape[0]
    mix = jax.random.uniform(k_blur, (batch, 1, 1, 1), maxval=0.8)
    noise_level = jax.random.uniform(k_level, (batch, 1, 1, 1), maxval=0.06)
    out = (1 - mix) * images_01 + mix * blurred + noise_level * jax.random.normal(k_noise, images_01.shape)
    return jnp.clip(out, 0.0, 1.0)


def _l2_normalise(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def train_mini_clip(tokenizer_dir, settings: MiniClipSettings = MiniClipSettings(),
                    log: Callable[[str], None] = print) -> MiniClip:
    started = time.time()
    s = settings
    tokenizer = CaptionTokenizer(tokenizer_dir)
    hf = tokenizer.tokenizer
    text_cfg = tf.text_config(len(hf), hf.bos_token_id, hf.eos_token_id, hidden_size=s.text_hidden,
                              layers=s.text_layers, heads=s.heads, intermediate_size=2 * s.text_hidden,
                              projection_dim=s.projection_dim, max_position_embeddings=tokenizer.max_length,
                              with_projection=True)
    vision_cfg = tf.vision_config(image_size=IMAGE_SIZE, patch_size=s.patch_size, hidden_size=s.vision_hidden,
                                  layers=s.vision_layers, heads=s.heads, intermediate_size=2 * s.vision_hidden,
                                  projection_dim=s.projection_dim)
    key = jax.random.key(s.seed)
    k_text, k_vision, k_train = jax.random.split(key, 3)
    text_module, text_params = init_clip_text_encoder(text_cfg, key=k_text)
    vision_module, vision_params = init_clip_vision_encoder(vision_cfg, key=k_vision)

    captions = all_full_captions()
    caption_ids = jnp.asarray(tokenizer(captions))
    data = make_examples(s.num_images, s.seed, CLIP_STREAM, partial_captions=False)
    images = jnp.asarray(data.images)
    labels = jnp.asarray(data.class_index)

    def embed(params, pixels_01):
        image = vision_module.apply({"params": params["vision"]}, normalise_pixels(pixels_01),
                                    output_hidden_states=False).image_embeds
        text = text_module.apply({"params": params["text"]}, caption_ids, output_hidden_states=False).text_embeds
        return _l2_normalise(image), _l2_normalise(text)

    def loss_fn(params, batch_images, batch_labels, key):
        image, text = embed(params, _augment(batch_images.astype(jnp.float32) / 255.0, key))
        logits = s.logit_scale * image @ text.T  # [B, classes]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == batch_labels)

    schedule = optax.linear_schedule(0.0, s.learning_rate, s.warmup_steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    params = {"text": text_params, "vision": vision_params}
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, i):
        k_batch, k_aug = jax.random.split(jax.random.fold_in(k_train, i))
        index = jax.random.choice(k_batch, images.shape[0], (s.batch_size,), replace=False)
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images[index], labels[index],
                                                                             k_aug)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, accuracy

    heldout = make_examples(512, s.seed, CLIP_EVAL_STREAM, partial_captions=False)
    heldout_images = jnp.asarray(heldout.images, jnp.float32) / 255.0

    @jax.jit
    def heldout_accuracy(params):
        image, text = embed(params, heldout_images)
        return jnp.mean(jnp.argmax(image @ text.T, -1) == jnp.asarray(heldout.class_index))

    to_numpy = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)  # noqa: E731
    # Keeping the best parameters seen guards against a late collapse; stopping at the target saves time.
    best, best_accuracy, losses = to_numpy(params), -1.0, []
    for i in range(s.steps):
        params, opt_state, loss, _ = step(params, opt_state, i)
        losses.append(float(loss))
        if (i + 1) % s.eval_every == 0 or i + 1 == s.steps:
            accuracy = float(heldout_accuracy(params))
            log(f"  mini-CLIP step {i + 1}/{s.steps}: loss {np.mean(losses[-s.eval_every:]):.4f}, "
                f"held-out accuracy {accuracy:.3f}")
            if accuracy > best_accuracy:
                best, best_accuracy = to_numpy(params), accuracy
            if accuracy >= s.target_accuracy:
                break
    return MiniClip(text_cfg, vision_cfg, best["text"], best["vision"], float(np.log(s.logit_scale)),
                    best_accuracy, time.time() - started)
