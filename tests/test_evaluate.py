"""The evaluation module: CLIP embeddings against transformers' CLIPModel (max abs difference <= 1e-5 on
L2-normalised embeddings, float32), the metric definitions (CLIP-I of an image with itself is 1, CLIPScore is
2.5 * max(cos, 0)), the reference sources (toy, shards, COCO captions file + folder, TFDS import error),
the protocol on stand-in generators with known answers, and the command line end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from ipadapter_jax.evaluate import references as refs
from ipadapter_jax.evaluate.clip_scorer import ClipScorer
from ipadapter_jax.evaluate.protocol import reference_baselines, run_protocol
from ipadapter_jax.weights import transformers_folders as tf
from ipadapter_jax.toy.shapes_dataset import make_examples
from ipadapter_jax.toy.toy_tokenizer import write_toy_tokenizer, vocab_size

TOL = 1e-5


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random transformers CLIPModel (32x32 images) saved with save_pretrained, plus tokenizer and
    image-processor files."""
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = write_toy_tokenizer(folder)
    vocab = json.loads((tokenizer / "vocab.json").read_text())
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size(), hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(tf.clip_image_processor_config(32)))
    return folder


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer(clip_dir)


def test_embeddings_match_transformers(clip_dir, scorer):
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    images = list(make_examples(5, seed=0).images)
    captions = ["a red circle", "a blue square", "", "a zebra on grey", "a green triangle"]
    ours_image = scorer.image_embeddings(images)
    ours_text = scorer.text_embeddings(captions)
    from ipadapter_jax.data.clip_image_processing import clip_preprocess

    pixels = torch.from_numpy(clip_preprocess(images, scorer.processing).transpose(0, 3, 1, 2))
    ids = torch.from_numpy(scorer.tokenizer(captions).astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    assert np.max(np.abs(ours_image - out.image_embeds.numpy())) <= TOL
    assert np.max(np.abs(ours_text - out.text_embeds.numpy())) <= TOL
    assert ours_image.shape == (5, 16) and np.allclose(np.linalg.norm(ours_image, axis=-1), 1.0, atol=1e-6)


def test_clip_i_of_identical_images_is_one(scorer):
    image = make_examples(1, seed=3).images[0]
    assert np.max(np.abs(scorer.clip_i([image, image.astype(np.float32) / 255.0], image) - 1.0)) < 1e-5
    other = make_examples(2, seed=4).images[1]
    assert scorer.clip_i([other], image)[0] < 1.0 - 1e-4


def test_clip_score_is_clipped_scaled_cosine(scorer):
    images = list(make_examples(8, seed=5).images)
    score, cosine = scorer.clip_score(images, "a red circle")
    expected = scorer.image_embeddings(images) @ scorer.text_embeddings(["a red circle"])[0]
    np.testing.assert_allclose(cosine, expected, atol=1e-6)
    np.testing.assert_allclose(score, 2.5 * np.maximum(expected, 0.0), atol=1e-6)


def test_scorer_rejects_a_single_tower_folder(tmp_path):
    from ipadapter_jax.weights.safetensors_io import WeightFileError

    config = tf.vision_config(image_size=32, patch_size=8, hidden_size=32, layers=1, heads=4,
                              intermediate_size=48, projection_dim=16)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightFileError, match="not a CLIPModel folder"):
        ClipScorer(tmp_path)


def test_toy_and_shard_references_agree(tmp_path):
    from ipadapter_jax.toy.shapes_dataset import write_shape_shards, heldout_shard

    write_shape_shards(tmp_path, num_shards=1, samples_per_shard=2, heldout_samples=6)
    toy = refs.toy_references(6)
    shard = refs.shard_references(heldout_shard(tmp_path), 4)
    assert len(shard) == 4
    for a, b in zip(toy, shard):
        np.testing.assert_array_equal(a.image, b.image)
        assert a.caption == b.caption and a.labels["colour"] == b.labels["colour"]
        assert a.labels["shape"] == b.labels["shape"]


