"""Damaged and hostile weight files through every loader: each fails with a `WeightFileError` that names
the file and the problem (the key, the dtype, the byte where it is cut), and a pickle that would run code
is never unpickled.

Loaders: ``load_unet``, ``load_vae``, ``load_clip_text_encoder``, ``load_clip_vision_encoder`` (model
folders, tiny random models saved by diffusers / transformers) and ``load_ip_adapter`` (single files).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_SD15
from safetensors.numpy import load_file, save_file

from ipadapter_jax.models.image_projection import ProjectionConfig
from ipadapter_jax.testing.random_weights import random_ip_adapter_state, write_ip_adapter_state
from ipadapter_jax.weights.ip_adapter_file import load_ip_adapter
from ipadapter_jax.weights.load_clip import load_clip_text_encoder, load_clip_vision_encoder
from ipadapter_jax.weights.load_unet import load_unet
from ipadapter_jax.weights.load_vae import load_vae
from ipadapter_jax.weights.safetensors_io import WeightFileError, read_safetensors

LOADERS = {
    "unet": (load_unet, "diffusion_pytorch_model"),
    "vae": (load_vae, "diffusion_pytorch_model"),
    "clip_text": (load_clip_text_encoder, "model"),
    "clip_vision": (load_clip_vision_encoder, "model"),
}


class WritesAFile:
    """Unpickling this creates ``path``: a harmless stand-in for code a hostile checkpoint would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_checkpoint(path: Path, marker: Path, fmt: str) -> None:
    """A checkpoint that creates `marker` when unpickled: torch's zip format, torch's legacy format,
    or a bare pickle."""
    payload = {"image_proj": {"proj.weight": WritesAFile(marker)}, "ip_adapter": {}}
    if fmt == "torch_zip":
        torch.save(payload, path)
    elif fmt == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)


@pytest.mark.parametrize("fmt", ["torch_zip", "torch_legacy", "pickle"])
def test_hostile_payload_is_live(tmp_path, fmt):
    """The payload the refusal tests use really runs when unpickled the unsafe way (so their 'no file
    was created' means something)."""
    hostile_checkpoint(tmp_path / "x.bin", tmp_path / "ran", fmt)
    if fmt == "pickle":
        with open(tmp_path / "x.bin", "rb") as f:
            pickle.load(f)
    else:
        torch.load(tmp_path / "x.bin", weights_only=False)
    assert (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------------- model folders
def _tiny_vae(folder: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                  latent_channels=4).save_pretrained(folder)


def _tiny_clip(folder: Path, tower: str) -> None:
    torch.manual_seed(0)
    if tower == "text":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=50, hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1,
            max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    else:
        model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
            hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1, image_size=8,
            patch_size=4, projection_dim=8))
    model.save_pretrained(folder)


def _tiny_unet(folder: Path) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_SD15).save_pretrained(folder)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    _tiny_unet(root / "unet")
    _tiny_vae(root / "vae")
    _tiny_clip(root / "clip_text", "text")
    _tiny_clip(root / "clip_vision", "vision")
    return {name: root / name for name in LOADERS}


def _bare(key: str) -> str:
    """The key as our error messages print it for either transformers layout."""
    return re.sub(r"^(text_model|vision_model)\.", "", key)


def _edit_tensors(edit):
    """A damage that rewrites the weights file through ``edit(tensors) -> key the message must name``."""

    def damage(folder: Path, weights: Path) -> str:
        tensors = load_file(str(weights))
        named = edit(tensors)
        save_file(tensors, str(weights))
        return re.escape(_bare(named))

    return damage


def _first_matrix(tensors) -> str:
    return next(k for k in sorted(tensors) if tensors[k].ndim >= 2)


def _drop(tensors):
    key = sorted(tensors)[0]
    del tensors[key]
    return key


def _add(tensors):
    tensors["surplus.block.weight"] = np.zeros((2, 2), np.float32)
    return "surplus.block.weight"


def _reshape(tensors):
    key = _first_matrix(tensors)
    tensors[key] = np.zeros((tensors[key].shape[0] + 1,) + tensors[key].shape[1:], np.float32)
    return key


def _to_int(tensors):
    key = _first_matrix(tensors)
    tensors[key] = np.zeros(tensors[key].shape, np.int32)
    return key


