"""FaceID adapters (h94/IP-Adapter-FaceID layout) against diffusers, at the UNet.

Files are built here in the published layout (``ip_adapter_faceid.py``: ``image_proj`` of ``MLPProjModel`` or
``ProjPlusModel``, ``ip_adapter`` with ``to_k_ip``/``to_v_ip`` and the LoRA on every attention) with random
weights, on the tiny UNets of ``conftest.py``. diffusers reads them with its pipeline-level
``load_ip_adapter``, which splits the LoRA out of the file and applies it through PEFT
(``load_lora_weights(..., adapter_name="faceid_0")`` at weight 1); the face embeddings go in as
``image_embeds`` (what ``ip_adapter_image_embeds`` becomes), FaceID-Plus's CLIP hidden states, ``shortcut``
and ``shortcut_scale`` as attributes of its projection layer, as diffusers' FaceID docs do. Metric: max
|ours - diffusers| over the noise prediction, fp32, <= 1e-4.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import peft  # noqa: F401  (the test extra's; without it diffusers drops a FaceID file's LoRA with a warning)
import pytest
import torch
from safetensors.numpy import load_file

from conftest import TINY_UNETS
from ipadapter_jax import load_ip_adapter, save_ip_adapter
from ipadapter_jax.models import attention, decoupled_cross_attention
from ipadapter_jax.models.adapter import adapter_variables, check_adapter_fits
from ipadapter_jax.models.ip_scales import resolve_ip_scales
from ipadapter_jax.testing.random_weights import random_faceid_state, torch_attention_shapes, write_ip_adapter_state
from ipadapter_jax.weights.safetensors_io import WeightFileError
from test_ip_adapter_parity import BATCH, TOL, Setup

ID_DIM, CLIP_DIM, CLIP_TOKENS = 16, 16, 5


def _holder(unet, sdxl: bool):
    """The smallest object diffusers' pipeline-level ``load_ip_adapter`` / ``load_lora_weights`` /
    ``set_adapters`` run on: a UNet and no text encoders."""
    from diffusers.loaders.ip_adapter import IPAdapterMixin
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    class Holder(IPAdapterMixin, StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin):
        hf_device_map = None

        def __init__(self):
            self.unet, self.text_encoder, self.text_encoder_2 = unet, None, None

        @property
        def components(self):
            return {"unet": self.unet}

    return Holder()


def _write(state, path):
    if path.suffix == ".bin":
        torch.save({part: {k: torch.from_numpy(v) for k, v in d.items()} for part, d in state.items()}, path)
    else:
        write_ip_adapter_state(state, path)


class FaceSetup(Setup):
    """``Setup``'s inputs and our UNet; a fresh diffusers UNet per adapter (PEFT adapters stick to a UNet)."""

    def __init__(self, name, folder):
        super().__init__(name, folder)
        self.folder = folder
        self.attentions = torch_attention_shapes(self.torch_unet)
        self._forward = jax.jit(self._apply)

    def _apply(self, params, layers, lora, scales, lora_scales, tokens, x, t, text, added):
        variables = {"params": params, **adapter_variables(self.config, [layers], scales,
                                                           None if lora is None else [lora], lora_scales)}
        return self.module.apply(variables, x, t, text, added, image_tokens=[tokens])

    def faces(self, n, seed):
        gen = torch.Generator().manual_seed(200 + seed)
        return torch.randn(BATCH, n, ID_DIM, generator=gen)

    def clip_hidden(self, seed):
        gen = torch.Generator().manual_seed(300 + seed)
        return torch.randn(BATCH, 1, CLIP_TOKENS, CLIP_DIM, generator=gen)

    def torch_unet_with(self, path):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(self.folder).eval()
        holder = _holder(unet, self.name == "sdxl")
        holder.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
        return unet, holder

    def run_torch(self, unet, faces):
        with torch.no_grad():
            return unet(self.x, self.t, self.text,
                        added_cond_kwargs=dict(self.torch_added, image_embeds=[faces])).sample.numpy()

    def run_ours(self, adapter, tokens, scale, lora_scale=1.0):
        lora = adapter.params.get("lora")
        out = self._forward(self.params, adapter.params["layers"], lora, resolve_ip_scales(self.config, scale, 1),
                            None if lora is None else jnp.asarray([lora_scale]), tokens,
                            jnp.asarray(self.x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(self.t.numpy()),
                            jnp.asarray(self.text.numpy()), self.added)
        return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def setups(tiny_unet_dirs):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = FaceSetup(name, tiny_unet_dirs[name])
        return cache[name]
    return get


# (UNet, variant, LoRA rank, tokens per face, faces, file name): the published kinds.
CASES = {
    "faceid_sd15": ("sd15", "faceid", 4, 4, 1, "ip-adapter-faceid_sd15.bin"),
    "faceid_plusv2_sd15": ("sd15", "faceid_plus", 4, 4, 1, "ip-adapter-faceid-plusv2_sd15.bin"),
    "faceid_sdxl": ("sdxl", "faceid", 4, 4, 1, "ip-adapter-faceid_sdxl.safetensors"),
    "faceid_portrait_sd15": ("sd15", "faceid", None, 16, 3, "ip-adapter-faceid-portrait_sd15.bin"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_noise_prediction_matches_diffusers(case, setups, tmp_path):
    name, variant, rank, tokens_per_face, n_faces, file_name = CASES[case]
    setup = setups(name)
    cross = TINY_UNETS[name]["cross_attention_dim"]
    state = random_faceid_state(setup.attentions, cross, variant, seed=len(case), lora_rank=rank, id_dim=ID_DIM,
                                clip_dim=CLIP_DIM, num_tokens=tokens_per_face)
    path = tmp_path / file_name
    _write(state, path)
    adapter = load_ip_adapter(path)
    check_adapter_fits(setup.config, adapter)
    assert (adapter.variant, adapter.has_lora, adapter.projection.num_tokens) == (variant, rank is not None,
                                                                                   tokens_per_face)
    unet, holder = setup.torch_unet_with(path)
    torch_proj = unet.encoder_hid_proj.image_projection_layers[0]
    faces = setup.faces(n_faces, seed=len(case))
    face_input = jnp.asarray(faces.numpy() if n_faces > 1 else faces.numpy()[:, 0])
    # FaceID-Plus: v1 (no shortcut) and v2 (its file name says plusv2: shortcut, s_scale 1 and 0.6).
    modes = [(None, None)]
    if variant == "faceid_plus":
        assert adapter.projection.shortcut  # from the name, as h94 publishes it
        clip = setup.clip_hidden(seed=len(case))
        torch_proj.clip_embeds = clip
        face_input = (face_input, jnp.asarray(clip.numpy()[:, 0]))
        modes = [(False, 1.0), (True, 1.0), (True, 0.6)]

    for shortcut, s_scale in modes:
        if shortcut is not None:
            torch_proj.shortcut, torch_proj.shortcut_scale = shortcut, s_scale
        # v1 passes no scale: a file detected as PlusV2 runs with the shortcut unless told otherwise, so v1
        # means a v1 config; v2 at 1.0 is the default, at 0.6 an explicit shortcut_scale.
        if shortcut is False:
            ours_adapter = load_ip_adapter(path, shortcut=False)
            tokens = ours_adapter.project(face_input)
        elif shortcut and s_scale != 1.0:
            tokens = adapter.project(face_input, shortcut_scale=s_scale)
        else:
            tokens = adapter.project(face_input)
        with torch.no_grad():
            ref_tokens = unet.encoder_hid_proj([faces])[0].reshape(BATCH, -1, cross).numpy()
        np.testing.assert_allclose(np.asarray(tokens), ref_tokens, rtol=0, atol=1e-5)
        assert tokens.shape == (BATCH, n_faces * tokens_per_face, cross)

        outputs = {}
        for scale in (0.0, 0.7):
            holder.set_ip_adapter_scale(scale)
            ref = setup.run_torch(unet, faces)
            ours = setup.run_ours(adapter, tokens, scale)
            err = np.abs(ours - ref).max()
            assert err <= TOL, f"{case} shortcut={shortcut} s_scale={s_scale} scale={scale}: max abs diff {err:.2e}"
            outputs[scale] = ours
        # The face prompt must move the prediction, or the comparison above proves little.
        assert np.abs(outputs[0.7] - outputs[0.0]).max() > 1e-2

    if rank is not None:
        # The LoRA is in diffusers' output (leaving it out here misses it by far more than the tolerance),
        # and its weight means the same on both sides (diffusers' set_adapters weight, our lora scale).
        assert np.abs(setup.run_ours(adapter, tokens, 0.7, lora_scale=0.0) - outputs[0.7]).max() > 1e-2
        holder.set_adapters(["faceid_0"], adapter_weights=[0.5])
        err = np.abs(setup.run_ours(adapter, tokens, 0.7, lora_scale=0.5) - setup.run_torch(unet, faces)).max()
        assert err <= TOL, f"{case} LoRA weight 0.5: max abs diff {err:.2e}"


def _state(variant="faceid", rank=4):
    shapes = [(32, 32, 32), (32, 32, 32), (64, 64, 64), (64, 32, 64)]
    return random_faceid_state(shapes, 32, variant, seed=5, lora_rank=rank, id_dim=ID_DIM, clip_dim=CLIP_DIM)


@pytest.mark.parametrize("variant", ["faceid", "faceid_plus"])
def test_round_trip_and_bin_are_identical(variant, tmp_path):
    """What we save is the published layout, key for key and bit for bit (LoRA included); PlusV2's
    shortcut, which the tensors cannot say, survives in the metadata."""
    state = _state(variant)
    _write(state, tmp_path / "in.safetensors")
    _write(state, tmp_path / "in.bin")
    adapter = load_ip_adapter(tmp_path / "in.safetensors", shortcut=variant == "faceid_plus")
    for x, y in zip(jax.tree.leaves(adapter.params), jax.tree.leaves(load_ip_adapter(tmp_path / "in.bin").params)):
        np.testing.assert_array_equal(x, y)
    save_ip_adapter(adapter, tmp_path / "out.safetensors")
    a, b = load_file(str(tmp_path / "in.safetensors")), load_file(str(tmp_path / "out.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert load_ip_adapter(tmp_path / "out.safetensors").projection == adapter.projection


def test_kinds_are_detected(tmp_path):
    """Keys and shapes say FaceID / FaceID-Plus / Portrait (no LoRA, 16 tokens); Plus vs PlusV2 only the name."""
    cases = {"ip-adapter-faceid_sd15.bin": ("faceid", True, 4, False),
             "ip-adapter-faceid-plus_sd15.bin": ("faceid_plus", True, 4, False),
             "ip-adapter-faceid-plusv2_sd15.bin": ("faceid_plus", True, 4, True),
             "ip-adapter-faceid-portrait-v11_sd15.bin": ("faceid", False, 16, False)}
    shapes = [(32, 32, 32), (32, 32, 32), (64, 64, 64), (64, 32, 64)]
    for file_name, (variant, lora, tokens, shortcut) in cases.items():
        state = random_faceid_state(shapes, 32, variant, seed=1, lora_rank=4 if lora else None, id_dim=ID_DIM,
                                    clip_dim=CLIP_DIM, num_tokens=tokens)
        _write(state, tmp_path / file_name)
        adapter = load_ip_adapter(tmp_path / file_name)
        p = adapter.projection
        assert (p.variant, adapter.has_lora, p.num_tokens, p.shortcut) == (variant, lora, tokens, shortcut), file_name
        assert (p.embed_dim, p.cross_attention_dim, p.id_hidden_dim) == (ID_DIM, 32, 2 * ID_DIM)
        if variant == "faceid_plus":
            assert (p.clip_dim, p.hidden_dim, p.heads, p.dim_head, p.depth, p.ff_mult) == (CLIP_DIM, 32, 2, 64, 4, 4)
        assert load_ip_adapter(tmp_path / file_name, expect=variant).variant == variant
    with pytest.raises(WeightFileError, match=r"holds a faceid IP-Adapter.*expected plain"):
        load_ip_adapter(tmp_path / "ip-adapter-faceid_sd15.bin", expect="plain")


def _drop(part, key):
    return lambda s: s[part].pop(key)


def _add(part, key, shape):
    return lambda s: s[part].__setitem__(key, np.zeros(shape, np.float32))


LEFTOVERS = {
    "even_to_k_ip": (_add("ip_adapter", "2.to_k_ip.weight", (64, 32)), r"not 1, 3, 5"),
    "lora_beyond_the_unet": (lambda s: [_add("ip_adapter", f"4.{n}_lora.{d}.weight", (4, 4))(s)
                                        for n in ("to_q", "to_k", "to_v", "to_out") for d in ("down", "up")],
                             r"incomplete LoRA.*0\.\.3.*attentions the UNet does not have: \['4\.to_k_lora\.down"),
    "lora_part_missing": (_drop("ip_adapter", "2.to_out_lora.up.weight"),
                          r"incomplete LoRA.*: missing \['2\.to_out_lora\.up\.weight'\]$"),
    "lora_other_name": (_add("ip_adapter", "1.to_x_lora.down.weight", (4, 32)), r"unexpected.*1\.to_x_lora"),
    "projection_extra": (_add("image_proj", "perceiver_resampler.latents", (1, 4, 32)),
                         r"unexpected keys.*perceiver_resampler\.latents"),
    "projection_missing": (_drop("image_proj", "norm.bias"), r"missing keys.*norm\.bias"),
    "lora_rank_mismatch": (_add("ip_adapter", "3.to_v_lora.up.weight", (64, 3)), r"3\.to_v_lora.*not a rank-r pair"),
}


@pytest.mark.parametrize("damage", sorted(LEFTOVERS))
def test_every_key_is_used_or_refused(damage, tmp_path):
    edit, pattern = LEFTOVERS[damage]
    state = _state("faceid_plus" if damage == "projection_extra" else "faceid")
    edit(state)
    path = tmp_path / "a.bin"
    _write(state, path)
    with pytest.raises(WeightFileError) as info:
        load_ip_adapter(path)
    assert re.search(pattern, str(info.value), re.S) and str(path) in str(info.value), str(info.value)


def test_without_lora_the_unet_program_is_unchanged(setups, monkeypatch):
    """No LoRA variables: the UNet lowers to exactly the program it lowers to with the LoRA call sites
    taken out (so plain/Plus adapters and the bare UNet compute bit for bit what they did before)."""
    setup = setups("sd15")
    ip = random_faceid_state(setup.attentions, 32, "faceid", seed=2, lora_rank=None, id_dim=ID_DIM)["ip_adapter"]
    layers = [{n: jnp.asarray(ip[f"{2 * i + 1}.{n}.weight"].T) for n in ("to_k_ip", "to_v_ip")}
              for i in range(len(setup.attentions) // 2)]
    args = (jnp.asarray(setup.x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(setup.t.numpy()),
            jnp.asarray(setup.text.numpy()), None)
    tokens = [jnp.ones((BATCH, 4, 32))]

    def lowered():
        variables = {"params": setup.params, **adapter_variables(setup.config, [layers], None, [None])}
        return jax.jit(lambda v: setup.module.apply(v, *args, image_tokens=tokens)).lower(variables).as_text()

    with_call_sites = lowered()
    for module in (attention, decoupled_cross_attention):
        monkeypatch.setattr(module, "add_lora", lambda m, name, x, y: y)
    assert lowered() == with_call_sites


def test_lora_that_does_not_fit_the_unet_is_refused(setups, tmp_path):
    setup = setups("sd15")
    _write(random_faceid_state(setup.attentions, 32, "faceid", seed=3, id_dim=ID_DIM), tmp_path / "a.safetensors")
    adapter = load_ip_adapter(tmp_path / "a.safetensors")
    check_adapter_fits(setup.config, adapter)
    adapter.params["lora"][3]["to_k"]["down"] = np.zeros((64, 4), np.float32)  # attn2 keys read the 32-wide text
    with pytest.raises(ValueError, match=r"LoRA down_blocks\.0\.attentions\.1\.transformer_blocks\.0\.attn2\.to_k: "
                                         r"down \(64, 4\), up \(4, 32\); the UNet needs down \[32, rank\]"):
        check_adapter_fits(setup.config, adapter)
    adapter.params["lora"] = adapter.params["lora"][:-2]
    with pytest.raises(ValueError, match="LoRA covers 10 attentions but the UNet has 12"):
        check_adapter_fits(setup.config, adapter)