def test_coco_captions_and_folder(tmp_path):
    annotations = {"annotations": [
        {"image_id": 139, "id": 30, "caption": " a second caption"},
        {"image_id": 139, "id": 7, "caption": "A person in a kitchen. "},
        {"image_id": 285, "id": 12, "caption": "a big bear"},
        {"image_id": 632, "id": 1, "caption": "an image that is not in the folder"}]}
    captions_json = tmp_path / "captions_val2017.json"
    captions_json.write_text(json.dumps(annotations))
    assert refs.read_coco_captions(captions_json) == {139: "A person in a kitchen.", 285: "a big bear",
                                                      632: "an image that is not in the folder"}
    images = tmp_path / "val2017"
    images.mkdir()
    for image_id, colour in ((139, "red"), (285, "blue")):
        Image.new("RGB", (40, 30), colour).save(images / f"{image_id:012d}.jpg")
    found = refs.coco_folder_references(images, captions_json)
    assert [r.key for r in found] == ["139", "285"] and found[1].caption == "a big bear"
    assert found[0].image.shape == (30, 40, 3) and found[0].labels == {}
    assert len(refs.coco_folder_references(images, captions_json, count=1)) == 1
    with pytest.raises(FileNotFoundError, match="captions_val2017.json"):
        refs.read_coco_captions(tmp_path / "missing.json")


def test_coco_through_tfds_says_what_to_install(tmp_path):
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="tensorflow-datasets"):
            refs.coco_tfds_references(tmp_path / "captions.json", 1)
    else:  # pragma: no cover - an environment that has TFDS gets the missing-captions error instead
        with pytest.raises(FileNotFoundError):
            refs.coco_tfds_references(tmp_path / "captions.json", 1)


class _CopyingPipe:
    """Stands in for IPAdapterPipeline: returns the reference itself (scale 1) or a blank image (scale 0)."""

    def __call__(self, prompts, ip_adapter_image=None, ip_scale=1.0, **kwargs):
        image = np.asarray(ip_adapter_image, np.float32) / 255.0
        if ip_scale == 0:
            image = np.full_like(image, 0.5)
        return np.stack([image] * len(prompts))


def test_protocol_on_known_answers(scorer):
    references = refs.toy_references(5)
    report = run_protocol(_CopyingPipe(), scorer, references, scales=(1.0, 0.0), images_per_reference=2,
                          log=lambda _: None)
    copy, blank = report["results"]
    assert copy["generations"] == 10 and abs(copy["clip_i"] - 1.0) < 1e-5 and copy["clip_i_std"] < 1e-5
    assert copy["colour_match"] == 1.0 and copy["shape_match"] == 1.0 and copy["both_match"] == 1.0
    assert blank["colour_match"] == 0.0 and blank["shape_counts"] == {"None": 10}
    assert blank["clip_i"] < copy["clip_i"]
    baselines = reference_baselines(scorer, references)
    assert abs(copy["clip_t"] - baselines["reference_clip_t"]) < 1e-5
    assert report["chance"] == {"colour_match": 0.25, "shape_match": 1 / 3, "both_match": 0.25 / 3}


def test_protocol_without_labels_has_no_toy_metrics(scorer):
    plain = [refs.Reference(r.key, r.image, r.caption) for r in refs.toy_references(2)]
    report = run_protocol(_CopyingPipe(), scorer, plain, images_per_reference=1, log=lambda _: None)
    assert "colour_match" not in report["results"][0] and "chance" not in report


