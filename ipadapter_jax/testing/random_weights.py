"""Random reference weights for parity tests and benchmarks: torch modules filled with random values, and
IP-Adapter state dicts in the published layout built from a torch UNet's own processor names (independent
of our writer). Needs torch; never imported by the library itself."""

from __future__ import annotations

import numpy as np


def randomize_(module, std: float = 0.1, seed: int = 0):
    """diffusers zero-initialises some layers (conv_out, proj_out); random weights exercise every path."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def torch_cross_attention_widths(unet) -> list[int]:
    """Inner widths of the torch UNet's cross-attentions, in ``attn_processors`` order."""
    modules = dict(unet.named_modules())
    return [modules[name[: -len(".processor")]].to_k.weight.shape[0]
            for name in unet.attn_processors if name.endswith("attn2.processor")]


def torch_attention_shapes(unet) -> list[tuple[int, int, int]]:
    """``(query_dim, context_dim, inner)`` of every attention of the torch UNet, in ``attn_processors`` order
    (the numbering of a FaceID file's LoRA keys)."""
    modules = dict(unet.named_modules())
    shapes = []
    for name in unet.attn_processors:
        attn = modules[name[: -len(".processor")]]
        shapes.append((attn.to_q.weight.shape[1], attn.to_k.weight.shape[1], attn.to_q.weight.shape[0]))
    return shapes


def random_faceid_state(attentions: list[tuple[int, int, int]], cross_dim: int, variant: str, seed: int,
                        lora_rank: int | None = 4, id_dim: int = 16, clip_dim: int = 16, num_tokens: int = 4,
                        perceiver_inner: int = 128, std: float = 0.2) -> dict[str, dict[str, np.ndarray]]:
    """A FaceID state dict in h94's published layout (``ip_adapter_faceid.py``) of random float32 arrays.

    attentions: ``torch_attention_shapes(unet)``; the cross-attentions are the odd entries.
    variant: "faceid" (``MLPProjModel``; Portrait with ``num_tokens=16, lora_rank=None``) or "faceid_plus"
      (``ProjPlusModel``: the same MLP at the perceiver's width, here ``cross_dim``, and its
      ``perceiver_resampler``: depth 4, 64-wide heads, ``perceiver_inner`` wide, feed-forward x4, as
      diffusers' loader builds it whatever the file holds).
    lora_rank: the LoRA on every attention (``{k}.to_{q,k,v,out}_lora.{down,up}.weight``), None for none.
    """
    rng = np.random.default_rng(seed)
    r = lambda *shape: (rng.standard_normal(shape) * std).astype(np.float32)  # noqa: E731
    proj = {"proj.0.weight": r(2 * id_dim, id_dim), "proj.0.bias": r(2 * id_dim),
            "proj.2.weight": r(num_tokens * cross_dim, 2 * id_dim), "proj.2.bias": r(num_tokens * cross_dim),
            "norm.weight": 1 + r(cross_dim), "norm.bias": r(cross_dim)}
    if variant == "faceid_plus":
        d, p = cross_dim, "perceiver_resampler"
        proj.update({f"{p}.proj_in.weight": r(d, clip_dim), f"{p}.proj_in.bias": r(d),
                     f"{p}.proj_out.weight": r(cross_dim, d), f"{p}.proj_out.bias": r(cross_dim),
                     f"{p}.norm_out.weight": 1 + r(cross_dim), f"{p}.norm_out.bias": r(cross_dim)})
        proj.update(_perceiver_layers(r, f"{p}.layers", d, perceiver_inner, 4))
    elif variant != "faceid":
        raise ValueError(variant)
    layers = {}
    for k, (query_dim, context_dim, inner) in enumerate(attentions):
        if k % 2:
            layers[f"{k}.to_k_ip.weight"] = r(inner, cross_dim)
            layers[f"{k}.to_v_ip.weight"] = r(inner, cross_dim)
        if lora_rank:
            for name, n_in, n_out in (("to_q", query_dim, inner), ("to_k", context_dim, inner),
                                      ("to_v", context_dim, inner), ("to_out", inner, query_dim)):
                layers[f"{k}.{name}_lora.down.weight"] = r(lora_rank, n_in)
                layers[f"{k}.{name}_lora.up.weight"] = r(n_out, lora_rank)
    return {"image_proj": proj, "ip_adapter": layers}


