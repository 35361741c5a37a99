"""Noise predictions of our UNet + IP-Adapters against diffusers' (PyTorch, CPU, fp32).

Metric: max |ours - diffusers| over all output elements, <= 1e-4. Adapter weights enter diffusers through its
own loader (``UNet2DConditionModel._load_ip_adapter_weights``) and ours through ``load_ip_adapter`` from the
same published-layout file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import TINY_UNETS
from ipadapter_jax.testing.random_weights import (random_ip_adapter_state, torch_cross_attention_widths,
                                                  write_ip_adapter_state)
from ipadapter_jax import load_ip_adapter
from ipadapter_jax.models.adapter import adapter_variables
from ipadapter_jax.models.ip_scales import resolve_ip_scales
from ipadapter_jax.weights.load_unet import load_unet

TOL = 1e-4
BATCH = 2
# bf16 UNet + adapter vs fp32: max |bf16 - fp32| / max |fp32| (measured ~1.0e-2 on SD1.5, ~1.2e-2 on SDXL).
BF16_REL_TOL = 2e-2

# Per-block scales written both ways: diffusers' block dict, and our module-prefix form of the same thing.
BLOCK_SCALES = {
    "sd15": ({"up": {"block_1": [0.0, 1.0, 0.0]}}, {"up_blocks.1.attentions.1": 1.0}),
    "sdxl": ({"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
             {"down_blocks.2.attentions.1": 1.0, "up_blocks.0.attentions.1": 1.0}),
}


class Setup:
    """The torch UNet and ours, on the same weights and inputs."""

    def __init__(self, name, folder):
        from diffusers import UNet2DConditionModel

        self.name = name
        self.folder = folder
        self.torch_unet = UNet2DConditionModel.from_pretrained(folder).eval()
        self.module, self.params, self.config = load_unet(folder)
        gen = torch.Generator().manual_seed(0)
        cross = TINY_UNETS[name]["cross_attention_dim"]
        self.x = torch.randn(BATCH, 4, 16, 16, generator=gen)
        self.t = torch.tensor([3, 700])
        self.text = torch.randn(BATCH, 7, cross, generator=gen)
        self.torch_added, self.added = {}, None
        if name == "sdxl":
            text_embeds = torch.randn(BATCH, 16, generator=gen)
            time_ids = torch.tensor([[128.0, 128, 0, 0, 128, 128], [96, 160, 8, 0, 128, 128]])
            self.torch_added = {"text_embeds": text_embeds, "time_ids": time_ids}
            self.added = {k: jnp.asarray(v.numpy()) for k, v in self.torch_added.items()}
        self.widths = torch_cross_attention_widths(self.torch_unet)
        self.cross = cross
        self._compiled = {}

    def features(self, variant, seed):
        gen = torch.Generator().manual_seed(100 + seed)
        return torch.randn(BATCH, 16, generator=gen) if variant == "plain" else torch.randn(BATCH, 5, 16, generator=gen)

    def run_torch(self, states, features, scale):
        tensors = [{part: {k: torch.from_numpy(v) for k, v in s[part].items()} for part in s} for s in states]
        self.torch_unet._load_ip_adapter_weights(tensors)
        _set_torch_scale(self.torch_unet, scale)
        added = dict(self.torch_added, image_embeds=[f.unsqueeze(1) for f in features])
        with torch.no_grad():
            return self.torch_unet(self.x, self.t, self.text, added_cond_kwargs=added).sample.numpy()

    def run_ours(self, adapters, features, scale, unet=None):
        """Our noise prediction (NCHW, float32); ``unet``: ``(module, params)`` instead of the fp32 ones."""
        module, params = unet or (self.module, self.params)
        key = (tuple(a.variant for a in adapters), module.dtype)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(functools.partial(self.forward, module, adapters))
        scales = resolve_ip_scales(self.config, scale, len(adapters))
        out = self._compiled[key](params, [a.params for a in adapters], scales, *self.inputs(features))
        return np.asarray(out, np.float32).transpose(0, 3, 1, 2)

    def forward(self, module, adapters, params, adapter_params, scales, feats, x, t, text, added):
        tokens = [a.project(f, p) for a, p, f in zip(adapters, adapter_params, feats)]
        variables = {"params": params, **adapter_variables(self.config, [p["layers"] for p in adapter_params], scales)}
        return module.apply(variables, x, t, text, added, image_tokens=tokens)

    def inputs(self, features):
        return ([jnp.asarray(f.numpy()) for f in features], jnp.asarray(self.x.numpy().transpose(0, 2, 3, 1)),
                jnp.asarray(self.t.numpy()), jnp.asarray(self.text.numpy()), self.added)


def _set_torch_scale(unet, scale):
    """diffusers' ``set_ip_adapter_scale`` lives on pipelines; this is the same logic on a bare UNet."""
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    class _Holder(IPAdapterMixin):
        pass

    holder = _Holder()
    holder.unet = unet
    holder.set_ip_adapter_scale(scale)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def setup(request, tiny_unet_dirs):
    return Setup(request.param, tiny_unet_dirs[request.param])