def test_cli_end_to_end_on_the_toy_base(tmp_path):
    """A random (paper-initialised) adapter for the shipped toy base, two references, two DDIM steps."""
    import jax

    from ipadapter_jax.evaluate.cli import main
    from ipadapter_jax.models.adapter import new_ip_adapter
    from ipadapter_jax.models.image_projection import ProjectionConfig
    from ipadapter_jax.toy_assets import ASSETS
    from ipadapter_jax.weights.ip_adapter_file import save_ip_adapter
    from ipadapter_jax.weights.load_unet import load_unet

    _, unet_params, config = load_unet(ASSETS / "base" / "unet")
    projection = ProjectionConfig("plain", embed_dim=64, cross_attention_dim=config.cross_attention_dim)
    adapter_path = tmp_path / "ip_adapter.safetensors"
    save_ip_adapter(new_ip_adapter(config, unet_params, projection, jax.random.key(0)), adapter_path)
    report = main(["--ip-adapter", str(adapter_path), "--num-references", "2", "--images-per-reference", "2",
                   "--steps", "2", "--guidance", "3", "--scales", "0", "1", "--out", str(tmp_path / "r.json"),
                   "--grid", str(tmp_path / "grid.png")])
    written = json.loads((tmp_path / "r.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["model"].endswith("base") and written["clip"].endswith("clip")
    assert [r["scale"] for r in written["results"]] == [0.0, 1.0]
    for result in written["results"]:
        assert result["generations"] == 4 and -1.0 <= result["clip_i"] <= 1.0 and 0.0 <= result["clip_t"] <= 2.5
        assert 0.0 <= result["colour_match"] <= 1.0 and "images" not in result
    assert written["chance"]["shape_match"] == pytest.approx(1 / 3)
    assert Image.open(tmp_path / "grid.png").size[0] > 0


def test_file_references_read_toy_labels(tmp_path):
    image = make_examples(1, seed=2)
    Image.fromarray(image.images[0]).save(tmp_path / "ref.png")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "blank.png")
    found = refs.file_references([tmp_path / "ref.png", tmp_path / "blank.png"], "a caption")
    assert found[0].labels == {"colour": image.specs[0].colour, "shape": image.specs[0].shape}
    assert found[1].labels == {} and found[1].caption == "a caption"


def test_two_processes_write_the_one_process_report(tmp_path):
    """``evaluate`` under ``jax.distributed`` with two local CPU processes: the references are split over the
    processes, process 0 gathers every score and writes the report, equal to one process's (bar the time)."""
    import os
    import socket
    import subprocess
    import sys

    import jax

    from ipadapter_jax.models.adapter import new_ip_adapter
    from ipadapter_jax.models.image_projection import ProjectionConfig
    from ipadapter_jax.toy_assets import ASSETS
    from ipadapter_jax.weights.ip_adapter_file import save_ip_adapter
    from ipadapter_jax.weights.load_unet import load_unet

    _, unet_params, config = load_unet(ASSETS / "base" / "unet")
    projection = ProjectionConfig("plain", embed_dim=64, cross_attention_dim=config.cross_attention_dim)
    adapter_path = tmp_path / "ip_adapter.safetensors"
    save_ip_adapter(new_ip_adapter(config, unet_params, projection, jax.random.key(1)), adapter_path)
    common = [sys.executable, "-m", "ipadapter_jax.evaluate", "--ip-adapter", str(adapter_path),
              "--num-references", "3", "--images-per-reference", "2", "--steps", "2", "--guidance", "3",
              "--scales", "0", "1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    single = subprocess.run(common + ["--out", str(tmp_path / "one.json")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(common + ["--out", str(tmp_path / f"two_{i}.json"), "--coordinator-address",
                                        f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert not (tmp_path / "two_1.json").exists()  # only process 0 writes
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two_0.json"))
    one.pop("seconds"), two.pop("seconds")
    assert two == one
    assert [r["generations"] for r in two["results"]] == [6, 6]
    # Each process generated for its share (references 0, 2 and 1), not for all three.
    assert "2/2 references" in outputs[0][0] and "1/1 references" in outputs[1][0]
    assert "/3 references" not in outputs[0][0] + outputs[1][0]
