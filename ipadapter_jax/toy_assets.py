"""Where the built-in toy world (a tiny base model, image encoder, adapter and example image shipped with
the project) lives, so the CLIs can run with no model arguments."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets" / "toy"


def latest_toy_adapter(workdir: str | Path = "workdir") -> Path | None:
    """The adapter ``python train.py`` (default workdir ``./workdir``) last exported, else the shipped one."""
    trained = Path(workdir) / "ip_adapter.safetensors"
    if trained.is_file() and _trained_on_toy_base(Path(workdir)):
        return trained
    shipped = ASSETS / "ip_adapter.safetensors"
    return shipped if shipped.is_file() else None


def _trained_on_toy_base(workdir: Path) -> bool:
    # The workdir may hold an adapter for another base (e.g. a real SD1.5 run): only take it when the run's
    # saved config names the toy base ("" named a random tiny world that older trainers wrote: another base),
    # or when there is no config to say otherwise.
    from ipadapter_jax.train.checkpoint import saved_config

    config = saved_config(workdir)
    if config is None:
        return True
    model_dir = (config.get("model") or {}).get("model_dir", "")
    return bool(model_dir) and Path(model_dir).resolve() == (ASSETS / "base").resolve()


def default_sampling_paths(workdir: str | Path = "workdir") -> dict:
    model = ASSETS / "base"
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"no --model given and the built-in toy model is not present at {model}; "
                                f"pass --model DIR (a diffusers-format folder)")
    paths: dict = {"model": str(model)}
    adapter = latest_toy_adapter(workdir)
    if adapter is not None:
        paths["ip_adapter"] = [str(adapter)]
        paths["image"] = [str(ASSETS / "example.png")]
    return paths
