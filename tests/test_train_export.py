"""The adapter a training run exports (``WORKDIR/ip_adapter.safetensors``) loads in diffusers and behaves the
same there as in ipadapter_jax: the same noise prediction through ``UNet2DConditionModel._load_ip_adapter_weights``
and the same images through ``StableDiffusionPipeline.load_ip_adapter`` (the IPAdapterMixin) as through our
``IPAdapterPipeline``. The run exports in the dtype the shipped SD1.5 config sets (``checkpoint.export_dtype``,
float16 as published); both sides read that file, so both use the same rounded weights.

Metrics (fp32 compute, CPU): noise prediction max |ours - diffusers| <= 1e-4; images in [0, 1] max abs <= 2e-3.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from train_support import tiny_config, world  # noqa: F401
from ipadapter_jax import IPAdapterPipeline, load_ip_adapter
from ipadapter_jax.models.adapter import adapter_variables
from ipadapter_jax.train import main
from ipadapter_jax.train.tiny_world import shape_samples
from ipadapter_jax.weights.load_unet import load_unet
from ipadapter_jax.weights.torch_layout import flax_path_of

NOISE_TOL = 1e-4
IMAGE_TOL = 2e-3


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory) -> Path:
    from configs import sd15

    workdir = tmp_path_factory.mktemp("export")
    export_dtype = sd15.get_config().checkpoint.export_dtype
    main(tiny_config(world, num_steps=20, checkpoint__every_steps=20, log__every_steps=20,
                     checkpoint__export_dtype=export_dtype), workdir)
    path = workdir / "ip_adapter.safetensors"
    from safetensors.numpy import load_file

    assert {str(v.dtype) for v in load_file(str(path)).values()} == {export_dtype}
    return path


def _torch_state(path):
    from safetensors.torch import load_file

    flat = load_file(str(path))
    return {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
            for part in ("image_proj", "ip_adapter")}


def test_exported_adapter_is_trained_and_gives_diffusers_noise_prediction(world, exported):
    from diffusers import UNet2DConditionModel

    # Training moved the weights away from the paper initialisation (to_k_ip == to_k): we test a trained file.
    module, params, config = load_unet(Path(world["model"]) / "unet")
    adapter = load_ip_adapter(exported)
    node = params
    for part in flax_path_of(config.cross_attention_layers()[0][0] + ".x")[:-1]:
        node = node[part]
    assert np.abs(np.asarray(adapter.params["layers"][0]["to_k_ip"]) - np.asarray(node["to_k"]["kernel"])).max() > 1e-4

    torch_unet = UNet2DConditionModel.from_pretrained(Path(world["model"]) / "unet").eval()
    torch_unet._load_ip_adapter_weights([_torch_state(exported)])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([5, 400, 950])
    text = torch.randn(3, 77, config.cross_attention_dim, generator=gen)
    embeds = torch.randn(3, adapter.projection.embed_dim, generator=gen)
    embeds[2] = 0  # a dropped image, as in training
    with torch.no_grad():
        ref = torch_unet(x, t, text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample.numpy()

    tokens = adapter.project(jnp.asarray(embeds.numpy()))
    variables = {"params": params, **adapter_variables(config, [adapter.params["layers"]])}
    ours = module.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
                        jnp.asarray(text.numpy()), image_tokens=[tokens])
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    err = np.abs(ours - ref).max()
    print(f"noise prediction: max abs diff {err:.2e}")
    assert err <= NOISE_TOL
    without = np.asarray(module.apply({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                                      jnp.asarray(t.numpy()), jnp.asarray(text.numpy()))).transpose(0, 3, 1, 2)
    assert np.abs(ours - without).max() > 1e-2  # the image prompt matters, so the comparison above does too


def _diffusers_pipeline(model: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(model / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(model / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(model / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(model / "unet"),
        scheduler=DDIMScheduler.from_pretrained(model / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(model / "image_encoder"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_exported_adapter_gives_the_same_images_in_diffusers_and_our_pipeline(world, exported):
    import io

    from PIL import Image

    model = Path(world["model"])
    theirs = _diffusers_pipeline(model)
    theirs.load_ip_adapter(str(exported.parent), subfolder="", weight_name=exported.name, image_encoder_folder=None)
    theirs.set_ip_adapter_scale(1.0)
    ours = IPAdapterPipeline.from_pretrained(model, ip_adapter=exported, image_encoder=model / "image_encoder")
    image = Image.open(io.BytesIO(shape_samples(1, seed=12345, prefix="ref")[0][1])).convert("RGB")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = theirs(["a red circle"] * 2, ip_adapter_image=image, num_inference_steps=5, guidance_scale=3.0,
                 height=64, width=64, latents=latents.clone(), output_type="np").images
    got = ours(["a red circle"] * 2, ip_adapter_image=image, ip_scale=1.0, num_inference_steps=5,
               guidance_scale=3.0, height=64, width=64, latents=latents.numpy(), scheduler="ddim")
    err = np.abs(got - ref).max()
    print(f"images: max abs diff {err:.2e}")
    assert got.shape == ref.shape == (2, 64, 64, 3)
    assert err <= IMAGE_TOL
