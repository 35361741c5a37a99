"""Where the built-in toy world (a tiny base model, image encoder, adapter and example image shipped with
the project) lives, so the CLIs can run with no model arguments."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets" / "toy"


def default_sampling_paths() -> dict:
    model = ASSETS / "base"
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"no --model given and the built-in toy model is not present at {model}; "
                                f"pass --model DIR (a diffusers-format folder)")
    paths: dict = {"model": str(model)}
    adapter = ASSETS / "ip_adapter.safetensors"
    if adapter.is_file():
        paths["ip_adapter"] = [str(adapter)]
        paths["image"] = [str(ASSETS / "example.png")]
    return paths
