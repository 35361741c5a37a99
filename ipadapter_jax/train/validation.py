"""Validation grids during training: fixed image prompts sampled at several IP-Adapter scales.

Rows are the image prompts (``validation.images``, or the first ``validation.num_images`` usable samples of
the first training shard); the first column shows each prompt as the VAE sees it, then one column per
scale in ``validation.scales``. The noise is fixed, so grids of different steps compare directly. Written to
``WORKDIR/validation/step_<N>.png`` and TensorBoard. Sampling is the pipeline's compiled ``generate`` (the
same loop users run), with classifier-free guidance against an empty caption and a dropped image.
"""

from __future__ import annotations

import functools
import io
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ipadapter_jax.conditioning import added_conditioning, encode_image_prompt, encode_text, sdxl_time_ids
from ipadapter_jax.data.examples import Example, ExampleProcessor
from ipadapter_jax.data.shards import expand_shard_spec
from ipadapter_jax.data.tar_samples import iter_shard_samples, sample_image_bytes
from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.diffusion.samplers import make_sampler
from ipadapter_jax.models.vae import decode_latents
from ipadapter_jax.pipeline.denoise import GenerateInputs, GenerateSettings, GenerateWeights, generate
from ipadapter_jax.pipeline.sharded_batch import place_generate_inputs
from ipadapter_jax.train.checkpoint import host_copy
from ipadapter_jax.train.sharding import put_host_tree

logger = logging.getLogger(__name__)


def validation_examples(setup) -> list[Example]:
    """The image prompts, decoded and preprocessed like training images (no caption needed)."""
    cfg = setup.config.validation
    processor = ExampleProcessor(setup.config.data.resolution, clip_config=setup.modules.clip_image_config)
    examples = []
    if cfg.images:
        for path in cfg.images:
            examples.append(processor.process(Path(path).read_bytes(), "", str(path)))
        return examples
    for sample in iter_shard_samples(expand_shard_spec(setup.image_shards)[0]):
        data = sample_image_bytes(sample)
        if data is None:
            continue
        try:
            examples.append(processor.process(data, "", sample["__key__"]))
        except ValueError:  # undecodable: skip, as training does
            continue
        if len(examples) == cfg.num_images:
            break
    if not examples:
        raise ValueError(f"no usable validation image in {expand_shard_spec(setup.image_shards)[0]}")
    return examples


def _decode(vae_module, vae_config, vae_params, latents):
    return decode_latents(vae_module, vae_params, latents, vae_config, clip=False)


class Validator:
    """Built once (encodes the fixed prompts); ``run(adapter_params, step, log)`` writes one grid."""

    def __init__(self, setup):
        self.setup = setup
        cfg = setup.config.validation
        modules = setup.modules
        examples = validation_examples(setup)
        n = len(examples)
        self.reference = np.stack([e.pixels for e in examples])  # [n, R, R, 3] in [-1, 1]
        prompt_ids = self._token_ids(modules.tokenizer_dir, [cfg.prompt] * n, [""] * n)
        prompt_ids_2 = (self._token_ids(modules.tokenizer_2_dir, [cfg.prompt] * n, [""] * n)
                        if modules.tokenizer_2_dir else None)
        clip_pixels = np.concatenate([np.stack([e.clip_pixels for e in examples])] * 2)
        dropped = np.concatenate([np.ones(n, bool), np.zeros(n, bool)])  # negative half first
        resolution = setup.config.data.resolution
        size = np.full((2 * n, 2), resolution, np.int32)

        def encode(frozen, ids, ids_2, pixels, drop, size):
            text = encode_text(modules.text_encoders, frozen, [ids, ids_2])
            added = added_conditioning(text, sdxl_time_ids(size, jnp.zeros_like(size), resolution))
            features = encode_image_prompt(modules.image_encoder, frozen["image_encoder"], pixels, drop,
                                           setup.projection.uses_hidden_states)
            return text.context, added, features

        inputs = self._replicated((prompt_ids, prompt_ids_2, clip_pixels, dropped, size))
        context, added, features = jax.jit(encode)(setup.frozen, *inputs)
        latent = resolution // modules.latent_downsample
        noise = jax.random.normal(jax.random.key(cfg.seed), (n, latent, latent, modules.unet_config.in_channels))
        # The noise split over the training mesh (padded to its batch multiple), as the pipeline samples.
        self.noise, self.context, self.added, features, self.n = place_generate_inputs(
            setup.mesh, setup.config.mesh, noise, context, added, [features], 2)
        self.features = features[0]
        self.sampler = make_sampler(cfg.sampler, modules.scheduler_config, cfg.num_inference_steps)
        self.settings = GenerateSettings(modules.unet, modules.unet_config,
                                         functools.partial(_decode, modules.vae, modules.vae_config),
                                         (setup.projection,), guided=cfg.guidance_scale > 1.0)
        self.num_layers = len(modules.unet_config.cross_attention_layers())

    def _token_ids(self, folder, prompts, negatives):
        tokenizer = CaptionTokenizer(folder, max_length=self.setup.modules.text_length)
        return np.concatenate([tokenizer(negatives), tokenizer(prompts)])

    def _replicated(self, tree):
        host = jax.tree.map(np.asarray, tree)
        return put_host_tree(host, jax.tree.map(lambda _: self.setup.replicated, host))

    def images(self, adapter_params, scale: float) -> np.ndarray:
        """``[n, R, R, 3]`` float32 in [0, 1] at one IP-Adapter scale."""
        cfg, frozen = self.setup.config.validation, self.setup.frozen
        scales = self._replicated(np.full((1, self.num_layers), scale, np.float32))
        weights = GenerateWeights(frozen["unet"], frozen["vae"], [adapter_params])
        inputs = GenerateInputs(self.noise, self.sampler, self.context, self.added, [self.features], scales,
                                jnp.asarray(cfg.guidance_scale, jnp.float32))
        with jax.set_mesh(self.setup.mesh):  # the Pallas kernels (auto on TPU) run per device under it
            out = generate(self.settings, weights, inputs)
        return host_copy(out)[: self.n]

    def grid(self, adapter_params) -> np.ndarray:
        """uint8 ``[n * R, (1 + len(scales)) * R, 3]``."""
        columns = [np.clip(self.reference / 2 + 0.5, 0, 1)]
        columns += [self.images(adapter_params, s) for s in self.setup.config.validation.scales]
        rows = [np.concatenate([c[i] for c in columns], axis=1) for i in range(len(self.reference))]
        return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)

    def run(self, adapter_params, step: int, log) -> Path | str | None:
        """Writes ``WORKDIR/validation/step_<step>.png`` (whole or not at all, local or at a URL); returns it."""
        grid = self.grid(adapter_params)
        if jax.process_index() != 0:
            return None
        png = io.BytesIO()
        Image.fromarray(grid).save(png, format="PNG")
        files = self.setup.workdir
        name = f"validation/step_{step:08d}.png"
        files.write_atomic(name, png.getvalue())
        path = Path(files / name) if files.is_local else files / name
        log.image("validation/grid", grid, step)
        logger.info("validation grid: %s (columns: reference, scales %s)", path, list(self.setup.config.validation.scales))
        return path
