"""One device against eight simulated CPU devices (``--xla_force_host_platform_device_count=8``, a data=4 x
fsdp=2 mesh with the weights really split): the same losses and adapter within float tolerance, and a
checkpoint written on either restores and continues on the other.

Metrics: max |loss_8 - loss_1| over logged steps <= 1e-5 (relative to losses ~0.5; measured ~1e-7); max abs
difference of the adapter params <= 5e-5, 2.5% of one step's largest AdamW update at the tiny config's lr 2e-3
(reductions run in another order on 8 devices, nothing else differs; Adam divides each gradient by its own
running RMS, so a parameter whose gradient is near float noise moves by up to lr in either order: measured
1.8e-5 after 4 steps)."""

from __future__ import annotations

import re

import jax
import pytest

from train_support import (adapter_arrays, finished_checkpoints, log_of, max_abs_diff, run_train, tiny_config,
                           world)  # noqa: F401
from ipadapter_jax.train import main
from ipadapter_jax.train.metrics_log import read_metrics

LOSS_TOL = 1e-5
PARAM_TOL = 5e-5
EIGHT = dict(mesh__data=4, mesh__fsdp=2, mesh__fsdp_min_size=64)


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


@pytest.fixture(scope="module")
def one_device_run(world, tmp_path_factory):
    assert jax.device_count() == 1
    workdir = tmp_path_factory.mktemp("one_device")
    main(tiny_config(world, num_steps=4, checkpoint__every_steps=2), workdir)
    return workdir


def test_eight_devices_give_the_same_losses_and_adapter(world, one_device_run, tmp_path):
    run_train(world, tiny_config(world, num_steps=4, checkpoint__every_steps=2, **EIGHT), tmp_path / "eight",
              devices=8)
    assert re.search(r"frozen weights: [\d.]+ MiB, (9\d|100)% of it split over fsdp", log_of(tmp_path / "eight"))
    one, eight = _losses(one_device_run), _losses(tmp_path / "eight")
    assert sorted(one) == sorted(eight) == [1, 2, 3, 4]
    loss_diff = max(abs(one[s] - eight[s]) for s in one)
    param_diff = max_abs_diff(adapter_arrays(one_device_run / "ip_adapter.safetensors"),
                              adapter_arrays(tmp_path / "eight" / "ip_adapter.safetensors"))
    print(f"1 vs 8 devices: max loss diff {loss_diff:.2e}, max adapter diff {param_diff:.2e}")
    assert loss_diff <= LOSS_TOL and param_diff <= PARAM_TOL


def test_checkpoint_from_eight_devices_resumes_on_one(world, one_device_run, tmp_path):
    workdir = tmp_path / "moved"
    run_train(world, tiny_config(world, num_steps=2, checkpoint__every_steps=2, **EIGHT), workdir, devices=8)
    assert finished_checkpoints(workdir) == [2]
    result = main(tiny_config(world, num_steps=4, checkpoint__every_steps=2), workdir)
    assert result.resumed_from == 2 and result.step == 4
    diff = max_abs_diff(adapter_arrays(workdir / "ip_adapter.safetensors"),
                        adapter_arrays(one_device_run / "ip_adapter.safetensors"))
    assert diff <= PARAM_TOL, diff
    assert max(abs(a - b) for a, b in zip(_losses(workdir).values(), _losses(one_device_run).values())) <= LOSS_TOL


def test_checkpoint_from_one_device_resumes_on_eight(world, one_device_run, tmp_path):
    workdir = tmp_path / "moved"
    main(tiny_config(world, num_steps=2, checkpoint__every_steps=2), workdir)
    run_train(world, tiny_config(world, num_steps=4, checkpoint__every_steps=2, **EIGHT), workdir, devices=8)
    assert finished_checkpoints(workdir) == [2, 4]
    diff = max_abs_diff(adapter_arrays(workdir / "ip_adapter.safetensors"),
                        adapter_arrays(one_device_run / "ip_adapter.safetensors"))
    assert diff <= PARAM_TOL, diff
