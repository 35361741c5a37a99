"""The training objective against a PyTorch reference written the way tencent's ``tutorial_train.py`` and
diffusers' training scripts compute it (diffusers VAE / UNet with ``_load_ip_adapter_weights``, transformers
CLIP encoders, ``DDPMScheduler.add_noise`` / ``get_velocity``, ``compute_snr``), from the same batch, noise
and timesteps; plus gradient accumulation against separately computed micro-batch gradients.

Metric: per-example loss, max |ours - reference| / mean reference loss <= 1e-4 (fp32). SD1.5-style with a plain
adapter (v-prediction, the tiny world's), and SDXL-style with a Plus adapter (epsilon, random weights).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from train_support import world  # noqa: F401
from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.diffusion.noise_schedule import NoiseSchedule
from ipadapter_jax.models.adapter import new_ip_adapter
from ipadapter_jax.models.image_projection import ProjectionConfig
from ipadapter_jax.train.frozen import load_frozen_models
from ipadapter_jax.train.config import OptimizerConfig
from ipadapter_jax.train.state import (TrainState, cross_attention_kv, learning_rate_schedule, make_optimizer,
                                       state_initializer)
from ipadapter_jax.train.step import (StepSettings, draw_noise, encode_batch, latent_shape, make_train_step,
                                      per_example_loss)
from ipadapter_jax.testing.random_model import write_random_model
from ipadapter_jax.toy.shapes_dataset import make_examples, shard_members
from ipadapter_jax.weights.ip_adapter_file import load_ip_adapter, save_ip_adapter

TOL = 1e-4
BATCH = 4
RESOLUTION = 64


def _batch(modules, sdxl: bool) -> dict:
    from ipadapter_jax.data.examples import ExampleProcessor

    processor = ExampleProcessor(RESOLUTION, clip_config=modules.clip_image_config)
    members = shard_members(make_examples(BATCH, seed=7), "t", labels=False)
    examples = [processor.process(members[2 * i][1], members[2 * i + 1][1].decode(), f"t{i}") for i in range(BATCH)]
    captions = [e.caption for e in examples]
    captions[1] = ""  # a dropped caption
    batch = {"pixels": np.stack([e.pixels for e in examples]),
             "clip_pixels": np.stack([e.clip_pixels for e in examples]),
             "input_ids": CaptionTokenizer(modules.tokenizer_dir)(captions),
             "drop_image": np.array([False, False, True, False])}
    if sdxl:
        batch["input_ids_2"] = CaptionTokenizer(modules.tokenizer_2_dir)(captions)
        batch["original_size"] = np.asarray([e.original_size for e in examples], np.int32)
        batch["crop_top_left"] = np.asarray([e.crop_top_left for e in examples], np.int32)
    return batch


class Case:
    def __init__(self, model: Path, variant: str, prediction_type: str, tmp_path: Path):
        self.model = model
        self.frozen_models = load_frozen_models(model, compute_dtype="float32")
        modules = self.frozen_models.modules
        schedule = NoiseSchedule.from_config({**modules.scheduler_config, "prediction_type": prediction_type})
        self.modules = dataclasses.replace(modules, schedule=schedule)
        self.scheduler_config = {**modules.scheduler_config, "prediction_type": prediction_type}
        cross = modules.unet_config.cross_attention_dim
        if variant == "plain":
            projection = ProjectionConfig("plain", modules.image_embed_dim, cross, 4)
        else:
            projection = ProjectionConfig("plus", modules.image_hidden_dim, cross, 8, hidden_dim=64, depth=4,
                                          heads=1, dim_head=64)
        self.adapter = new_ip_adapter(modules.unet_config, self.frozen_models.host_params["unet"], projection,
                                      jax.random.key(3))
        # Perturb the paper initialisation so the image branch is not a copy of the text branch.
        leaves, tree = jax.tree.flatten(self.adapter.params)
        keys = jax.random.split(jax.random.key(4), len(leaves))
        self.adapter.params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                                        for x, k in zip(leaves, keys)])
        self.adapter_path = tmp_path / "adapter.safetensors"
        save_ip_adapter(self.adapter, self.adapter_path)
        self.frozen = jax.tree.map(jnp.asarray, self.frozen_models.params_in("float32"))
        self.batch = _batch(self.modules, self.modules.is_sdxl)

    def ours(self, settings: StepSettings, rng) -> np.ndarray:
        def loss(params, frozen, batch, rng):
            return per_example_loss(params, self.modules, frozen, encode_batch(self.modules, frozen, batch, rng,
                                                                               settings), settings)
        return np.asarray(jax.jit(loss)(self.adapter.params, self.frozen, self.batch, rng))

    def reference(self, settings: StepSettings, rng) -> np.ndarray:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.training_utils import compute_snr
        from safetensors.torch import load_file
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        _, noise, t = draw_noise(rng, latent_shape(self.modules, BATCH, RESOLUTION),
                                 self.modules.schedule.num_train_timesteps, settings.noise_offset)
        noise = torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())
        t = torch.from_numpy(np.asarray(t)).long()
        b = {k: torch.from_numpy(np.asarray(v)) for k, v in self.batch.items()}
        vae = AutoencoderKL.from_pretrained(self.model / "vae").eval()
        unet = UNet2DConditionModel.from_pretrained(self.model / "unet").eval()
        flat = load_file(str(self.adapter_path))
        unet._load_ip_adapter_weights([{p: {k[len(p) + 1:]: v for k, v in flat.items() if k.startswith(p + ".")}
                                        for p in ("image_proj", "ip_adapter")}])
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(self.model / "image_encoder").eval()
        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        with torch.no_grad():
            latents = vae.encode(b["pixels"].permute(0, 3, 1, 2)).latent_dist.mean * vae.config.scaling_factor
            noisy = scheduler.add_noise(latents, noise, t)
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
            clip_pixels = b["clip_pixels"].permute(0, 3, 1, 2)
            drop = b["drop_image"]
            added = {}
            if self.modules.is_sdxl:
                te1 = CLIPTextModel.from_pretrained(self.model / "text_encoder").eval()
                te2 = CLIPTextModelWithProjection.from_pretrained(self.model / "text_encoder_2").eval()
                out1 = te1(b["input_ids"].long(), output_hidden_states=True)
                out2 = te2(b["input_ids_2"].long(), output_hidden_states=True)
                text = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
                time_ids = torch.cat([b["original_size"], b["crop_top_left"],
                                      torch.full_like(b["original_size"], RESOLUTION)], dim=1).float()
                added = {"text_embeds": out2.text_embeds, "time_ids": time_ids}
            else:
                te = CLIPTextModel.from_pretrained(self.model / "text_encoder").eval()
                text = te(b["input_ids"].long())[0]
            if self.adapter.projection.uses_hidden_states:  # Plus: a dropped image is a zero image
                pixels = torch.where(drop[:, None, None, None], torch.zeros_like(clip_pixels), clip_pixels)
                features = image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
            else:  # plain: a dropped image is a zero embedding
                features = torch.where(drop[:, None], 0.0, image_encoder(clip_pixels).image_embeds)
            added["image_embeds"] = [features.unsqueeze(1)]
            pred = unet(noisy, t, text, added_cond_kwargs=added).sample
            loss = ((pred.float() - target.float()) ** 2).mean(dim=[1, 2, 3])
            if settings.min_snr_gamma:
                snr = compute_snr(scheduler, t)
                weight = torch.stack([snr, settings.min_snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
                weight = weight / snr if scheduler.config.prediction_type == "epsilon" else weight / (snr + 1)
                loss = loss * weight
        return loss.numpy()


@pytest.fixture(scope="module")
def sd15(world, tmp_path_factory):
    return Case(Path(world["model"]), "plain", "v_prediction", tmp_path_factory.mktemp("sd15_case"))


@pytest.fixture(scope="module")
def sdxl_plus(tmp_path_factory):
    model = write_random_model(tmp_path_factory.mktemp("sdxl") / "model", arch="sdxl", seed=1)
    return Case(model, "plus", "epsilon", tmp_path_factory.mktemp("sdxl_case"))


@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("case_name", ["sd15", "sdxl_plus"])
def test_loss_matches_the_pytorch_reference(case_name, gamma, request):
    case = request.getfixturevalue(case_name)
    settings = StepSettings(case.adapter.projection, RESOLUTION, min_snr_gamma=gamma, sample_posterior=False)
    rng = jax.random.key(11)
    ours, ref = case.ours(settings, rng), case.reference(settings, rng)
    err = np.abs(ours - ref).max() / ref.mean()
    print(f"{case_name} min_snr_gamma={gamma}: losses {np.round(ref, 4)}, max relative diff {err:.2e}")
    assert err <= TOL
    assert ref.std() > 0
    if gamma:  # the weighting is exercised: some example's weight is not 1
        plain = case.reference(dataclasses.replace(settings, min_snr_gamma=0.0), rng)
        assert np.abs(plain - ref).max() > 1e-3


def test_gradient_accumulation_averages_micro_batch_gradients(sd15):
    modules, settings = sd15.modules, StepSettings(sd15.adapter.projection, RESOLUTION, sample_posterior=False)
    tx = optax.sgd(1.0)  # the update is minus the gradient: compares gradients directly
    params = sd15.adapter.params
    state = TrainState(jnp.asarray(3, jnp.int32), params, tx.init(params))
    accumulated = make_train_step(modules, tx, optax.constant_schedule(1.0),
                                  dataclasses.replace(settings, grad_accum_steps=2))
    new_state, metrics = jax.jit(accumulated)(state, sd15.frozen, sd15.batch, jax.random.key(5))

    def loss_fn(p, micro, rng):
        encoded = encode_batch(modules, sd15.frozen, micro, rng, settings)
        return jnp.mean(per_example_loss(p, modules, sd15.frozen, encoded, settings))

    micro_grad = jax.jit(jax.value_and_grad(loss_fn))
    step_rng = jax.random.fold_in(jax.random.key(5), 3)
    grads, losses = [], []
    for i in range(2):  # micro-batch i holds rows i, i+2, ...
        loss, grad = micro_grad(params, {k: v[i::2] for k, v in sd15.batch.items()}, jax.random.fold_in(step_rng, i))
        grads.append(grad)
        losses.append(loss)
    expected = jax.tree.map(lambda p, a, b: p - (a + b) / 2, params, *grads)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new_state.params),
                                                            jax.tree.leaves(expected)))
    assert diff <= 1e-6, diff
    assert abs(float(metrics["loss"]) - float(sum(losses) / 2)) <= 1e-6
    assert int(new_state.step) == 4


@pytest.mark.parametrize("schedule, middle", [("cosine", 1e-4 + 0.5 * 9e-4), ("linear", 1e-4 + 0.5 * 9e-4),
                                              ("constant", 1e-3)])
def test_learning_rate_warms_up_then_follows_the_schedule(schedule, middle):
    config = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, schedule=schedule, final_lr_fraction=0.1)
    lr = learning_rate_schedule(config, num_steps=110)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 60, 110)],
                               [0.0, 5e-4, 1e-3, middle, 1e-3 if schedule == "constant" else 1e-4], rtol=1e-5)


def test_fine_tuning_starts_from_the_given_adapter_file(sd15):
    tx, _ = make_optimizer(OptimizerConfig(), 100)
    modules = sd15.modules
    kv = cross_attention_kv(modules.unet_config, sd15.frozen_models.host_params["unet"])
    init = state_initializer(modules.unet_config, sd15.adapter.projection, tx, load_ip_adapter(sd15.adapter_path))
    state = jax.jit(init)(jax.random.key(0), kv)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(sd15.adapter.params)):
        assert a.dtype == jnp.float32 and np.array_equal(np.asarray(a), np.asarray(b))
    other = dataclasses.replace(sd15.adapter.projection, num_tokens=8)
    with pytest.raises(ValueError, match="set the adapter.\\* config to match the file"):
        state_initializer(modules.unet_config, other, tx, load_ip_adapter(sd15.adapter_path))


def test_noise_offset_shifts_each_example_and_channel_by_a_constant():
    shape = (4, 8, 8, 4)
    _, plain, t = draw_noise(jax.random.key(2), shape, 1000)
    _, offset, t2 = draw_noise(jax.random.key(2), shape, 1000, noise_offset=0.1)
    shift = np.asarray(offset - plain)
    assert np.array_equal(np.asarray(t), np.asarray(t2))
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1, :], shape), atol=1e-6)
    assert 0.01 < np.abs(shift[:, 0, 0, :]).mean() < 0.3  # 0.1 * |N(0, 1)| on average ~0.08