def _to_bool(tensors):
    key = sorted(tensors)[-1]
    tensors[key] = np.zeros(tensors[key].shape, np.bool_)
    return key


def _truncate(folder, weights):
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * 0.6)])
    return "truncated"


def _garbage_header(folder, weights):
    data = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(data[:8] + b"{" + b"x" * (header_len - 1) + data[8 + header_len:])
    return "malformed safetensors header"


def _header_not_an_object(folder, weights):
    header = b"[1, 2, 3]"
    weights.write_bytes(struct.pack("<Q", len(header)) + header)
    return "malformed safetensors header"


def _rewrite_header(change):
    """Re-serialise the header after ``change(header) -> key the message must name``."""

    def damage(folder, weights):
        data = weights.read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        named = change(header)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + header_len:])
        return named

    return damage


def _unknown_dtype(header):
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key]["dtype"] = "F8_E4M3"
    return rf"{re.escape(key)}.*F8_E4M3"


def _negative_offset(header):
    key = sorted(k for k in header if k != "__metadata__")[0]
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin - 8, end - 8]
    return rf"{re.escape(key)}.*data_offsets"


def _negative_dimension(header):
    key = next(k for k in sorted(header) if k != "__metadata__" and len(header[k]["shape"]) == 2)
    rows, cols = header[key]["shape"]
    header[key]["shape"] = [-rows, -cols]
    return rf"{re.escape(key)}.*shape"


def _pickle_named_safetensors(folder, weights):
    hostile_checkpoint(weights, folder.parent / "ran", "torch_zip")
    return "not a safetensors file.*PyTorch"


def _pickle_bin_instead(folder, weights):
    hostile_checkpoint(weights.with_suffix(".bin"), folder.parent / "ran", "torch_zip")
    weights.unlink()
    return re.escape(weights.name) + ".*found.*" + re.escape(weights.with_suffix(".bin").name)


def _no_config(folder, weights):
    (folder / "config.json").unlink()
    return "config.json: no such file"


def _config_not_json(folder, weights):
    (folder / "config.json").write_text('{"_class_name": "cut off')
    return "config.json: not valid JSON"


def _no_weights(folder, weights):
    weights.unlink()
    return re.escape(weights.name)


def _as_sharded(edit_index):
    """Split the weights over two shards with an index, then ``edit_index(index, folder)``."""

    def damage(folder, weights):
        tensors = load_file(str(weights))
        keys = sorted(tensors)
        half = len(keys) // 2
        stem = weights.name[: -len(".safetensors")]
        shards = {f"{stem}-0000{i + 1}-of-00002.safetensors": part for i, part in enumerate((keys[:half], keys[half:]))}
        for name, part in shards.items():
            save_file({k: tensors[k] for k in part}, str(folder / name))
        weights.unlink()
        index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
        named = edit_index(index, folder)
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index))
        return named

    return damage


def _index_shard_missing(index, folder):
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    return re.escape(shard) + ": no such file"


def _index_escapes_folder(index, folder):
    outside = folder.parent / "outside.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(outside))
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = "../outside.safetensors"
    return "../outside.safetensors.*not a file name in the folder"


def _index_lists_absent_tensor(index, folder):
    index["weight_map"]["not.in.any.shard"] = sorted(set(index["weight_map"].values()))[0]
    return "not.in.any.shard"


def _index_without_weight_map(index, folder):
    del index["weight_map"]
    index["weights"] = {}
    return "no 'weight_map'"


FOLDER_DAMAGE = {
    "missing_key": _edit_tensors(_drop),
    "unexpected_key": _edit_tensors(_add),
    "wrong_shape": _edit_tensors(_reshape),
    "int_dtype": _edit_tensors(_to_int),
    "bool_dtype": _edit_tensors(_to_bool),
    "truncated_file": _truncate,
    "garbage_header": _garbage_header,
    "header_not_an_object": _header_not_an_object,
    "unknown_dtype": _rewrite_header(_unknown_dtype),
    "negative_data_offset": _rewrite_header(_negative_offset),
    "negative_dimension": _rewrite_header(_negative_dimension),
    "pickle_named_safetensors": _pickle_named_safetensors,
    "pickle_bin_instead_of_safetensors": _pickle_bin_instead,
    "no_weights_file": _no_weights,
    "no_config": _no_config,
    "config_not_json": _config_not_json,
    "shard_missing": _as_sharded(_index_shard_missing),
    "shard_outside_the_folder": _as_sharded(_index_escapes_folder),
    "index_lists_absent_tensor": _as_sharded(_index_lists_absent_tensor),
    "index_without_weight_map": _as_sharded(_index_without_weight_map),
}
# What each damage must be reported as, beyond the pattern it returns.
CATEGORY = {"missing_key": "missing keys", "unexpected_key": "unexpected keys", "wrong_shape": "shape mismatches",
            "int_dtype": "dtype", "bool_dtype": "dtype"}


