"""Reading and writing IP-Adapter files: the published layout round-trips exactly, what we write loads in
diffusers' ``load_ip_adapter`` with the same outputs, and bad files fail with errors that name the problem."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from ipadapter_jax.testing.random_weights import random_ip_adapter_state, write_ip_adapter_state
from ipadapter_jax import load_ip_adapter, save_ip_adapter
from ipadapter_jax.models.adapter import IPAdapter, check_adapter_fits, new_ip_adapter
from ipadapter_jax.models.image_projection import ProjectionConfig
from ipadapter_jax.weights.safetensors_io import WeightFileError
from test_ip_adapter_parity import TOL, Setup

WIDTHS = [32, 32, 64, 64, 64, 64]


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_round_trip_is_identical(variant, tmp_path):
    state = random_ip_adapter_state(WIDTHS, 32, variant, seed=1)
    write_ip_adapter_state(state, tmp_path / "in.safetensors")
    save_ip_adapter(load_ip_adapter(tmp_path / "in.safetensors"), tmp_path / "out.safetensors")
    a, b = load_file(str(tmp_path / "in.safetensors")), load_file(str(tmp_path / "out.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_variant_and_sizes_are_detected(tmp_path):
    write_ip_adapter_state(random_ip_adapter_state(WIDTHS, 32, "plus", seed=2, queries=6), tmp_path / "p.safetensors")
    adapter = load_ip_adapter(tmp_path / "p.safetensors")
    assert adapter.projection == ProjectionConfig("plus", embed_dim=16, cross_attention_dim=32, num_tokens=6,
                                                  hidden_dim=128, depth=4, heads=2, dim_head=64, ff_mult=4)
    assert adapter.num_layers == len(WIDTHS)
    assert adapter.project(jax.numpy.zeros((3, 5, 16))).shape == (3, 6, 32)


def test_bin_is_read_with_the_safe_loader(tmp_path):
    state = random_ip_adapter_state(WIDTHS, 32, "plain", seed=4)
    torch.save({part: {k: torch.from_numpy(v) for k, v in d.items()} for part, d in state.items()},
               tmp_path / "a.bin")
    write_ip_adapter_state(state, tmp_path / "a.safetensors")
    from_bin, from_st = load_ip_adapter(tmp_path / "a.bin"), load_ip_adapter(tmp_path / "a.safetensors")
    for x, y in zip(jax.tree.leaves(from_bin.params), jax.tree.leaves(from_st.params)):
        np.testing.assert_array_equal(x, y)


class _RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/ipadapter_jax_pwned",))


def test_bin_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"image_proj": _RunsCode(), "ip_adapter": {}}, f)
    with pytest.raises(WeightFileError, match="refused"):
        load_ip_adapter(path)
    import os
    assert not os.path.exists("/tmp/ipadapter_jax_pwned")


def test_bad_files_give_clear_errors(tmp_path):
    state = random_ip_adapter_state(WIDTHS, 32, "plain", seed=5)
    del state["ip_adapter"]["3.to_v_ip.weight"]
    write_ip_adapter_state(state, tmp_path / "missing.safetensors")
    with pytest.raises(WeightFileError, match="layer 3 lacks.*to_v_ip"):
        load_ip_adapter(tmp_path / "missing.safetensors")

    state = random_ip_adapter_state(WIDTHS, 32, "plain", seed=5)
    state["image_proj"]["norm.weight"] = np.ones(31, np.float32)
    write_ip_adapter_state(state, tmp_path / "shape.safetensors")
    with pytest.raises(WeightFileError, match="shape mismatches"):
        load_ip_adapter(tmp_path / "shape.safetensors")

    good = tmp_path / "good.safetensors"
    write_ip_adapter_state(random_ip_adapter_state(WIDTHS, 32, "plain", seed=6), good)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="truncated"):
        load_ip_adapter(tmp_path / "cut.safetensors")


def test_adapter_for_another_base_is_rejected(tiny_unet_dirs, tmp_path):
    from ipadapter_jax.weights.load_unet import load_unet

    _, _, config = load_unet(tiny_unet_dirs["sdxl"])
    write_ip_adapter_state(random_ip_adapter_state(WIDTHS, 32, "plain", seed=7), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="made for another base model"):
        check_adapter_fits(config, load_ip_adapter(tmp_path / "a.safetensors"))


def _shipped_export_dtype(arch: str) -> str:
    """``checkpoint.export_dtype`` of the shipped config for ``arch`` (float16, as h94 publishes)."""
    from configs import sd15, sdxl

    return {"sd15": sd15, "sdxl": sdxl}[arch].get_config().checkpoint.export_dtype


# sd15: save_ip_adapter in float32, and the trainer's export in the shipped config's dtype, plain and Plus;
# sdxl: the export of a plain adapter (its layer numbering is what differs; the writer is the same).
WRITES = {"sd15": ("save_ip_adapter", "export"), "sdxl": ("export",)}
VARIANTS = {"sd15": ("plain", "plus"), "sdxl": ("plain",)}


@pytest.mark.parametrize("arch", sorted(WRITES))
def test_what_we_save_loads_in_diffusers_with_the_same_outputs(tiny_unet_dirs, tmp_path, arch):
    """Written by us, read by diffusers' ``IPAdapterMixin.load_ip_adapter``: the same noise predictions as our
    UNet with the adapter we wrote, rounded to the file's dtype in memory (so a float16 export is compared
    on the same rounded weights, and a writer that mislabels or reorders tensors fails)."""
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    from ipadapter_jax.train.checkpoint import export_adapter

    setup = Setup(arch, tiny_unet_dirs[arch])
    cross = setup.cross
    projections = {"plain": ProjectionConfig("plain", embed_dim=16, cross_attention_dim=cross),
                   "plus": ProjectionConfig("plus", embed_dim=16, cross_attention_dim=cross, num_tokens=8,
                                            hidden_dim=128, heads=2, dim_head=64)}
    for variant in VARIANTS[arch]:
        projection = projections[variant]
        adapter = new_ip_adapter(setup.config, setup.params, projection, jax.random.key(0))
        # The paper's init copies to_k/to_v; perturb so the image branch differs from the text branch.
        leaves, tree = jax.tree.flatten(adapter.params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        adapter.params = jax.tree.unflatten(
            tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
        for write in WRITES[arch]:
            if write == "export":
                dtype = _shipped_export_dtype(arch)
                path = export_adapter(adapter.params, projection, tmp_path / f"{variant}_run", step=1, keep=1,
                                      dtype=dtype)
            else:
                dtype, path = "float32", tmp_path / f"{variant}.safetensors"
                save_ip_adapter(adapter, path)
            assert {str(v.dtype) for v in load_file(str(path)).values()} == {dtype}
            written = IPAdapter(projection, jax.tree.map(lambda x: np.asarray(x).astype(dtype).astype(np.float32),
                                                         adapter.params))

            class Holder(IPAdapterMixin):  # the pipeline mixin's real loading code, on a bare UNet
                unet = setup.torch_unet

            Holder().load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name)
            features = [setup.features(variant, 0)]
            for scale in (0.5, 1.0):
                Holder().set_ip_adapter_scale(scale)
                added = dict(setup.torch_added, image_embeds=[f.unsqueeze(1) for f in features])
                with torch.no_grad():
                    ref = setup.torch_unet(setup.x, setup.t, setup.text, added_cond_kwargs=added).sample.numpy()
                ours = setup.run_ours([written], features, scale)
                assert np.abs(ours - ref).max() <= TOL, (write, variant, scale, np.abs(ours - ref).max())


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_new_adapter_copies_text_projections(tiny_unet_dirs, arch):
    """Every layer's to_k_ip / to_v_ip starts as its own cross-attention's to_k / to_v (the paper's init),
    layer i matched to diffusers' i-th cross-attention processor read from the torch UNet itself."""
    import torch
    from diffusers import UNet2DConditionModel

    from ipadapter_jax.weights.load_unet import load_unet

    _, params, config = load_unet(tiny_unet_dirs[arch])
    projection = ProjectionConfig("plain", embed_dim=16, cross_attention_dim=config.cross_attention_dim)
    adapter = new_ip_adapter(config, params, projection, jax.random.key(0))
    check_adapter_fits(config, adapter)
    theirs = UNet2DConditionModel.from_pretrained(tiny_unet_dirs[arch])
    modules = dict(theirs.named_modules())
    cross = [name.removesuffix(".processor") for name in theirs.attn_processors if name.endswith("attn2.processor")]
    assert len(cross) == adapter.num_layers > 1
    for i, name in enumerate(cross):
        with torch.no_grad():
            k, v = (modules[name].to_k.weight.numpy().T, modules[name].to_v.weight.numpy().T)
        np.testing.assert_array_equal(adapter.params["layers"][i]["to_k_ip"], k, err_msg=f"layer {i} {name}")
        np.testing.assert_array_equal(adapter.params["layers"][i]["to_v_ip"], v, err_msg=f"layer {i} {name}")
    # Distinct per layer: a copy of one layer everywhere would fail above, but say so plainly too.
    assert len({np.asarray(layer["to_k_ip"]).tobytes() for layer in adapter.params["layers"]}) == len(cross)
