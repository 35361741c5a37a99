"""Which image encoder each IP-Adapter gets (``pipeline/image_encoders.py``), on h94/IP-Adapter's layout in
miniature: ``models/image_encoder`` (ViT-H's place, here 16-wide embeds / 32-wide hidden states) and
``sdxl_models/image_encoder`` (bigG's place, 24 / 40) with a ``*_vit-h`` adapter and a bigG adapter beside
the latter. Each adapter must get the encoder whose width fits it, a ViT-H and a bigG adapter must combine
in one pipeline, and what fits nothing is refused in one line."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ipadapter_jax import IPAdapterPipeline, load_ip_adapter
from ipadapter_jax.pipeline.components import load_image_encoder
from ipadapter_jax.pipeline.image_encoders import image_encoder_dirs
from ipadapter_jax.testing.random_weights import (random_faceid_state, random_ip_adapter_state, randomize_,
                                                  torch_attention_shapes, torch_cross_attention_widths,
                                                  write_ip_adapter_state)
from ipadapter_jax.testing.reference_pipelines import IMAGE_ENCODER, build_pipeline_dir, reference_image

BIGG_LIKE = {**IMAGE_ENCODER, "hidden_size": 40, "projection_dim": 24}


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("h94")
    base = build_pipeline_dir("sd", root)
    vit_h, bigg = root / "IP-Adapter" / "models" / "image_encoder", root / "IP-Adapter" / "sdxl_models" / "image_encoder"
    vit_h.parent.mkdir(parents=True)
    shutil.move(base / "image_encoder", vit_h)  # a base folder has none (SD1.5's and SDXL's do not)
    randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**BIGG_LIKE)).eval(), seed=7).save_pretrained(bigg)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    widths, cross = torch_cross_attention_widths(unet), unet.config.cross_attention_dim
    adapters = {}
    for name, variant, embed in (("ip-adapter_sdxl_vit-h", "plain", 16), ("ip-adapter-plus_sdxl_vit-h", "plus", 32),
                                 ("ip-adapter_sdxl", "plain", 24), ("fits_nothing", "plain", 20)):
        adapters[name] = bigg.parent / f"{name}.safetensors"
        write_ip_adapter_state(random_ip_adapter_state(widths, cross, variant, seed=len(adapters), embed_dim=embed,
                                                       std=1.0), adapters[name])
    return {"base": base, "vit_h": vit_h, "bigg": bigg, **adapters}


def _dirs(layout, names, image_encoder=None):
    paths = [layout[n] for n in names]
    return image_encoder_dirs(image_encoder, layout["base"], paths, paths, [load_ip_adapter(p) for p in paths])


def test_each_adapter_finds_the_encoder_that_fits(layout):
    # The *_vit-h adapters sit beside the bigG encoder; they get h94's models/image_encoder one folder up.
    assert _dirs(layout, ["ip-adapter_sdxl_vit-h", "ip-adapter-plus_sdxl_vit-h", "ip-adapter_sdxl"]) == [
        layout["vit_h"], layout["vit_h"], layout["bigg"]]
    # An encoder in the base folder comes first when it fits, and is passed over when it does not.
    shutil.copytree(layout["bigg"], layout["base"] / "image_encoder")
    try:
        assert _dirs(layout, ["ip-adapter_sdxl", "ip-adapter_sdxl_vit-h"]) == [
            layout["base"] / "image_encoder", layout["vit_h"]]
    finally:
        shutil.rmtree(layout["base"] / "image_encoder")


def test_what_fits_nothing_is_refused_in_one_line(layout):
    with pytest.raises(ValueError, match=r"takes 20-wide image features and no image encoder found fits: "
                                         r".*projection_dim 24.*projection_dim 16") as err:
        _dirs(layout, ["fits_nothing"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"takes 16-wide image features but its image encoder gives 24 "
                                         r"\(projection_dim\)"):
        _dirs(layout, ["ip-adapter_sdxl_vit-h"], image_encoder=layout["bigg"])
    with pytest.raises(ValueError, match="3 folders for 2 IP-Adapters"):
        _dirs(layout, ["ip-adapter_sdxl_vit-h", "ip-adapter_sdxl"], image_encoder=[layout["vit_h"]] * 3)
    # The pipeline's constructor checks loaded encoders the same way.
    pipe = IPAdapterPipeline.from_pretrained(layout["base"])
    with pytest.raises(ValueError, match="IP-Adapter 0: .* takes 16-wide"):
        IPAdapterPipeline(pipe.base, [load_ip_adapter(layout["ip-adapter_sdxl_vit-h"])],
                          load_image_encoder(layout["bigg"]))


def test_vit_h_and_bigg_adapters_combine(layout):
    """Two adapters, each with its own encoder (found, or given as a list); the bigG adapter at scale 0 leaves
    exactly the ViT-H adapter's images, so the ViT-H adapter got ViT-H features."""
    names = ["ip-adapter_sdxl_vit-h", "ip-adapter_sdxl"]
    both = IPAdapterPipeline.from_pretrained(layout["base"], ip_adapter=[layout[n] for n in names])
    assert [e.encoder.config.projection_dim for e in both.image_encoders] == [16, 24]
    given = IPAdapterPipeline.from_pretrained(layout["base"], ip_adapter=[layout[n] for n in names],
                                              image_encoder=[layout["vit_h"], layout["bigg"]])
    assert [e.encoder.config.projection_dim for e in given.image_encoders] == [16, 24]
    one = IPAdapterPipeline.from_pretrained(layout["base"], ip_adapter=layout[names[0]])
    images = [reference_image(seed=1), reference_image(seed=2)]
    run = lambda pipe, image, scale: pipe("a red circle", ip_adapter_image=image, ip_scale=scale,  # noqa: E731
                                          num_inference_steps=2, height=32, width=32, scheduler="ddim")
    together = run(both, images, [0.7, 0.0])
    alone = run(one, images[0], 0.7)
    assert np.abs(together - alone).max() <= 1e-5
    assert np.abs(run(both, images, [0.7, 1.0]) - together).max() > 1e-3  # the bigG adapter does act


def test_faceid_adapters_get_an_encoder_for_the_face_crop_only(layout):
    """Plain FaceID reads no image (no encoder, None); FaceID-Plus gets the encoder whose hidden states are as
    wide as its perceiver reads (``clip_dim``), found or given, not one as wide as its face embeddings."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(layout["base"] / "unet")
    shapes, cross = torch_attention_shapes(unet), unet.config.cross_attention_dim
    files = {}
    for name, variant, clip_dim in (("ip-adapter-faceid_sd15", "faceid", 32), ("faceid-plusv2_bigg", "faceid_plus", 40),
                                    ("faceid-plusv2_vit-h", "faceid_plus", 32)):
        files[name] = layout["bigg"].parent / f"{name}.safetensors"
        write_ip_adapter_state(random_faceid_state(shapes, cross, variant, seed=1, clip_dim=clip_dim), files[name])
    faceid = {**layout, **files}
    assert _dirs(faceid, list(files)) == [None, layout["bigg"], layout["vit_h"]]
    assert _dirs(faceid, ["ip-adapter-faceid_sd15"], image_encoder=layout["bigg"]) == [None]
    with pytest.raises(ValueError, match=r"takes 40-wide image features but its image encoder gives 32 "
                                         r"\(hidden_size\)"):
        _dirs(faceid, ["faceid-plusv2_bigg"], image_encoder=layout["vit_h"])
