"""FaceID adapters through ``IPAdapterPipeline`` and ``sample.py``, end to end against diffusers'
StableDiffusionPipeline.

The tiny random SD pipeline of ``tests/test_pipeline_parity.py`` (saved by diffusers, both sides loading from
disk, the same starting latents, fp32, DDIM, guidance 7.5) with random FaceID files in h94's layout (LoRA
rank 4 on every attention, 512-d face embeddings). diffusers takes the face as ``ip_adapter_image_embeds =
[cat(zero face, face)]`` and, for FaceID-PlusV2, the face crop's CLIP hidden states (its pipeline's own
``prepare_ip_adapter_image_embeds``: the crop, then a zero image for the negative) and ``shortcut`` /
``shortcut_scale`` set on its projection layer, as its FaceID docs do; its LoRA runs through PEFT at the
``set_adapters`` weight. Metric: max |our pixels - diffusers' pixels| <= 2e-3 (pixels in [0, 1]).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft  # noqa: F401  (the test extra's; without it diffusers drops a FaceID file's LoRA with a warning)
import pytest
import torch
from PIL import Image

from ipadapter_jax import IPAdapterPipeline
from ipadapter_jax.pipeline.denoise import generate
from ipadapter_jax.testing.random_weights import random_faceid_state, torch_attention_shapes, write_ip_adapter_state
from ipadapter_jax.testing.reference_pipelines import build_pipeline_dir, reference_image, write_adapter

REPO = Path(__file__).resolve().parents[1]
TOL = 2e-3
STEPS = 4
SIZE = 32
BATCH = 2
PROMPT = "a red circle"
FACE_DIM = 512
# (file name, variant): the file name says PlusV2 (its shortcut), as h94 names them.
FILES = {"faceid": "ip-adapter-faceid_sd15.safetensors", "faceid_plus": "ip-adapter-faceid-plusv2_sd15.safetensors"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The parity pipeline with a VAE whose pixels follow the latents closely (the sensitive pair's), and the
    two FaceID files beside it."""
    from diffusers import UNet2DConditionModel

    folder = build_pipeline_dir("sd", tmp_path_factory.mktemp("faceid_pipe"), vae_std=0.3)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    clip_dim = json.loads((folder / "image_encoder" / "config.json").read_text())["hidden_size"]
    for seed, (variant, name) in enumerate(FILES.items()):
        state = random_faceid_state(torch_attention_shapes(unet), unet.config.cross_attention_dim, variant,
                                    seed=10 + seed, lora_rank=4, id_dim=FACE_DIM, clip_dim=clip_dim, std=0.3)
        write_ip_adapter_state(state, folder / name)
    return folder


def face_embedding(seed: int = 0) -> np.ndarray:
    """A unit-norm 512-d vector, like insightface's ``normed_embedding``."""
    face = np.random.default_rng(seed).standard_normal(FACE_DIM).astype(np.float32)
    return face / np.linalg.norm(face)


class FacePair:
    def __init__(self, folder: Path, variant: str):
        from diffusers import DiffusionPipeline

        self.variant, self.path = variant, folder / FILES[variant]
        self.ours = IPAdapterPipeline.from_pretrained(folder, ip_adapter=self.path)
        self.theirs = DiffusionPipeline.from_pretrained(folder)
        self.theirs.load_ip_adapter(str(folder), subfolder="", weight_name=self.path.name, image_encoder_folder=None)
        self.theirs.set_progress_bar_config(disable=True)
        self.face = face_embedding()
        self.crop = reference_image(seed=3) if variant == "faceid_plus" else None
        self.latents = torch.randn(BATCH, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))

    def run_theirs(self, scale, lora_scale=1.0, s_scale=1.0, face=None):
        pipe = self.theirs
        pipe.set_ip_adapter_scale(scale)
        pipe.set_adapters(["faceid_0"], adapter_weights=[lora_scale])
        face = torch.from_numpy(self.face if face is None else face).reshape(1, -1, FACE_DIM)
        embeds = torch.cat([torch.zeros_like(face), face])  # [negative; positive], [2, faces, 512]
        if self.crop is not None:
            layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
            layer.clip_embeds = pipe.prepare_ip_adapter_image_embeds([self.crop], None, "cpu", BATCH, True)[0]
            layer.shortcut, layer.shortcut_scale = True, s_scale
        return pipe(PROMPT, ip_adapter_image_embeds=[embeds], num_inference_steps=STEPS, guidance_scale=7.5,
                    height=SIZE, width=SIZE, latents=self.latents.clone(), num_images_per_prompt=BATCH,
                    output_type="np").images

    def run_ours(self, scale, lora_scale=1.0, s_scale=None, face=None):
        return self.ours([PROMPT] * BATCH, ip_adapter_face_embeds=self.face if face is None else face,
                         ip_adapter_image=self.crop, ip_scale=scale, lora_scale=lora_scale, s_scale=s_scale,
                         num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                         latents=self.latents.numpy(), scheduler="ddim")