@pytest.mark.parametrize("variants", [("plain",), ("plus",), ("plain", "plus")], ids="+".join)
def test_noise_prediction_matches_diffusers(setup, variants, tmp_path):
    _check_against_diffusers(setup, variants, tmp_path)


@pytest.mark.parametrize("setup", ["sd15"], indirect=True)
def test_full_face_noise_prediction_matches_diffusers(setup, tmp_path):
    """h94's ``ip-adapter-full-face_sd15`` layout (``MLPProjModel`` over every penultimate hidden state; it was
    published for SD1.5 only), read by diffusers as ``IPAdapterFullImageProjection``."""
    adapters, features = _check_against_diffusers(setup, ("full",), tmp_path)
    # The tokens themselves too: a subtle change (tanh-approximate GELU) moves them by ~1e-3 but the noise
    # prediction by only ~1e-5, inside the UNet tolerance.
    theirs = setup.torch_unet.encoder_hid_proj.image_projection_layers[0]
    assert type(theirs).__name__ == "IPAdapterFullImageProjection"
    with torch.no_grad():
        ref = theirs(features[0]).numpy()
    ours = np.asarray(adapters[0].project(jnp.asarray(features[0].numpy())))
    assert ours.shape == ref.shape == (BATCH, features[0].shape[1], setup.cross)
    assert np.abs(ours - ref).max() <= 1e-5, np.abs(ours - ref).max()


def _check_against_diffusers(setup, variants, tmp_path):
    """Random adapters of ``variants`` through diffusers' loader and ours, compared at several scales;
    returns our adapters and the image features used."""
    states, adapters, features = [], [], []
    for seed, variant in enumerate(variants):
        state = random_ip_adapter_state(setup.widths, setup.cross, variant, seed=seed)
        path = tmp_path / f"adapter_{seed}.safetensors"
        write_ip_adapter_state(state, path)
        adapter = load_ip_adapter(path)
        assert adapter.variant == variant
        states.append(state)
        adapters.append(adapter)
        features.append(setup.features(variant, seed))

    block_dict, prefix_dict = BLOCK_SCALES[setup.name]
    cases = [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (block_dict, prefix_dict), (block_dict, block_dict)]
    if len(variants) == 2:
        cases += [([0.5, 1.0], [0.5, 1.0]), ([block_dict, 0.7], [prefix_dict, 0.7])]
    outputs = {}
    for torch_scale, our_scale in cases:
        if len(variants) > 1 and not isinstance(torch_scale, list):
            torch_scale = [torch_scale] * len(variants)  # diffusers wants one per adapter; we broadcast one
        ref = setup.run_torch(states, features, torch_scale)
        ours = setup.run_ours(adapters, features, our_scale)
        err = np.abs(ours - ref).max()
        assert err <= TOL, f"{setup.name} {variants} scale={our_scale}: max abs diff {err:.2e}"
        outputs[repr(our_scale)] = ours
    # The image prompt must actually change the prediction, or the comparison above proves little.
    assert np.abs(outputs["1.0"] - outputs["0.0"]).max() > 1e-2
    return adapters, features