@pytest.mark.parametrize("damage", sorted(FOLDER_DAMAGE))
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_damaged_model_folder_is_reported(loader, damage, model_dirs, tmp_path):
    load, stem = LOADERS[loader]
    folder = tmp_path / "model"
    shutil.copytree(model_dirs[loader], folder)
    pattern = FOLDER_DAMAGE[damage](folder, folder / f"{stem}.safetensors")
    with pytest.raises(WeightFileError) as info:
        load(folder)
    message = str(info.value)
    assert re.search(pattern, message, re.S), message
    if damage in CATEGORY:
        assert CATEGORY[damage] in message, message
    assert str(folder) in message or folder.name in message, message  # which model it is
    assert not (tmp_path / "ran").exists()  # nothing was unpickled


def test_undamaged_copies_load(model_dirs, tmp_path):
    """The damage tests start from folders that load."""
    for name, (load, _) in LOADERS.items():
        shutil.copytree(model_dirs[name], tmp_path / name)
        load(tmp_path / name)


# -------------------------------------------------------------------------------------- IP-Adapter
WIDTHS = [32, 32, 64, 64, 64, 64]


def _adapter_file(tmp_path: Path, variant: str = "plain", edit=None, **sizes) -> Path:
    state = random_ip_adapter_state(WIDTHS, 32, variant, seed=3, **sizes)
    if edit is not None:
        edit(state)
    path = tmp_path / f"{variant}.safetensors"
    write_ip_adapter_state(state, path)
    return path


def _set(part, key, value):
    def edit(state):
        if value is None:
            del state[part][key]
        else:
            state[part][key] = value(state[part].get(key)) if callable(value) else value

    return edit


ADAPTER_DAMAGE = {
    "projection_key_missing": (_set("image_proj", "norm.bias", None), r"missing keys.*norm\.bias"),
    "projection_key_unexpected": (_set("image_proj", "extra.weight", np.zeros(3, np.float32)),
                                  r"unexpected keys.*extra\.weight"),
    "projection_wrong_shape": (_set("image_proj", "proj.bias", np.zeros(5, np.float32)), r"shape mismatches.*proj\.bias"),
    "projection_int_dtype": (_set("image_proj", "proj.weight", lambda a: a.astype(np.int32)), r"dtype.*proj\.weight"),
    "layer_missing": (_set("ip_adapter", "5.to_k_ip.weight", None), r"layer 5 lacks.*to_k_ip"),
    "layer_unexpected_lora": (_set("ip_adapter", "1.to_q_lora.down.weight", np.zeros((4, 32), np.float32)),
                              r"unexpected ip_adapter keys.*to_q_lora"),
    "layer_int_dtype": (_set("ip_adapter", "3.to_v_ip.weight", lambda a: a.astype(np.int64)), r"dtype.*3\.to_v_ip"),
    "layer_gap": (lambda s: [s["ip_adapter"].pop(f"3.{n}.weight") for n in ("to_k_ip", "to_v_ip")],
                  r"not 1, 3, 5.*missing \[3\]"),
}


@pytest.mark.parametrize("damage", sorted(ADAPTER_DAMAGE))
def test_damaged_ip_adapter_is_reported(damage, tmp_path):
    edit, pattern = ADAPTER_DAMAGE[damage]
    path = _adapter_file(tmp_path, edit=edit)
    with pytest.raises(WeightFileError) as info:
        load_ip_adapter(path)
    assert re.search(pattern, str(info.value), re.S) and str(path) in str(info.value), str(info.value)


