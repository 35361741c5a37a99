"""Parity of our CLIP encoders with transformers 5 (PyTorch), through save_pretrained folders.

Tolerance: max abs difference <= 1e-4 in float32 on every compared output.
"""

from __future__ import annotations

import functools
import json
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ipadapter_jax.models.clip import CLIPTextEncoderConfig, CLIPVisionEncoderConfig, nchw_to_nhwc
from ipadapter_jax.weights.load_clip import (
    init_clip_text_encoder,
    init_clip_vision_encoder,
    load_clip_text_encoder,
    load_clip_vision_encoder,
)
from ipadapter_jax.weights.torch_layout import flax_to_torch
from ipadapter_jax.weights.safetensors_io import WeightFileError, read_json, read_safetensors, write_safetensors

TOL = 1e-4
CONFIGS = "/work/shared/reference/configs"
VOCAB = 100


def _max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - theirs.detach().float().numpy())))


def _randomize(model):
    """transformers' init leaves norms at (1, 0) and biases at 0, which would hide swapped or dropped params."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return model.eval()


def _tiny_text_model(cls, hidden_act: str, eos_token_id: int):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=16, projection_dim=24, hidden_act=hidden_act, bos_token_id=0,
        eos_token_id=eos_token_id, pad_token_id=1)
    return _randomize(cls(config))


def _token_ids(eos_token_id: int) -> np.ndarray:
    """Three sequences of 16 tokens ending at different places, padded with the EOS token (as CLIP's tokenizer
    pads SD prompts). For a non-legacy EOS the highest id also appears before EOS, so the two pooling rules
    pick different tokens."""
    rng = np.random.default_rng(0)
    end_token = VOCAB - 1 if eos_token_id == 2 else eos_token_id
    ids = rng.integers(3, VOCAB - 2, size=(3, 16))
    for row, eos_at in enumerate((4, 9, 15)):
        ids[row, eos_at:] = end_token
        if eos_token_id != 2:
            ids[row, 1] = VOCAB - 1
    return ids


def _check_text_parity(torch_model, module, params, ids, attention_mask=None) -> dict[str, float]:
    with torch.no_grad():
        mask_t = None if attention_mask is None else torch.tensor(attention_mask)
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=mask_t, output_hidden_states=True)
        body = getattr(torch_model, "text_model", torch_model)
        ref_pooled = body(input_ids=torch.tensor(ids), attention_mask=mask_t).pooler_output
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), attention_mask)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    diffs = {
        "last_hidden_state": _max_diff(out.last_hidden_state, ref.last_hidden_state),
        "penultimate": _max_diff(out.hidden_states[-2], ref.hidden_states[-2]),
        "all_hidden_states": max(_max_diff(a, b) for a, b in zip(out.hidden_states, ref.hidden_states)),
        "pooled": _max_diff(out.pooler_output, ref_pooled),
    }
    if hasattr(ref, "text_embeds"):
        diffs["text_embeds"] = _max_diff(out.text_embeds, ref.text_embeds)
    else:
        assert out.text_embeds is None
    print(type(torch_model).__name__, diffs)
    assert max(diffs.values()) <= TOL, diffs
    return diffs


@pytest.mark.parametrize(
    "cls, hidden_act, eos_token_id",
    [
        (transformers.CLIPTextModel, "quick_gelu", 2),  # SD 1.5: legacy EOS id, pooled at argmax(ids)
        (transformers.CLIPTextModel, "gelu", VOCAB - 2),
        (transformers.CLIPTextModelWithProjection, "gelu", 2),  # SDXL's second encoder
        (transformers.CLIPTextModelWithProjection, "quick_gelu", VOCAB - 2),
    ],
)
def test_text_encoder_matches_transformers(tmp_path, cls, hidden_act, eos_token_id):
    torch_model = _tiny_text_model(cls, hidden_act, eos_token_id)
    torch_model.save_pretrained(tmp_path)
    module, params, config = load_clip_text_encoder(tmp_path)
    assert type(module).__name__ == cls.__name__
    assert config.hidden_act == hidden_act and config.eos_token_id == eos_token_id
    _check_text_parity(torch_model, module, params, _token_ids(eos_token_id))


def test_text_encoder_attention_mask_matches_transformers(tmp_path):
    torch_model = _tiny_text_model(transformers.CLIPTextModelWithProjection, "gelu", VOCAB - 2)
    torch_model.save_pretrained(tmp_path)
    module, params, _ = load_clip_text_encoder(tmp_path)
    ids = _token_ids(VOCAB - 2)
    mask = (np.arange(16)[None] <= np.array([[4], [9], [15]])).astype(np.int64)  # EOS is the last real token
    _check_text_parity(torch_model, module, params, ids, attention_mask=mask)


def test_text_loader_reads_transformers4_layout(tmp_path):
    """SD releases were written by transformers 4: ``text_model.`` prefix on a plain CLIPTextModel and the
    ``position_ids`` buffer persisted. transformers 5 writes neither; both must load to the same params."""
    torch_model = _tiny_text_model(transformers.CLIPTextModel, "quick_gelu", 2)
    new_dir, old_dir = tmp_path / "v5", tmp_path / "v4"
    torch_model.save_pretrained(new_dir)
    tensors = read_safetensors(new_dir / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in tensors)  # the layout difference this test is about
    old = {f"text_model.{k}": v for k, v in tensors.items()}
    old["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    write_safetensors(old, old_dir / "model.safetensors")
    (old_dir / "config.json").write_text((new_dir / "config.json").read_text())
    _, params_new, _ = load_clip_text_encoder(new_dir)
    module, params_old, _ = load_clip_text_encoder(old_dir)
    jax.tree.map(np.testing.assert_array_equal, params_new, params_old)
    _check_text_parity(torch_model, module, params_old, _token_ids(2))


def _tiny_vision_model(cls, hidden_act: str):
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3, image_size=30,
        patch_size=6, projection_dim=24, hidden_act=hidden_act)
    return _randomize(cls(config))


@pytest.mark.parametrize(
    "cls, hidden_act, shard",
    [
        (transformers.CLIPVisionModelWithProjection, "gelu", False),  # IP-Adapter's image encoders
        (transformers.CLIPVisionModelWithProjection, "quick_gelu", True),
        (transformers.CLIPVisionModel, "quick_gelu", False),
    ],
)
def test_vision_encoder_matches_transformers(tmp_path, cls, hidden_act, shard):
    torch_model = _tiny_vision_model(cls, hidden_act)
    torch_model.save_pretrained(tmp_path, **({"max_shard_size": "40KB"} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    module, params, config = load_clip_vision_encoder(tmp_path)
    assert type(module).__name__ == cls.__name__ and config.hidden_act == hidden_act

    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch_model(pixel_values=pixels, output_hidden_states=True)
        ref_pooled = torch_model.vision_model(pixel_values=pixels).pooler_output if hasattr(
            torch_model, "vision_model") else ref.pooler_output
    out = jax.jit(module.apply)({"params": params}, nchw_to_nhwc(pixels.numpy()))
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    assert out.hidden_states[-2].shape == (2, 26, 48)  # 25 patches + CLS: IP-Adapter Plus' features
    diffs = {
        "last_hidden_state": _max_diff(out.last_hidden_state, ref.last_hidden_state),
        "penultimate": _max_diff(out.hidden_states[-2], ref.hidden_states[-2]),
        "all_hidden_states": max(_max_diff(a, b) for a, b in zip(out.hidden_states, ref.hidden_states)),
        "pooled": _max_diff(out.pooler_output, ref_pooled),
    }
    if hasattr(ref, "image_embeds"):
        diffs["image_embeds"] = _max_diff(out.image_embeds, ref.image_embeds)
    else:
        assert out.image_embeds is None
    print(cls.__name__, hidden_act, diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_vision_encoder_bfloat16_close_to_float32(tmp_path):
    torch_model = _tiny_vision_model(transformers.CLIPVisionModelWithProjection, "gelu")
    torch_model.save_pretrained(tmp_path)
    module, params, _ = load_clip_vision_encoder(tmp_path, dtype="bfloat16")
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch_model(pixel_values=pixels, output_hidden_states=True)
    out = jax.jit(module.apply)({"params": params}, nchw_to_nhwc(pixels.numpy()))
    assert out.image_embeds.dtype == jnp.bfloat16 and out.hidden_states[-2].dtype == jnp.bfloat16
    # bf16 has 8 bits of mantissa: ~1e-2 relative per op, a few ops deep.
    diff = _max_diff(out.hidden_states[-2], ref.hidden_states[-2])
    scale = float(ref.hidden_states[-2].abs().max())
    print("bf16 penultimate max abs diff", diff, "of max", scale)
    assert diff <= 0.05 * scale
    lean = jax.jit(functools.partial(module.apply, output_hidden_states=False))(
        {"params": params}, nchw_to_nhwc(pixels.numpy()))
    assert lean.hidden_states is None
    # Without the hidden states XLA may fuse (and so round in bf16) differently.
    lean_diff = float(jnp.max(jnp.abs(lean.image_embeds.astype(jnp.float32) - out.image_embeds.astype(jnp.float32))))
    assert lean_diff <= 0.02 * float(jnp.max(jnp.abs(out.image_embeds.astype(jnp.float32))))


def test_loader_reports_missing_unexpected_and_mismatched_keys(tmp_path):
    torch_model = _tiny_vision_model(transformers.CLIPVisionModelWithProjection, "gelu")
    torch_model.save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    del tensors["vision_model.encoder.layers.1.mlp.fc2.bias"]
    tensors["vision_model.encoder.layers.1.mlp.fc3.weight"] = np.zeros((4, 4), np.float32)
    tensors["visual_projection.weight"] = np.zeros((7, 48), np.float32)
    write_safetensors(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightFileError) as err:
        load_clip_vision_encoder(tmp_path)
    message = str(err.value)
    for expected in ("missing keys (1): vision_model.encoder.layers.1.mlp.fc2.bias",
                     "unexpected keys (1): vision_model.encoder.layers.1.mlp.fc3.weight",
                     "shape mismatches (1): visual_projection.weight", "CLIPVisionModelWithProjection"):
        assert expected in message, message


def test_loader_rejects_unknown_architecture_and_wrong_tower(tmp_path):
    torch_model = _tiny_text_model(transformers.CLIPTextModel, "gelu", VOCAB - 2)
    torch_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["CLIPModel"]}))
    with pytest.raises(ValueError, match="architectures .*CLIPModel"):
        load_clip_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"CLIP image encoder: architectures \[.CLIPTextModel.\]"):
        load_clip_vision_encoder(tmp_path)


def test_configs_from_reference_and_nested_dicts():
    sd15 = CLIPTextEncoderConfig.from_dict(read_json(f"{CONFIGS}/sd15_text_encoder.json"))
    assert (sd15.hidden_size, sd15.num_hidden_layers, sd15.hidden_act, sd15.eos_token_id) == (768, 12, "quick_gelu", 2)
    vit_h = CLIPVisionEncoderConfig.from_dict(read_json(f"{CONFIGS}/ip_adapter_image_encoder_vit_h14.json"))
    assert (vit_h.hidden_size, vit_h.patch_size, vit_h.projection_dim, vit_h.num_positions) == (1280, 14, 1024, 257)
    full = {"projection_dim": 64, "text_config": {"hidden_size": 32, "num_attention_heads": 4, "hidden_act": "gelu"},
            "vision_config": {"hidden_size": 48, "num_attention_heads": 4, "image_size": [30, 30], "patch_size": 6}}
    assert CLIPTextEncoderConfig.from_dict(full).projection_dim == 64
    assert CLIPVisionEncoderConfig.from_dict(full).image_size == 30
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextEncoderConfig.from_dict({"hidden_act": "relu"})


FULL_SIZE = [
    ("sd15_text_encoder", "text", transformers.CLIPTextModel, transformers.CLIPTextConfig),
    ("sdxl_text_encoder_2", "text", transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig),
    ("ip_adapter_image_encoder_vit_h14", "vision", transformers.CLIPVisionModelWithProjection,
     transformers.CLIPVisionConfig),
    ("ip_adapter_image_encoder_vit_bigg14", "vision", transformers.CLIPVisionModelWithProjection,
     transformers.CLIPVisionConfig),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, tower, torch_cls, torch_config_cls", FULL_SIZE, ids=[c[0] for c in FULL_SIZE])
def test_full_size_param_count_matches_transformers(name, tower, torch_cls, torch_config_cls):
    config = read_json(f"{CONFIGS}/{name}.json")
    init = init_clip_text_encoder if tower == "text" else init_clip_vision_encoder
    module, shapes = init(config, shapes_only=True)
    assert type(module).__name__ == torch_cls.__name__
    with torch.device("meta"):
        torch_model = torch_cls(torch_config_cls.from_dict(config))
    torch_count = sum(p.numel() for p in torch_model.parameters())
    ours = sum(x.size for x in jax.tree.leaves(shapes))
    print(name, "params", ours)
    assert ours == torch_count


def _torch_twin(torch_cls, torch_config_cls, config: dict, params) -> torch.nn.Module:
    """The transformers model holding our params, built on the meta device so nothing is allocated twice."""
    with torch.device("meta"):
        model = torch_cls(torch_config_cls.from_dict(config))
    with warnings.catch_warnings():  # read-only views of our params: torch only reads them here
        warnings.simplefilter("ignore", UserWarning)
        state = {k: torch.from_numpy(v) for k, v in flax_to_torch(params).items()}
    if not hasattr(model, "text_model") and not hasattr(model, "vision_model"):  # a bare transformers-5 body
        state = {k.split(".", 1)[1]: v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():  # non-persistent buffers are still on meta
        if hasattr(module, "position_ids"):
            module.position_ids = torch.arange(module.position_ids.shape[-1])[None]
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name, tower, torch_cls, torch_config_cls", FULL_SIZE[:3], ids=[c[0] for c in FULL_SIZE[:3]])
def test_full_size_runs_once_on_random_weights(name, tower, torch_cls, torch_config_cls):
    """Batch 1 at the real configs, random weights, against transformers holding the same weights."""
    config = read_json(f"{CONFIGS}/{name}.json")
    start = time.perf_counter()
    if tower == "text":
        module, params = init_clip_text_encoder(config)
        ids = np.full((1, 77), 49407)  # BOS, a few random words, EOS padding: an SD prompt's layout
        ids[0, 0], ids[0, 1:10] = 49406, np.random.default_rng(0).integers(0, 49406, size=9)
        inputs, torch_inputs, tokens = jnp.asarray(ids), {"input_ids": torch.tensor(ids)}, 77
    else:
        module, params = init_clip_vision_encoder(config)
        pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        inputs, torch_inputs, tokens = nchw_to_nhwc(pixels.numpy()), {"pixel_values": pixels}, 257
    jax.block_until_ready(params)
    init_s, start = time.perf_counter() - start, time.perf_counter()
    compiled = jax.jit(module.apply).lower({"params": params}, inputs).compile()
    compile_s, start = time.perf_counter() - start, time.perf_counter()
    out = jax.block_until_ready(compiled({"params": params}, inputs))
    run_s = time.perf_counter() - start
    print(f"{name}: random init {init_s:.1f}s, compile {compile_s:.1f}s, batch-1 forward {run_s:.1f}s")

    width = config["hidden_size"]
    assert len(out.hidden_states) == config["num_hidden_layers"] + 1
    assert out.hidden_states[-2].shape == out.last_hidden_state.shape == (1, tokens, width)
    assert out.pooler_output.shape == (1, width)

    params_np = jax.tree.map(np.asarray, params)
    del params
    with torch.no_grad():
        ref = _torch_twin(torch_cls, torch_config_cls, config, params_np)(**torch_inputs, output_hidden_states=True)
    pairs = {"last_hidden_state": (out.last_hidden_state, ref.last_hidden_state),
             "penultimate": (out.hidden_states[-2], ref.hidden_states[-2])}
    embeds = "text_embeds" if tower == "text" else "image_embeds"
    if hasattr(ref, embeds):
        pairs[embeds] = (getattr(out, embeds), getattr(ref, embeds))
    else:
        pairs["pooled"] = (out.pooler_output, ref.pooler_output)
    diffs = {k: _max_diff(a, b) for k, (a, b) in pairs.items()}
    scales = {k: float(b.abs().max()) for k, (_, b) in pairs.items()}
    print(name, "max abs diff", diffs, "max abs value", scales)
    for k in pairs:
        assert diffs[k] <= TOL * max(1.0, scales[k]), (k, diffs[k], scales[k])