@pytest.fixture(scope="module", params=sorted(FILES))
def pair(request, folder):
    return FacePair(folder, request.param)


def test_pixels_match_diffusers(pair):
    """Face scale 0 and 1 (the LoRA runs at both), PlusV2's shortcut at s_scale 1 (the default), and plain
    FaceID given two faces."""
    images = {}
    for scale in (0.0, 1.0):
        ours, ref = pair.run_ours(scale), pair.run_theirs(scale)
        assert ours.shape == ref.shape == (BATCH, SIZE, SIZE, 3)
        err = np.abs(ours - ref).max()
        assert err <= TOL, f"{pair.variant} ip_scale={scale}: max abs diff {err:.2e}"
        images[scale] = ours
    moved = np.abs(images[1.0] - images[0.0]).max()
    assert moved > 0.05, f"the face prompt moved pixels by only {moved:.3f}"
    if pair.variant == "faceid":  # several faces of one person, as Portrait takes them: [n, 512]
        faces = np.stack([pair.face, face_embedding(seed=1)])
        ours, ref = pair.run_ours(1.0, face=faces), pair.run_theirs(1.0, face=faces)
        err = np.abs(ours - ref).max()
        assert err <= TOL, f"two faces: max abs diff {err:.2e}"
        assert np.abs(ours - images[1.0]).max() > 10 * TOL


def test_lora_and_shortcut_scales_are_data(pair):
    """A new LoRA weight (and PlusV2 shortcut weight) matches diffusers at the same weights, moves the pixels,
    and runs the program already compiled."""
    first = pair.run_ours(1.0)
    compiled = generate._cache_size()
    s_scale = 0.5 if pair.variant == "faceid_plus" else None
    ours = pair.run_ours(1.0, lora_scale=0.5, s_scale=s_scale)
    assert generate._cache_size() == compiled, "a new lora_scale / s_scale compiled a new program"
    ref = pair.run_theirs(1.0, lora_scale=0.5, s_scale=1.0 if s_scale is None else s_scale)
    err = np.abs(ours - ref).max()
    assert err <= TOL, f"{pair.variant} lora_scale=0.5 s_scale={s_scale}: max abs diff {err:.2e}"
    assert np.abs(ours - first).max() > 10 * TOL
    if s_scale is not None:  # the shortcut weight alone moves the pixels too
        assert np.abs(pair.run_ours(1.0, s_scale=s_scale) - first).max() > 10 * TOL
    assert generate._cache_size() == compiled


