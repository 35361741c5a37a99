"""``IPAdapterPipeline`` on 1, 2 and 8 simulated CPU devices (a subprocess with
``--xla_force_host_platform_device_count=8``): the same pixels (<= 3e-5 fp32) for batches 1, 3 and 8, the
compiled loop's noise input split over the mesh's ``data`` axis (read from the compiled executable), batches
that do not divide over the devices padded and cut, ``num_images_per_prompt`` in diffusers' order, and the
weights split over ``fsdp`` giving the same pixels. The shipped toy base and adapter are the model."""

from __future__ import annotations

import textwrap

import pytest

from device_support import run_on_simulated_devices

# Float rounding, not sharding: XLA:CPU blocks its kernels by the per-device batch, so the reduction order (and
# the last bits) follow the batch each device sees. On one device, images 0-3 of a batch of 8 differ from the
# same 4 images alone by 5.5e-6; 2 devices x batch 8 vs 1 device differ by 1.6e-5 (Intel Sapphire Rapids,
# jax 0.10.2). A wrong split (a shuffled, dropped or duplicated image) moves pixels by > 1e-2.
PIXEL_TOL = 3e-5

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from PIL import Image
    from ipadapter_jax import toy_assets
    from ipadapter_jax.pipeline import IPAdapterPipeline
    from ipadapter_jax.pipeline.denoise import generate

    assert jax.device_count() == 8, jax.devices()
    paths = toy_assets.default_sampling_paths()
    image = Image.open(paths["image"][0]).convert("RGB")
    settings = dict(ip_adapter_image=image, ip_scale=0.7, num_inference_steps=3, guidance_scale=3.0, seed=1)
    out = {"pixels": {}, "specs": {}, "mesh": {}}
    for n, fsdp in ((1, 1), (2, 1), (8, 1), (8, 2)):
        pipe = IPAdapterPipeline.from_pretrained(paths["model"], ip_adapter=paths["ip_adapter"],
                                                 devices=jax.devices()[:n], fsdp=fsdp)
        name = f"{n}x{fsdp}"
        out["mesh"][name] = dict(pipe.mesh.shape)
        for batch in (1, 3, 8):
            images = pipe([f"shape {i}" for i in range(batch)], **settings)
            np.save(f"{sys.argv[1]}/{name}_{batch}.npy", images)
            args, true_batch = pipe.generate_args([f"shape {i}" for i in range(batch)], **settings)
            noise_sharding = generate.lower(*args).compile().input_shardings[0][5]  # generate(..., scales, sampler, noise, ...)
            out["specs"][f"{name}_{batch}"] = [str(noise_sharding.spec), dict(noise_sharding.mesh.shape),
                                               int(args[10].shape[0]), true_batch]
        if name == "2x1":
            twice = pipe(["shape 0", "shape 1"], num_images_per_prompt=2, **settings)
            np.save(f"{sys.argv[1]}/per_prompt.npy", twice)
            spelt = pipe(["shape 0", "shape 0", "shape 1", "shape 1"], **settings)
            np.save(f"{sys.argv[1]}/per_prompt_spelt.npy", spelt)
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("devices")
    return folder, run_on_simulated_devices(SCRIPT, folder)


def _load(folder, name):
    import numpy as np

    return np.load(folder / f"{name}.npy")


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("mesh", ["2x1", "8x1", "8x2"])
def test_same_pixels_on_every_mesh(eight_device_run, mesh, batch):
    import numpy as np

    folder, _ = eight_device_run
    one, many = _load(folder, f"1x1_{batch}"), _load(folder, f"{mesh}_{batch}")
    assert many.shape == one.shape == (batch, 32, 32, 3)
    assert float(np.abs(many - one).max()) <= PIXEL_TOL
    assert float(one.std()) > 0.01  # real pictures, not a constant


@pytest.mark.parametrize("mesh,devices", [("1x1", 1), ("2x1", 2), ("8x1", 8), ("8x2", 8)])
def test_compiled_loop_splits_the_batch_over_the_mesh(eight_device_run, mesh, devices):
    _, result = eight_device_run
    data = devices // (2 if mesh.endswith("x2") else 1)
    assert result["mesh"][mesh] == {"data": data, "fsdp": devices // data}
    for batch in (1, 3, 8):
        spec, mesh_shape, padded, true_batch = result["specs"][f"{mesh}_{batch}"]
        if devices > 1:  # on one device XLA reports the trivial P()
            assert "data" in spec.split(",")[0], spec  # the noise's leading (batch) axis is split over data
        assert mesh_shape == {"data": data, "fsdp": devices // data}
        assert padded % devices == 0 and padded >= batch and padded - batch < devices
        assert true_batch == batch


def test_num_images_per_prompt_keeps_each_prompts_images_together(eight_device_run):
    import numpy as np

    folder, _ = eight_device_run
    twice = _load(folder, "per_prompt")
    assert twice.shape == (4, 32, 32, 3)
    assert float(np.abs(twice - _load(folder, "per_prompt_spelt")).max()) <= PIXEL_TOL
    # Images 0, 1 share the prompt "shape 0" and differ only by noise; 2, 3 share "shape 1".
    assert not np.allclose(twice[0], twice[1])
