"""The train step ``train.py`` compiles and the one ``tpu_plan`` compiles are one program.

In a subprocess with 8 simulated CPU devices and the shipped tiny config on a ``data x fsdp = 4 x 2`` mesh,
for XLA attention and for the Pallas kernels in interpret mode: ``train.setup.build_setup`` (what the loop
runs) and ``plan.planner.plan(..., topology="cpu-8")`` (what the plan CLI compiles) give identical
StableHLO text for the lowered step and identical compiled HLO (source locations aside); with Pallas the lowered step runs the kernels
per device in a ``shard_map`` (as on a TPU slice). Any second construction of the step on either side (its
own optimizer, shardings, donation, or tracing outside the mesh) changes the text and fails this test.
"""

from __future__ import annotations

import textwrap

import pytest

from device_support import run_on_simulated_devices


SCRIPT = textwrap.dedent('''
    import hashlib, importlib.util, json, re, sys
    from pathlib import Path
    import jax
    from ipadapter_jax.models import pallas_attention
    from ipadapter_jax.plan.planner import plan
    from ipadapter_jax.train.config import TrainConfig
    from ipadapter_jax.train.setup import build_setup

    assert jax.device_count() == 8, jax.devices()
    # The toy base's attention sees at most 64 keys; let every attention take the kernels so the Pallas
    # program differs from the XLA one everywhere it can.
    pallas_attention.MIN_KV_TOKENS = 1
    spec = importlib.util.spec_from_file_location("tiny", "configs/tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    out_dir = Path(sys.argv[1])

    def without_debug_info(hlo):
        # Compiled HLO text carries the Python source locations of each op (which differ: the two paths are
        # called from different files); the computations themselves must be equal.
        blocks = [b for b in hlo.split("\\n\\n") if b.split("\\n", 1)[0].strip() not in
                  ("FileNames", "FunctionNames", "FileLocations", "StackFrames")]
        return re.sub(r", metadata=\\{[^{}]*\\}", "", "\\n\\n".join(blocks))

    result = {}
    for attention in ("xla", "pallas_interpret"):
        c = tiny.get_config()
        c.mesh.data, c.mesh.fsdp = -1, 2
        c.model.attention_implementation = attention
        c.validation.every_steps = 0
        config = TrainConfig.from_config_dict(c)
        setup = build_setup(config, out_dir / attention)
        trainer_lowered = setup.program.lower().as_text()
        trainer_compiled = without_debug_info(setup.compiled_step.as_text())
        hlo = out_dir / f"{attention}_plan.hlo"
        _, program = plan(config, "cpu-8", "train", "online", with_model_flops=False, log=lambda line: None,
                          hlo_path=str(hlo))
        plan_lowered = program.lower().as_text()
        plan_compiled = without_debug_info(hlo.read_text())
        for name, text in (("trainer_lowered", trainer_lowered), ("plan_lowered", plan_lowered),
                           ("trainer_compiled", trainer_compiled), ("plan_compiled", plan_compiled)):
            (out_dir / f"{attention}_{name}.txt").write_text(text)
        digest = lambda text: hashlib.sha256(text.encode()).hexdigest()
        result[attention] = {
            "mesh": dict(setup.mesh.shape), "plan_mesh": program.mesh_shape,
            "lowered": [digest(trainer_lowered), digest(plan_lowered)],
            "compiled": [digest(trainer_compiled), digest(plan_compiled)],
            "shard_map": ["sdy.manual_computation" in t or "shard_map" in t for t in (trainer_lowered, plan_lowered)],
            "donated": "tf.aliasing_output" in trainer_lowered or "jax.buffer_donor" in trainer_lowered,
        }
    print("RESULT " + json.dumps(result))
''')


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_program")
    return run_on_simulated_devices(SCRIPT, folder, timeout=1500), folder


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["xla", "pallas_interpret"])
def test_trainer_and_plan_compile_the_same_step(both_paths, attention):
    result, folder = both_paths
    r = result[attention]
    assert r["mesh"] == {"data": 4, "fsdp": 2} and r["plan_mesh"] == {"data": 4, "fsdp": 2}
    if r["lowered"][0] != r["lowered"][1]:
        import difflib

        a, b = ((folder / f"{attention}_{n}.txt").read_text().splitlines() for n in ("trainer_lowered", "plan_lowered"))
        diff = "\n".join(list(difflib.unified_diff(a, b, "train.py", "tpu_plan", lineterm="", n=1))[:60])
        pytest.fail(f"the trainer's and the plan's lowered steps differ:\n{diff}")
    assert r["compiled"][0] == r["compiled"][1]
    assert r["donated"]  # the state is donated, as the plan's memory figures assume


@pytest.mark.slow
def test_pallas_step_runs_the_kernels_per_device(both_paths):
    result, _ = both_paths
    assert result["pallas_interpret"]["shard_map"] == [True, True]
    assert result["xla"]["shard_map"] == [False, False]
    assert result["xla"]["lowered"][0] != result["pallas_interpret"]["lowered"][0]
