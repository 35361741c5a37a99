"""CLIP preprocessing vs transformers' slow (PIL) CLIPImageProcessor.

Metric: max abs difference of the normalised float32 pixels (ours NHWC, transformers NCHW
transposed). Both resize with the same PIL call on the same uint8 data, so we expect 0 and assert
<= 1e-6. (transformers 5 picks a torchvision "fast" processor when torchvision is installed; it
resamples differently, so we compare with the PIL one, ``CLIPImageProcessorPil``.)
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.data.clip_image_processing import ClipImageProcessingConfig, clip_preprocess, clip_preprocess_one
from ipadapter_jax.data.synthetic import random_image

REFERENCE_CONFIG = Path("/work/shared/reference/configs/clip_image_processor.json")
TOLERANCE = 1e-6

_FALLBACK_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}


@pytest.fixture(scope="module")
def config_dict():
    # The shared reference config when present (it is the one the brief names); the same values
    # inline otherwise, so the test also runs from a plain checkout.
    if REFERENCE_CONFIG.is_file():
        return json.loads(REFERENCE_CONFIG.read_text())
    return dict(_FALLBACK_CONFIG)


def _reference_processor(config):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**config)


def _reference(processor, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = processor(images=images, return_tensors="np")["pixel_values"]
    return np.asarray(out).transpose(0, 2, 3, 1)


def _smooth_image(height, width, seed, mode="RGB"):
    # Smooth gradients + noise: bicubic overshoot and rounding both get exercised.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB").convert(mode)


@pytest.mark.parametrize(
    "height,width",
    [(300, 400), (400, 301), (224, 224), (100, 150), (224, 500), (911, 227)],
)
def test_matches_transformers_clip_image_processor(config_dict, height, width):
    config = ClipImageProcessingConfig.from_dict(config_dict)
    image = _smooth_image(height, width, seed=height * 7 + width)
    ours = clip_preprocess([image], config)
    theirs = _reference(_reference_processor(config_dict), [image])
    assert ours.shape == theirs.shape == (1, 224, 224, 3) and ours.dtype == np.float32
    max_abs = float(np.abs(ours - theirs).max())
    assert max_abs <= TOLERANCE, max_abs


def test_batch_and_numpy_input_and_alpha(config_dict):
    config = ClipImageProcessingConfig.from_dict(config_dict)
    rgba = random_image(250, 260, 1, mode="RGBA")
    grey = random_image(230, 240, 2, mode="L")
    rgb = _smooth_image(240, 320, 3)
    ours = clip_preprocess([rgba, grey, np.asarray(rgb)], config)
    theirs = _reference(_reference_processor(config_dict), [rgba, grey, rgb])
    assert ours.shape == (3, 224, 224, 3)
    assert float(np.abs(ours - theirs).max()) <= TOLERANCE


def test_smaller_than_crop_without_resize_is_zero_padded_like_transformers(config_dict):
    config_dict = dict(config_dict, do_resize=False)
    config = ClipImageProcessingConfig.from_dict(config_dict)
    image = _smooth_image(150, 301, 4)
    ours = clip_preprocess_one(image, config)
    theirs = _reference(_reference_processor(config_dict), [image])[0]
    assert ours.shape == (224, 224, 3)
    assert float(np.abs(ours - theirs).max()) <= TOLERANCE


def test_old_style_int_config_and_defaults():
    old = ClipImageProcessingConfig.from_dict({"size": 224, "crop_size": 224, "resample": 3})
    assert old == ClipImageProcessingConfig()
    assert ClipImageProcessingConfig.from_dict({"size": {"height": 256, "width": 256}}).resize_height == 256
    with pytest.raises(ValueError):
        ClipImageProcessingConfig.from_dict({"size": {"longest_edge": 3}})
