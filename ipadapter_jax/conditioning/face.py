"""Face prompts for the FaceID adapters: face recognition embeddings given as arrays or ``.npy`` files
(``tools/face_embeds`` writes them: insightface ``buffalo_l`` ArcFace, one row per face), checked and turned
into the projection net's input with the negative half classifier-free guidance uses.

The negative is what h94's ``ip_adapter_faceid.py`` projects for it: zero face embeddings (and, for
FaceID-Plus, the CLIP hidden states of an all-zero image, which ``image_prompt.image_prompt_features`` gives).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def load_face_embeds(path: str | os.PathLike, what: str = "face embeddings") -> np.ndarray:
    """The array in a ``.npy`` file: ``FileNotFoundError`` when there is none, a one-line ``ValueError`` when
    numpy cannot read it (``what`` and the path begin each message)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # numpy's errors for bytes that are no .npy array
        raise ValueError(f"{what} {path}: not a .npy array numpy can read ({' '.join(str(exc).split())})") from None


def read_face_embeds(value: Any, embed_dim: int, what: str = "face embeddings") -> np.ndarray:
    """``[n, embed_dim]`` float32 from an array ``[embed_dim]`` / ``[n, embed_dim]`` (``[1, n, embed_dim]`` is
    taken as ``[n, embed_dim]``) or a ``.npy`` path holding one (``load_face_embeds``). Another shape or a
    non-finite value is a one-line ``ValueError`` naming ``what``."""
    if isinstance(value, (str, os.PathLike)):
        value, what = load_face_embeds(value, what), f"{what} {value}"
    try:
        faces = np.asarray(value, np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not an array of numbers ({exc})") from None
    if faces.ndim == 3 and faces.shape[0] == 1:
        faces = faces[0]
    if faces.ndim == 1:
        faces = faces[None]
    if faces.ndim != 2 or faces.shape[-1] != embed_dim or faces.shape[0] < 1:
        raise ValueError(f"{what}: shape {tuple(np.shape(value))}; the adapter takes [{embed_dim}] or "
                         f"[faces, {embed_dim}] (insightface's normed_embedding, one row per face)")
    if not np.isfinite(faces).all():
        raise ValueError(f"{what}: holds non-finite values")
    return faces


def face_prompt_features(faces: np.ndarray, guided: bool) -> np.ndarray:
    """``faces [n, E]`` -> the FaceID projection's input for one prompt, ``[copies, E]`` (one face) or
    ``[copies, n, E]`` (several: Portrait), with ``guided`` the zero-embedding negative first."""
    x = faces[0][None] if faces.shape[0] == 1 else faces[None]
    return np.concatenate([np.zeros_like(x), x]) if guided else x
