"""Numerical faults: a NaN/Inf loss or gradient skips the update (params and optimizer state unchanged, bit
for bit), is counted in the metrics, and ``optimizer.max_nonfinite_steps`` bad steps in a row stop the run
with a clear message and a checkpoint of the last good parameters.

Three levels: the guard itself on hand-made values (a gradient can overflow while the loss stays finite),
the compiled train step of the tiny world on poisoned batches, and a whole ``train.py`` run whose data
feed hands NaN pixels to chosen steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fault_support import metric_steps, output_of, restore_checkpoint, start_faulty_train
from train_support import adapter_arrays, finished_checkpoints, max_abs_diff, tiny_config, world  # noqa: F401
from ipadapter_jax.train import TrainConfig
from ipadapter_jax.train.data_feed import DataFeed, make_source
from ipadapter_jax.train.setup import batch_partition_spec, build_setup, step_batch_keys
from ipadapter_jax.train.sharding import put_host_tree, replicated_key
from ipadapter_jax.train.step import skip_nonfinite_update


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _identical(a, b) -> bool:
    return all(np.array_equal(x, y, equal_nan=True) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("loss, grad_norm, finite", [
    (0.5, 2.0, True), (np.nan, 2.0, False), (0.5, np.inf, False), (np.inf, np.nan, False), (0.5, -np.inf, False),
])
def test_the_guard_keeps_the_previous_state_unless_loss_and_gradient_are_finite(loss, grad_norm, finite):
    previous = ({"w": jnp.ones(3)}, {"mu": jnp.zeros(3), "count": jnp.asarray(4)})
    updated = ({"w": jnp.full(3, 2.0)}, {"mu": jnp.full(3, np.nan), "count": jnp.asarray(5)})
    params, opt_state, ok = jax.jit(skip_nonfinite_update)(jnp.asarray(loss), jnp.asarray(grad_norm), updated, previous)
    assert bool(ok) == finite
    assert _identical((params, opt_state), updated if finite else previous)


# -------------------------------------------------------------------------------------- compiled step
@pytest.fixture(scope="module")
def tiny_step(world, tmp_path_factory):
    """The tiny world's compiled step, a fresh state factory and one real batch."""
    config = TrainConfig.from_config_dict(tiny_config(world))
    setup = build_setup(config, tmp_path_factory.mktemp("numerical"))
    feed = DataFeed(make_source(config, setup.modules, setup.shards), setup.mesh, batch_partition_spec(setup),
                    step_batch_keys(setup), prefetch=0)
    batch = next(feed).batch
    feed.close()

    def fresh_state():
        init_rng, rng = jax.random.split(jax.random.key(config.seed))
        kv = put_host_tree(setup.kv, jax.tree.map(lambda _: setup.replicated, setup.kv))
        return setup.init_state(replicated_key(init_rng, setup.mesh), kv), replicated_key(rng, setup.mesh)

    return setup, fresh_state, batch


def _poisoned(batch: dict, key: str, value: float, rows=slice(0, 1)) -> dict:
    """``batch`` with ``value`` written into ``batch[key][rows]`` (one bad image is enough)."""
    x = np.array(jax.device_get(batch[key]))
    x[rows] = value
    return {**batch, key: jax.device_put(x, batch[key].sharding)}


@pytest.mark.parametrize("key, value", [("pixels", np.nan), ("pixels", np.inf), ("clip_pixels", np.nan),
                                        ("clip_pixels", -np.inf)])
def test_a_poisoned_batch_leaves_params_and_optimizer_state_unchanged(tiny_step, key, value):
    setup, fresh_state, batch = tiny_step
    state, rng = fresh_state()
    state, metrics = setup.compiled_step(state, setup.frozen, batch, rng)  # one good step: Adam has moments
    assert int(metrics["nonfinite"]) == 0 and np.isfinite(float(metrics["loss"]))
    before = _host((state.params, state.opt_state))

    state, metrics = setup.compiled_step(state, setup.frozen, _poisoned(batch, key, value), rng)
    assert int(metrics["nonfinite"]) == 1 and int(state.step) == 2
    assert not (np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"])))
    assert _identical(_host((state.params, state.opt_state)), before)

    state, metrics = setup.compiled_step(state, setup.frozen, batch, rng)  # and training goes on from there
    assert int(metrics["nonfinite"]) == 0
    after = _host(state.params)
    assert not _identical(after, before[0])
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(after))


# ---------------------------------------------------------------------------------------- whole run
# Replaces the pixels of the batches of the given steps (1-based, counted in this process) with NaN.
POISON_STEPS = """
import jax, jax.numpy as jnp
import ipadapter_jax.train.data_feed as data_feed
BAD, real_next, served = {steps}, data_feed.DataFeed.__next__, [0]
def poisoned_next(self):
    fed = real_next(self)
    served[0] += 1
    if served[0] in BAD:
        x = fed.batch["pixels"]
        fed = fed._replace(batch={{**fed.batch, "pixels": jax.device_put(jnp.full(x.shape, jnp.nan, x.dtype),
                                                                        x.sharding)}})
    return fed
data_feed.DataFeed.__next__ = poisoned_next
"""


def test_bad_steps_are_skipped_counted_and_too_many_in_a_row_stop_the_run(world, tmp_path):
    """NaN batches at steps 3 and 5 (skipped, counted, training goes on), then at 7, 8, 9: with
    ``max_nonfinite_steps=3`` the run stops at 9 with a checkpoint holding step 6's parameters."""
    workdir = tmp_path / "run"
    config = tiny_config(world, num_steps=12, checkpoint__every_steps=1, checkpoint__keep=20,
                         optimizer__max_nonfinite_steps=3)
    proc = start_faulty_train(world, config, workdir, patch=POISON_STEPS.format(steps={3, 5, 7, 8, 9}))
    assert proc.wait(600) != 0
    output = output_of(workdir)
    message = [line for line in output.splitlines() if "NonFiniteLossError:" in line]
    assert message, output[-3000:]
    assert ("stopped at step 9: 3 consecutive steps (7..9) had a non-finite loss or gradient" in message[-1]
            and "the checkpoint at step 9 holds the parameters of step 6" in message[-1]), message[-1]

    records = {r["step"]: r for r in metric_steps(workdir)}
    assert sorted(records) == list(range(1, 10))
    bad = [s for s, r in records.items() if r["nonfinite_steps"]]
    assert bad == [3, 5, 7, 8, 9] and all(records[s]["nonfinite_steps"] == 1 for s in bad)
    assert all(np.isfinite(records[s]["loss"]) for s in records if s not in bad)
    assert not any(np.isfinite(records[s]["loss"]) for s in bad)

    assert finished_checkpoints(workdir) == list(range(1, 10))
    saved = {s: restore_checkpoint(workdir, s) for s in range(1, 10)}
    same = lambda a, b: _identical((saved[a]["adapter"], saved[a]["opt_state"]),  # noqa: E731
                                   (saved[b]["adapter"], saved[b]["opt_state"]))
    assert same(2, 3) and same(4, 5) and same(6, 7) and same(6, 8) and same(6, 9)  # skipped steps
    assert not same(3, 4) and not same(5, 6) and not same(1, 2)  # good steps update
    for s in saved:
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved[s]["adapter"]))
    assert max_abs_diff(adapter_arrays(workdir / "ip_adapter.safetensors"),
                        adapter_arrays(workdir / "adapters" / "ip_adapter_00000006.safetensors")) == 0.0
