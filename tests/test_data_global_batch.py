"""make_global_batch on CPU: one device in-process, four forced host devices in a subprocess."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ipadapter_jax.data.global_batch import make_global_batch


def _local_batch(n=4):
    rng = np.random.default_rng(0)
    return {
        "pixels": rng.standard_normal((n, 8, 8, 3)).astype(np.float32),
        "input_ids": rng.integers(0, 100, (n, 77)).astype(np.int32),
        "drop_image": np.array([True, False] * (n // 2)),
        "caption": [f"c{i}" for i in range(n)],
        "counters": {"used": n},
    }


def test_single_device_values_and_passthrough():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    local = _local_batch()
    global_batch = make_global_batch(local, mesh, PartitionSpec("data"))
    for key in ("pixels", "input_ids", "drop_image"):
        assert isinstance(global_batch[key], jax.Array)
        assert global_batch[key].dtype == local[key].dtype
        np.testing.assert_array_equal(np.asarray(global_batch[key]), local[key])
    assert global_batch["caption"] == local["caption"] and global_batch["counters"] == {"used": 4}


_FOUR_DEVICES = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from ipadapter_jax.data.global_batch import make_global_batch
    assert jax.device_count() == 4, jax.devices()
    local = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "ids": np.arange(8, dtype=np.int32)}

    mesh = Mesh(np.array(jax.devices()), ("data",))
    out = make_global_batch(local, mesh, P("data"))
    assert out["x"].shape == (8, 3)
    shards = sorted(out["x"].addressable_shards, key=lambda s: s.index[0].start)
    assert [s.data.shape for s in shards] == [(2, 3)] * 4
    for i, s in enumerate(shards):
        np.testing.assert_array_equal(np.asarray(s.data), local["x"][2 * i : 2 * i + 2])
    np.testing.assert_array_equal(np.asarray(out["ids"]), local["ids"])

    # 2 x 2 mesh: batch over "data", replicated over "model"; default spec = all axes.
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    out2 = make_global_batch(local, mesh2, {"x": P("data")})
    assert [s.data.shape for s in out2["x"].addressable_shards] == [(4, 3)] * 4
    assert [s.data.shape for s in out2["ids"].addressable_shards] == [(2,)] * 4
    np.testing.assert_array_equal(np.asarray(out2["x"]), local["x"])
    np.testing.assert_array_equal(np.asarray(out2["ids"]), local["ids"])
    print("OK")
    """
)


def test_four_host_devices_in_a_subprocess():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _FOUR_DEVICES], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")