def _perceiver_layers(r, prefix: str, width: int, inner: int, depth: int) -> dict[str, np.ndarray]:
    """The published names of a Resampler's (or FaceID-Plus perceiver's) ``depth`` attention + feed-forward
    layers, drawn from ``r`` in a fixed order (the files a seed gives stay the same)."""
    out = {}
    for i in range(depth):
        q = f"{prefix}.{i}"
        out.update({
            f"{q}.0.norm1.weight": 1 + r(width), f"{q}.0.norm1.bias": r(width),
            f"{q}.0.norm2.weight": 1 + r(width), f"{q}.0.norm2.bias": r(width),
            f"{q}.0.to_q.weight": r(inner, width), f"{q}.0.to_kv.weight": r(2 * inner, width),
            f"{q}.0.to_out.weight": r(width, inner),
            f"{q}.1.0.weight": 1 + r(width), f"{q}.1.0.bias": r(width),
            f"{q}.1.1.weight": r(4 * width, width), f"{q}.1.3.weight": r(width, 4 * width),
        })
    return out


def random_ip_adapter_state(widths: list[int], cross_dim: int, variant: str, seed: int,
                            embed_dim: int = 16, hidden_dim: int = 128, depth: int = 4, queries: int = 6,
                            std: float = 0.2) -> dict[str, dict[str, np.ndarray]]:
    """A published-layout state dict ``{"image_proj": ..., "ip_adapter": ...}`` of random float32 arrays.

    Plus uses depth 4 and 64-wide heads: diffusers' loader builds exactly that whatever the file holds. Full
    (``MLPProjModel``, h94's ``ip-adapter-full-face_sd15``) is Linear(embed, embed), GELU, Linear(embed,
    cross), LayerNorm, its keys named by ``nn.Sequential`` index (``proj.0``, ``proj.2``, ``proj.3``)."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: (rng.standard_normal(shape) * std).astype(np.float32)  # noqa: E731
    if variant == "plain":
        proj = {"proj.weight": r(4 * cross_dim, embed_dim), "proj.bias": r(4 * cross_dim),
                "norm.weight": 1 + r(cross_dim), "norm.bias": r(cross_dim)}
    elif variant == "plus":
        proj = {"latents": r(1, queries, hidden_dim), "proj_in.weight": r(hidden_dim, embed_dim),
                "proj_in.bias": r(hidden_dim), "proj_out.weight": r(cross_dim, hidden_dim),
                "proj_out.bias": r(cross_dim), "norm_out.weight": 1 + r(cross_dim), "norm_out.bias": r(cross_dim)}
        proj.update(_perceiver_layers(r, "layers", hidden_dim, hidden_dim, depth))
    elif variant == "full":
        proj = {"proj.0.weight": r(embed_dim, embed_dim), "proj.0.bias": r(embed_dim),
                "proj.2.weight": r(cross_dim, embed_dim), "proj.2.bias": r(cross_dim),
                "proj.3.weight": 1 + r(cross_dim), "proj.3.bias": r(cross_dim)}
    else:
        raise ValueError(variant)
    layers = {}
    for i, width in enumerate(widths):
        layers[f"{2 * i + 1}.to_k_ip.weight"] = r(width, cross_dim)
        layers[f"{2 * i + 1}.to_v_ip.weight"] = r(width, cross_dim)
    return {"image_proj": proj, "ip_adapter": layers}


def write_ip_adapter_state(state, path) -> None:
    from safetensors.numpy import save_file

    flat = {f"{part}.{k}": v for part in ("image_proj", "ip_adapter") for k, v in state[part].items()}
    save_file(flat, str(path))
