"""Each piece of the toy-world build at miniature size (a few training steps): the mini CLIP's three folders
load in transformers with matching outputs, the VAE and UNet folders in diffusers with matching outputs
(max abs difference <= 1e-4, float32), training is deterministic, and the whole build runs end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ipadapter_jax.data.tokenize import CaptionTokenizer
from ipadapter_jax.toy.mini_clip import MiniClipSettings, train_mini_clip
from ipadapter_jax.toy.shapes_dataset import make_examples
from ipadapter_jax.toy.tiny_unet import TinyUnetSettings, train_tiny_unet
from ipadapter_jax.toy.tiny_vae import TinyVaeSettings, train_tiny_vae
from ipadapter_jax.toy.toy_tokenizer import write_toy_tokenizer

TOL = 1e-4
QUIET = lambda _: None  # noqa: E731
MINI_CLIP = MiniClipSettings(num_images=32, steps=2, batch_size=8, warmup_steps=1, eval_every=1)
MINI_VAE = TinyVaeSettings(num_images=16, steps=2, batch_size=4, warmup_steps=1)
MINI_UNET = TinyUnetSettings(num_images=16, steps=2, batch_size=4, warmup_steps=1)


def _max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - theirs.detach().float().numpy())))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_toy_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def mini_clip(tokenizer_dir):
    return train_mini_clip(tokenizer_dir, MINI_CLIP, QUIET)


@pytest.fixture(scope="module")
def mini_vae():
    return train_tiny_vae(MINI_VAE, QUIET)


def test_mini_clip_training_is_deterministic(tokenizer_dir, mini_clip):
    again = train_mini_clip(tokenizer_dir, MINI_CLIP, QUIET)
    for a, b in zip(jax.tree.leaves(mini_clip.vision_params), jax.tree.leaves(again.vision_params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(mini_clip.text_params), jax.tree.leaves(again.text_params)):
        np.testing.assert_array_equal(a, b)


def test_mini_clip_folders_load_in_transformers(tmp_path, tokenizer_dir, mini_clip):
    from ipadapter_jax.evaluate.clip_scorer import ClipScorer
    from ipadapter_jax.toy.mini_clip import write_clip_folder
    from ipadapter_jax.weights.load_clip import load_clip_text_encoder, load_clip_vision_encoder
    from ipadapter_jax.weights.pipeline_folder import write_image_encoder_folder
    from ipadapter_jax.weights.transformers_folders import write_transformers_folder

    tokenizer = CaptionTokenizer(tokenizer_dir)
    ids = tokenizer(["a red circle", "a square", ""])
    images = make_examples(3, seed=1).images
    pixels = (images.astype(np.float32) / 255.0 - np.array([0.48145466, 0.4578275, 0.40821073], np.float32)) / \
        np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

    text_dir = write_transformers_folder(tmp_path / "text_encoder", *mini_clip.text_encoder())
    theirs, info = transformers.CLIPTextModel.from_pretrained(text_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    module, params, _ = load_clip_text_encoder(text_dir)
    ours = module.apply({"params": params}, jnp.asarray(ids), output_hidden_states=False)
    with torch.no_grad():
        out = theirs.eval()(torch.from_numpy(ids.astype(np.int64)))
    assert _max_diff(ours.last_hidden_state, out.last_hidden_state) <= TOL
    assert _max_diff(ours.pooler_output, out.pooler_output) <= TOL

    image_dir = write_image_encoder_folder(tmp_path / "image_encoder", *mini_clip.image_encoder())
    theirs, info = transformers.CLIPVisionModelWithProjection.from_pretrained(image_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    module, params, _ = load_clip_vision_encoder(image_dir)
    ours = module.apply({"params": params}, jnp.asarray(pixels), output_hidden_states=False)
    with torch.no_grad():
        out = theirs.eval()(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    assert _max_diff(ours.image_embeds, out.image_embeds) <= TOL
    assert (image_dir / "preprocessor_config.json").is_file()

    clip_dir = write_clip_folder(tmp_path / "clip", tokenizer_dir, mini_clip)
    theirs, info = transformers.CLIPModel.from_pretrained(clip_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert abs(float(theirs.logit_scale.exp()) - MINI_CLIP.logit_scale) < 1e-4
    scorer = ClipScorer(clip_dir)
    with torch.no_grad():
        out = theirs.eval()(input_ids=torch.from_numpy(ids.astype(np.int64)),
                            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    assert _max_diff(scorer.text_embeddings(["a red circle", "a square", ""]), out.text_embeds) <= TOL
    assert _max_diff(scorer.image_embeddings(list(images)), out.image_embeds) <= TOL


def test_tiny_vae_loads_in_diffusers(tmp_path, mini_vae):
    import diffusers

    from ipadapter_jax.models.vae import AutoencoderKL, decode_latents
    from ipadapter_jax.weights.load_vae import save_vae

    save_vae(mini_vae.config, mini_vae.params, tmp_path / "vae")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert theirs.config.scaling_factor == pytest.approx(mini_vae.config.scaling_factor)
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = decode_latents(AutoencoderKL(mini_vae.config), mini_vae.params, jnp.asarray(latents), clip=False)
    with torch.no_grad():
        out = theirs.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2)) / theirs.config.scaling_factor).sample
    assert ours.shape == (2, 32, 32, 3)
    assert _max_diff(ours, out.permute(0, 2, 3, 1)) <= TOL


def test_tiny_unet_loads_in_diffusers(tmp_path, tokenizer_dir, mini_clip, mini_vae):
    import diffusers

    from ipadapter_jax.weights.load_clip import build_clip_text_encoder
    from ipadapter_jax.weights.load_unet import load_unet, save_unet

    text_module, _ = build_clip_text_encoder({**mini_clip.text_config, "architectures": ["CLIPTextModel"]})
    unet = train_tiny_unet(mini_vae, text_module, {"text_model": mini_clip.text_params["text_model"]},
                           CaptionTokenizer(tokenizer_dir), MINI_UNET, QUIET)
    save_unet(unet.params, unet.raw_config, tmp_path / "unet")
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    module, params, config = load_unet(tmp_path / "unet")
    assert len(config.cross_attention_layers()) == 7
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, mini_clip.text_config["hidden_size"])).astype(np.float32)
    ours = module.apply({"params": params}, jnp.asarray(sample), jnp.asarray([10, 900]), jnp.asarray(context))
    with torch.no_grad():
        out = theirs(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.tensor([10, 900]),
                     torch.from_numpy(context)).sample
    assert _max_diff(ours, out.permute(0, 2, 3, 1)) <= TOL


@pytest.mark.slow
def test_miniature_build_end_to_end(tmp_path):
    """The whole build at a few steps, then the folder through diffusers' StableDiffusionPipeline."""
    import diffusers

    from ipadapter_jax.toy.build import BuildSettings, main

    summary = main(["--out", str(tmp_path), "--miniature"])
    base = tmp_path / "base"
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                 "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "image_encoder/model.safetensors",
                 "feature_extractor/preprocessor_config.json"):
        assert (base / name).is_file(), name
    assert (tmp_path / "clip" / "model.safetensors").is_file() and (tmp_path / "example.png").is_file()
    assert json.loads((tmp_path / "build_summary.json").read_text())["text_to_image"]["images"] == 12
    assert summary["settings"] == __import__("dataclasses").asdict(BuildSettings.miniature())
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base)
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