def test_face_inputs_are_checked(pair, tmp_path):
    """Face embeddings from a .npy file are the array's; no embeddings, a garbled file or another width are
    one-line errors before anything runs."""
    np.save(tmp_path / "face.npy", pair.face[None])
    np.testing.assert_array_equal(pair.run_ours(1.0, face=str(tmp_path / "face.npy")), pair.run_ours(1.0))
    (tmp_path / "garbled.npy").write_bytes(b"not a numpy file")
    cases = [(None, "takes face embeddings: pass ip_adapter_face_embeds="),
             (str(tmp_path / "garbled.npy"), "garbled.npy: not a .npy array numpy can read"),
             (str(tmp_path / "missing.npy"), "missing.npy: no such file"),
             (np.zeros(128, np.float32), r"shape \(128,\); the adapter takes \[512\]")]
    cases.append(([pair.face, pair.face], "2 face embeddings for 1 FaceID IP-Adapters"))
    for face, message in cases:
        # An image with no face embeddings: not text-only, so the missing face is the error.
        image = reference_image() if face is None and pair.crop is None else pair.crop
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            pair.ours([PROMPT], ip_adapter_face_embeds=face, ip_adapter_image=image, num_inference_steps=1)
    if pair.variant == "faceid":
        with pytest.raises(ValueError, match="s_scale is FaceID-PlusV2's shortcut weight, and no PlusV2"):
            pair.ours([PROMPT], ip_adapter_face_embeds=pair.face, s_scale=0.5, num_inference_steps=1)
    else:
        with pytest.raises(ValueError, match="FaceID-Plus IP-Adapter takes one face embedding with its face crop"):
            pair.ours([PROMPT], ip_adapter_face_embeds=np.stack([pair.face] * 2), ip_adapter_image=pair.crop,
                      num_inference_steps=1)


def test_sample_cli_face_embeds_end_to_end(folder, tmp_path):
    """``sample.py --face-embeds F.npy`` writes the pipeline's images for that face (seed-drawn noise)."""
    np.save(tmp_path / "face.npy", face_embedding())
    command = [sys.executable, str(REPO / "sample.py"), "--model", str(folder), "--ip-adapter",
               str(folder / FILES["faceid"]), "--face-embeds", str(tmp_path / "face.npy"), "--prompt", PROMPT,
               "--scale", "1.0", "--steps", str(STEPS), "--guidance", "7.5", "--seed", "0", "--num-images",
               str(BATCH), "--height", str(SIZE), "--width", str(SIZE), "--scheduler", "ddim",
               "--out", str(tmp_path / "out")]
    proc = subprocess.run(command, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = IPAdapterPipeline.from_pretrained(folder, ip_adapter=folder / FILES["faceid"])
    expected = pipe(PROMPT, num_images_per_prompt=BATCH, ip_adapter_face_embeds=face_embedding(), ip_scale=1.0,
                    num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, seed=0,
                    scheduler="ddim")
    for i in range(BATCH):
        written = np.asarray(Image.open(tmp_path / "out" / f"{i:03d}.png"), np.float32) / 255
        assert np.abs(written - expected[i]).max() <= 1 / 255 + 1e-6, i
        settings = json.loads(Image.open(tmp_path / "out" / f"{i:03d}.png").text["ipadapter_jax"])
        assert settings["face_embeds"] == [str(tmp_path / "face.npy")]


@pytest.mark.parametrize("pair", ["faceid_plus"], indirect=True)
def test_faceid_beside_a_plain_adapter(pair, folder):
    """A plain adapter then FaceID-PlusV2 in one pipeline: the image list holds one image per adapter that
    reads one (the plain reference, then the face crop), the face embeddings go to the FaceID adapter, its LoRA
    and s_scale by adapter index (the plain adapter's entries unused). With the plain adapter at scale 0 the
    images are the PlusV2-only pipeline's."""
    both = IPAdapterPipeline.from_pretrained(folder, ip_adapter=[write_adapter(folder, "plain", seed=1), pair.path])
    expected = pair.run_ours(1.0, lora_scale=0.5, s_scale=0.5)

    def run(scales, images):
        return both([PROMPT] * BATCH, ip_adapter_face_embeds=pair.face, ip_adapter_image=images, ip_scale=scales,
                    lora_scale=[0.9, 0.5], s_scale=[0.9, 0.5], num_inference_steps=STEPS, guidance_scale=7.5,
                    height=SIZE, width=SIZE, latents=pair.latents.numpy(), scheduler="ddim")

    np.testing.assert_allclose(run([0.0, 1.0], [reference_image(), pair.crop]), expected, rtol=0, atol=1e-5)
    assert np.abs(run([1.0, 1.0], [reference_image(), pair.crop]) - expected).max() > 10 * TOL
    with pytest.raises(ValueError, match="1 reference images for 2 IP-Adapters"):
        run(1.0, pair.crop)