def test_bfloat16_forward_stays_near_float32(setup, tmp_path):
    """The UNet and its adapter branch in bf16 (``load_unet(dtype=bfloat16)``, as on TPU; the projection net
    in fp32, as ``generate`` runs it) against fp32 at ip_scale 0.7, within ``BF16_REL_TOL``."""
    write_ip_adapter_state(random_ip_adapter_state(setup.widths, setup.cross, "plain", seed=5), tmp_path / "a.safetensors")
    adapter = load_ip_adapter(tmp_path / "a.safetensors")
    features = [setup.features("plain", 5)]
    module, params, _ = load_unet(setup.folder, jnp.bfloat16)
    fp32 = {scale: setup.run_ours([adapter], features, scale) for scale in (0.0, 0.7, 1.0)}
    size = np.abs(fp32[0.7]).max()
    err = np.abs(setup.run_ours([adapter], features, 0.7, unet=(module, params)) - fp32[0.7]).max() / size
    assert err <= BF16_REL_TOL, f"{setup.name}: bf16 vs fp32 relative error {err:.2e}"
    # The bound tells apart a dropped scale (0 or 1 instead of 0.7): those land more than twice as far off.
    for wrong in (0.0, 1.0):
        assert np.abs(fp32[wrong] - fp32[0.7]).max() / size > 2 * BF16_REL_TOL, wrong
    # And the bf16 forward really computes in bf16, the image branch included: every matmul and convolution
    # takes bf16 operands (a branch cast back to fp32 would show here, not in the error above).
    tokens = [adapter.project(jnp.asarray(features[0].numpy()))]
    feats, x, t, text, added = setup.inputs(features)
    variables = {"params": params, **adapter_variables(setup.config, [adapter.params["layers"]],
                                                       resolve_ip_scales(setup.config, 0.7, 1))}
    jaxpr = jax.make_jaxpr(lambda v, tok: module.apply(v, x, t, text, added, image_tokens=tok))(variables, tokens)
    operands = _matmul_operand_dtypes(jaxpr.jaxpr)
    assert len(operands) > 50 and set(operands) == {jnp.dtype(jnp.bfloat16)}, sorted(set(map(str, operands)))


def _matmul_operand_dtypes(jaxpr) -> list:
    """Operand dtypes of every dot_general and conv_general_dilated in a jaxpr and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found += [v.aval.dtype for v in eqn.invars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _matmul_operand_dtypes(inner)
    return found


def test_scale_zero_and_no_tokens_give_the_base_unet(setup, tmp_path):
    state = random_ip_adapter_state(setup.widths, setup.cross, "plain", seed=3)
    write_ip_adapter_state(state, tmp_path / "a.safetensors")
    adapter = load_ip_adapter(tmp_path / "a.safetensors")
    features = [setup.features("plain", 3)]
    base = setup.module.apply({"params": setup.params}, jnp.asarray(setup.x.numpy().transpose(0, 2, 3, 1)),
                              jnp.asarray(setup.t.numpy()), jnp.asarray(setup.text.numpy()), setup.added)
    base = np.asarray(base).transpose(0, 3, 1, 2)
    with torch.no_grad():
        setup.torch_unet.set_default_attn_processor()
        setup.torch_unet.encoder_hid_proj = None
        setup.torch_unet.config.encoder_hid_dim_type = None
        ref = setup.torch_unet(setup.x, setup.t, setup.text, added_cond_kwargs=setup.torch_added).sample.numpy()
    assert np.abs(base - ref).max() <= TOL
    at_zero = setup.run_ours([adapter], features, 0.0)
    np.testing.assert_allclose(at_zero, base, rtol=0, atol=1e-6)
