"""Face embeddings for FaceID adapters, computed the way h94's FaceID scripts compute them.

insightface's ``buffalo_l`` models (RetinaFace detection, ArcFace recognition) find the face in each image;
its ``normed_embedding`` (512-d, L2-normalised) is what FaceID, FaceID-Plus/PlusV2, SDXL and Portrait take,
and ``--crops`` also writes the aligned 224x224 face crop (``face_align.norm_crop``) that FaceID-Plus encodes
with CLIP. Needs the ``[face]`` extra (insightface, onnxruntime) and the ``buffalo_l`` model folder (the
``*.onnx`` files) on disk: nothing is downloaded.

    python -m ipadapter_jax.tools.face_embeds me.jpg me2.jpg --model-dir ~/.insightface/models/buffalo_l --out faces.npy

writes ``faces.npy``: ``[num_images, 512]`` float32, one row per image (the largest face in it). For Portrait
(several faces of one person) load it as ``[1, n, 512]``: ``np.load("faces.npy")[None]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

EXTRA_HINT = "pip install 'ipadapter-jax[face]' (insightface, onnxruntime)"


def _face_analysis(model_dir: Path, det_size: int):
    model_dir = model_dir.expanduser()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model-dir {model_dir}: no such folder (insightface's buffalo_l models, e.g. "
                                "~/.insightface/models/buffalo_l)")
    if not any(model_dir.glob("*.onnx")):
        raise FileNotFoundError(f"--model-dir {model_dir}: no *.onnx model files in it (insightface's buffalo_l)")
    try:
        from insightface.app import FaceAnalysis
    except ImportError as e:
        raise ValueError(f"computing face embeddings needs the [face] extra: {EXTRA_HINT} ({e})") from None
    # An existing folder as the name: insightface uses it as it is (and never downloads).
    app = FaceAnalysis(name=str(model_dir.resolve()), providers=["CPUExecutionProvider"],
                       allowed_modules=["detection", "recognition"])
    app.prepare(ctx_id=0, det_size=(det_size, det_size))
    return app


def _bgr(path: Path) -> np.ndarray:
    from ipadapter_jax.data.image_ops import ImageDecodeError, decode_image

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image")
    try:
        rgb = np.asarray(decode_image(path.read_bytes()).image)
    except ImageDecodeError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    return np.ascontiguousarray(rgb[..., ::-1])  # insightface takes OpenCV's BGR


def largest_face(faces):
    """The face with the largest box (h94's scripts take ``faces[0]``; the largest is the same on a portrait
    and well defined when there are several)."""
    return max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))


def face_embeddings(images, app, normalized: bool = True, crops_dir: Path | None = None) -> np.ndarray:
    """``[len(images), 512]`` float32: each image's largest face's ArcFace embedding (``normed_embedding``, or
    the raw ``embedding`` when not ``normalized``, as the ``*_unnorm`` Portrait file wants)."""
    rows = []
    for path in map(Path, images):
        image = _bgr(path)
        faces = app.get(image)
        if not faces:
            raise ValueError(f"{path}: no face found")
        face = largest_face(faces)
        rows.append(np.asarray(face.normed_embedding if normalized else face.embedding, np.float32))
        if crops_dir is not None:
            from insightface.utils import face_align
            from PIL import Image

            crop = face_align.norm_crop(image, landmark=face.kps, image_size=224)
            crops_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(crop[..., ::-1])).save(crops_dir / f"{path.stem}.png")
    return np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipadapter_jax.tools.face_embeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, help="one image per face (the largest face is used)")
    parser.add_argument("--model-dir", type=Path, required=True, help="insightface's buffalo_l folder (*.onnx)")
    parser.add_argument("--out", type=Path, default=Path("face_embeds.npy"), help="the [n, 512] .npy to write")
    parser.add_argument("--crops", type=Path, default=None,
                        help="also write each aligned 224x224 face crop here (FaceID-Plus's CLIP input)")
    parser.add_argument("--unnormalized", action="store_true",
                        help="the raw ArcFace embedding instead of the L2-normalised one (Portrait *_unnorm)")
    parser.add_argument("--det-size", type=int, default=640, help="detector input size (h94 uses 640)")
    args = parser.parse_args(argv)
    for path in args.images:  # every path checked before the models load
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image")
    app = _face_analysis(args.model_dir, args.det_size)
    embeds = face_embeddings(args.images, app, normalized=not args.unnormalized, crops_dir=args.crops)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, embeds)
    print(f"wrote {args.out}: {embeds.shape[0]} face embeddings of {embeds.shape[1]}")
    return 0


if __name__ == "__main__":
    from ipadapter_jax.cli_errors import run_cli

    run_cli("python -m ipadapter_jax.tools.face_embeds", main)
