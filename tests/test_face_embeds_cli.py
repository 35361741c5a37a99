"""``python -m ipadapter_jax.tools.face_embeds``: one-line errors without the [face] extra or the model folder,
and, with a stand-in for insightface's detector (the real one needs the buffalo_l model files, which nothing
here may download), what it writes: the largest face's embedding per image, BGR pixels in, crops out."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.tools import face_embeds

REPO = Path(__file__).resolve().parents[1]


def _image(path, color):
    Image.fromarray(np.full((40, 60, 3), color, np.uint8)).save(path)
    return path


def test_missing_model_folder_is_one_line(tmp_path):
    image = _image(tmp_path / "me.png", (10, 20, 30))
    run = subprocess.run([sys.executable, "-m", "ipadapter_jax.tools.face_embeds", str(image), "--model-dir",
                          str(tmp_path / "absent")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"python -m ipadapter_jax.tools.face_embeds: error: --model-dir {tmp_path / 'absent'}: no such folder "
        "(insightface's buffalo_l models, e.g. ~/.insightface/models/buffalo_l)"]


def test_missing_extra_is_named(tmp_path, monkeypatch):
    image = _image(tmp_path / "me.png", (10, 20, 30))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "w600k_r50.onnx").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "insightface", None)  # import fails, as without the extra
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(ValueError, match=r"needs the \[face\] extra: pip install 'ipadapter-jax\[face\]'"):
        face_embeds.main([str(image), "--model-dir", str(tmp_path / "models")])
    (tmp_path / "models" / "w600k_r50.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.onnx model files"):
        face_embeds.main([str(image), "--model-dir", str(tmp_path / "models")])


class _Face:
    def __init__(self, box, value):
        self.bbox = np.asarray(box, np.float32)
        self.kps = np.zeros((5, 2), np.float32) + value
        self.embedding = np.full(512, value, np.float32)
        self.normed_embedding = self.embedding / np.linalg.norm(self.embedding)


def _fake_insightface(monkeypatch, seen):
    """A detector that reports two faces whose embedding encodes the image's first (B, G, R) pixel."""
    def get(image):
        seen.append(image[0, 0].copy())
        if image[0, 0].sum() == 0:
            return []
        value = float(image[0, 0, 0])  # blue first: insightface works on OpenCV's BGR
        return [_Face([0, 0, 5, 5], -1.0), _Face([0, 0, 20, 30], value)]

    analysis = types.SimpleNamespace(get=get, prepare=lambda ctx_id, det_size: None)
    app = types.ModuleType("insightface.app")
    app.FaceAnalysis = lambda name, providers, allowed_modules: analysis
    align = types.SimpleNamespace(norm_crop=lambda image, landmark, image_size: np.full(
        (image_size, image_size, 3), (int(landmark[0, 0]), 0, 0), np.uint8))
    utils = types.ModuleType("insightface.utils")
    utils.face_align = align
    package = types.ModuleType("insightface")
    package.app, package.utils = app, utils
    for name, module in (("insightface", package), ("insightface.app", app), ("insightface.utils", utils)):
        monkeypatch.setitem(sys.modules, name, module)


def test_largest_face_per_image_and_crops(tmp_path, monkeypatch):
    seen = []
    _fake_insightface(monkeypatch, seen)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "det_10g.onnx").write_bytes(b"")
    images = [_image(tmp_path / "a.png", (10, 20, 30)), _image(tmp_path / "b.png", (1, 2, 7))]
    out = tmp_path / "faces.npy"
    assert face_embeds.main([*map(str, images), "--model-dir", str(tmp_path / "models"), "--out", str(out),
                             "--crops", str(tmp_path / "crops")]) == 0
    embeds = np.load(out)
    assert embeds.shape == (2, 512) and embeds.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, rtol=1e-6)  # normed_embedding
    assert [tuple(p) for p in seen] == [(30, 20, 10), (7, 2, 1)]  # BGR to the detector
    crops = [np.asarray(Image.open(tmp_path / "crops" / f"{n}.png")) for n in ("a", "b")]
    assert [tuple(c[0, 0]) for c in crops] == [(0, 0, 30), (0, 0, 7)]  # the largest face's crop, back to RGB
    face_embeds.main([str(images[1]), "--model-dir", str(tmp_path / "models"), "--out", str(out), "--unnormalized"])
    np.testing.assert_array_equal(np.load(out), np.full((1, 512), 7.0, np.float32))
    blank = _image(tmp_path / "blank.png", (0, 0, 0))
    with pytest.raises(ValueError, match=r"blank\.png: no face found"):
        face_embeds.main([str(blank), "--model-dir", str(tmp_path / "models")])