def test_ip_adapter_file_problems_are_reported(tmp_path):
    path = _adapter_file(tmp_path)
    data = path.read_bytes()
    for name, content, pattern in (
        ("cut.safetensors", data[: len(data) // 2], "truncated"),
        ("empty.safetensors", b"", "truncated"),
        ("stray.safetensors", None, r"keys must start with 'image_proj\.'.*lora_unet"),
    ):
        target = tmp_path / name
        if content is None:
            save_file({**load_file(str(path)), "lora_unet.down.weight": np.zeros(2, np.float32)}, str(target))
        else:
            target.write_bytes(content)
        with pytest.raises(WeightFileError, match=pattern):
            load_ip_adapter(target)
    with pytest.raises(WeightFileError, match="no such file"):
        load_ip_adapter(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("fmt", ["torch_zip", "torch_legacy", "pickle"])
def test_hostile_ip_adapter_bin_is_refused_unread(fmt, tmp_path):
    hostile_checkpoint(tmp_path / "ip-adapter.bin", tmp_path / "ran", fmt)
    with pytest.raises(WeightFileError, match="refused"):
        load_ip_adapter(tmp_path / "ip-adapter.bin")
    assert not (tmp_path / "ran").exists()
    # The same bytes under a .safetensors name are not a pickle to us at all.
    shutil.copy(tmp_path / "ip-adapter.bin", tmp_path / "ip-adapter.safetensors")
    with pytest.raises(WeightFileError, match="not a safetensors file"):
        load_ip_adapter(tmp_path / "ip-adapter.safetensors")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("content, pattern", [
    ({"image_proj": {"proj.weight": 3}, "ip_adapter": {}}, r"image_proj\.proj\.weight.*not a tensor \(int\)"),
    ({"image_proj": [1, 2], "ip_adapter": {}}, r"'image_proj' is a list, not a dict of tensors"),
    ({"state_dict": {}}, "expected a dict with 'image_proj' and 'ip_adapter'"),
    ([torch.zeros(2)], "expected a dict with 'image_proj' and 'ip_adapter'"),
])
def test_bin_with_allowed_but_wrong_contents_is_reported(content, pattern, tmp_path):
    torch.save(content, tmp_path / "odd.bin")
    with pytest.raises(WeightFileError, match=pattern):
        load_ip_adapter(tmp_path / "odd.bin")


def test_wrong_variant_is_refused_when_one_is_expected(tmp_path):
    """``expect=``: a variant name, or the full ProjectionConfig a training config asks for."""
    plus = _adapter_file(tmp_path, "plus", queries=8)
    plain = _adapter_file(tmp_path, "plain")
    with pytest.raises(WeightFileError, match=r"holds a plus IP-Adapter.*expected plain"):
        load_ip_adapter(plus, expect="plain")
    with pytest.raises(WeightFileError, match=r"holds a plain IP-Adapter.*expected plus"):
        load_ip_adapter(plain, expect="plus")
    wanted = ProjectionConfig("plus", embed_dim=16, cross_attention_dim=32, num_tokens=16, hidden_dim=128,
                              depth=4, heads=2, dim_head=64, ff_mult=4)
    with pytest.raises(WeightFileError, match=r"num_tokens: file 8, expected 16"):
        load_ip_adapter(plus, expect=wanted)
    assert load_ip_adapter(plus, expect="plus").variant == "plus"
    assert load_ip_adapter(plus, expect=ProjectionConfig(**{**wanted.__dict__, "num_tokens": 8})).variant == "plus"
    assert load_ip_adapter(plain).variant == "plain"  # no expectation: whatever the file holds
    with pytest.raises(ValueError, match="unknown IP-Adapter variant"):
        load_ip_adapter(plain, expect="plusplus")


def test_reader_errors_name_the_file(tmp_path):
    """The low-level reader on its own: every problem names the path."""
    for name, data in (("short", b"\x01\x02"), ("huge_header", struct.pack("<Q", 1 << 60) + b"{}"),
                       ("zip", b"PK\x03\x04" + b"\x00" * 64), ("pickle", b"\x80\x02}q\x00." + b"\x00" * 16)):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(WeightFileError) as info:
            read_safetensors(path)
        assert str(path) in str(info.value)
