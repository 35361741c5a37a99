"""Every CLI reports a user mistake as one line, ``<tool>: error: <message>``, exit code 2, with no traceback;
``--debug`` (or IPADAPTER_JAX_DEBUG=1) brings the traceback back. The table's cases all fail before a model
is compiled (the sample.py ones before the base model's weights are read: an adapter that does not fit is
checked against the base's unet/config.json), so each row costs about one interpreter start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "ipadapter_jax" / "assets" / "toy"
SAMPLE = [str(REPO / "sample.py")]
TRAIN = [str(REPO / "train.py"), "--workdir", "run"]
MAKE_SHARDS = ["-m", "ipadapter_jax.data.make_shards"]
EVALUATE = ["-m", "ipadapter_jax.evaluate"]
CACHE_LATENTS = ["-m", "ipadapter_jax.cache"]
TPU_PLAN = ["-m", "ipadapter_jax.plan"]
SD15 = f"--config={REPO / 'configs' / 'sd15.py'}"
TINY = f"--config={REPO / 'configs' / 'tiny.py'}"

# name -> (command after the interpreter, tool name in the error line, exit code, text the line contains).
# Paths are relative to the test's scratch folder, which the fixture fills with the files named here.
CASES = {
    "sample_missing_image": (SAMPLE + ["--image", "missing.png"], "sample.py", 2, "missing.png: no such file"),
    "sample_image_not_an_image": (SAMPLE + ["--image", "not_an_image.png"], "sample.py", 2, "not an image"),
    "sample_missing_model": (SAMPLE + ["--model", "no_model"], "sample.py", 2, "--model no_model: no such folder"),
    "sample_missing_adapter": (SAMPLE + ["--ip-adapter", "missing.safetensors"], "sample.py", 2, "no such file"),
    "sample_missing_image_encoder": (SAMPLE + ["--image-encoder", "no_encoder"], "sample.py", 2, "no such folder"),
    "sample_zero_images": (SAMPLE + ["--num-images", "0"], "sample.py", 2, "--num-images=0 must be at least 1"),
    "sample_negative_steps": (SAMPLE + ["--steps", "-3"], "sample.py", 2, "--steps=-3 must be at least 1"),
    "sample_tiny_height": (SAMPLE + ["--height", "4"], "sample.py", 2, "--height=4"),
    "sample_misspelt_flag": (SAMPLE + ["--sacle", "0.6"], "sample.py", 2, "unrecognized arguments"),
    "sample_missing_face_embeds": (SAMPLE + ["--face-embeds", "face.npy,missing.npy"], "sample.py", 2,
                                   "--face-embeds missing.npy: no such file"),
    "sample_garbled_face_embeds": (SAMPLE + ["--face-embeds", "garbled.npy"], "sample.py", 2,
                                   "--face-embeds garbled.npy: not a .npy array numpy can read"),
    # Cross-attention widths of another base (as an SDXL adapter has on SD1.5): read from the adapter file.
    "sample_adapter_of_another_base": (SAMPLE + ["--ip-adapter", "wide_adapter.safetensors"], "sample.py", 2,
                                       "the UNet needs"),
    "train_shard_braces_matching_nothing": (TRAIN + ["--config.data.shards=/nonexistent/{0..3}.tar"], "train.py",
                                            2, "none of the 4 local shard(s) exists"),
    "train_shard_glob_matching_nothing": (TRAIN + ["--config.data.shards=/nonexistent/*.tar"], "train.py", 2,
                                          "matched no files"),
    "train_unknown_config_key": (TRAIN + ["--config.optimizer.learnig_rate=0.1"], "train.py", 2,
                                 'Did you mean "learning_rate"'),
    "train_bad_config_value": (TRAIN + ["--config.batch_size=-8"], "train.py", 2, "batch_size=-8 must be positive"),
    "train_negative_learning_rate": (TRAIN + ["--config.optimizer.learning_rate=-0.1"], "train.py", 2,
                                     "must not be negative"),
    "train_missing_config_file": (TRAIN + ["--config=no_such_config.py"], "train.py", 2, "no_such_config.py"),
    "train_unknown_flag": (TRAIN + ["--bogus"], "train.py", 2, "bogus"),
    "make_shards_missing_images_folder": (MAKE_SHARDS + ["--images", "no_photos", "--out", "shards"],
                                          "python -m ipadapter_jax.data.make_shards", 2, "no such folder"),
    "make_shards_no_out": (MAKE_SHARDS + ["--images", "photos"], "python -m ipadapter_jax.data.make_shards", 2,
                           "--out"),
    "evaluate_model_without_adapter": (EVALUATE + ["--model", "no_model"], "python -m ipadapter_jax.evaluate", 2,
                                       "--ip-adapter FILE is required"),
    "cache_latents_without_flags": (CACHE_LATENTS, "python -m ipadapter_jax.cache", 2,
                                    "--config must have a value"),
    "tpu_plan_without_config": (TPU_PLAN, "python -m ipadapter_jax.plan", 2, "--config is required"),
    "tpu_plan_missing_config_file": (TPU_PLAN + ["--config=no_such_config.py"],
                                     "python -m ipadapter_jax.plan", 2, "no_such_config.py"),
    "tpu_plan_unknown_config_key": (TPU_PLAN + [SD15, "--config.model.atention_implementation=xla"],
                                    "python -m ipadapter_jax.plan", 2, "Did you mean"),
    "tpu_plan_bad_attention": (TPU_PLAN + [SD15, "--config.model.attention_implementation=flash", "--topology=cpu-1"],
                               "python -m ipadapter_jax.plan", 2, "is not one of"),
    "cache_latents_unknown_config_key": (CACHE_LATENTS + [TINY, "--out=cache", "--config.data.resolutoin=64"],
                                         "python -m ipadapter_jax.cache", 2, "Did you mean"),
    # A live run's lease (this test process's pid, on this host, a fresh heartbeat): refused before loading.
    "train_workdir_in_use": (TRAIN + ["--workdir", "busy_run"], "train.py", 2, "in use by another run"),
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    from safetensors.numpy import load_file, save_file

    import json
    import socket
    import time

    from ipadapter_jax.train.workdir_lease import LEASE_NAME

    root = tmp_path_factory.mktemp("cli_errors")
    (root / "busy_run").mkdir()
    (root / "busy_run" / LEASE_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "run": "live", "since": "now",
         "heartbeat": time.time() + 3600}))
    (root / "not_an_image.png").write_text("these bytes are no PNG\n")
    np.save(root / "face.npy", np.ones(512, np.float32))
    (root / "garbled.npy").write_bytes(b"\x93NUMPY but not really")
    (root / "photos").mkdir()
    tensors = load_file(str(TOY / "ip_adapter.safetensors"))
    # Twice the input width of every ip_adapter projection: an adapter made for another base's text width.
    save_file({k: np.concatenate([v, v], -1) if k.startswith("ip_adapter.") and v.ndim == 2 else v
               for k, v in tensors.items()}, str(root / "wide_adapter.safetensors"))
    return root


def _run(args, cwd, **env):
    environ = {k: v for k, v in os.environ.items() if k != "IPADAPTER_JAX_DEBUG"}  # only a row's own asks
    environ.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_mistake_is_one_line_and_exit_2(case, scratch):
    args, tool, code, text = CASES[case]
    proc = _run(args, scratch)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith(f"{tool}: error:"), proc.stderr[-3000:]
    assert text in lines[-1], lines[-1]


# The CLIs' names before they moved, kept for one release: they run the new command and say so.
OLD_NAMES = {"ipadapter_jax.tools.make_shards": (MAKE_SHARDS, ["--images", "no_photos", "--out", "shards"]),
             "ipadapter_jax.tools.cache_latents": (CACHE_LATENTS, []),
             "ipadapter_jax.tools.tpu_plan": (TPU_PLAN, [])}


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_cli_names_run_the_new_commands(old, scratch):
    new, args = OLD_NAMES[old]
    moved = _run(["-m", old] + args, scratch)
    current = _run(new + args, scratch)
    assert moved.returncode == current.returncode == 2, moved.stderr[-3000:]
    assert moved.stderr.splitlines()[-1] == current.stderr.splitlines()[-1]  # the same one-line error
    assert f"python -m {old} is now python -m {new[1]}" in moved.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how, scratch):
    args = SAMPLE + ["--image", "missing.png"] + (["--debug"] if how == "flag" else [])
    proc = _run(args, scratch, **({"IPADAPTER_JAX_DEBUG": "1"} if how == "env" else {}))
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr[-3000:]
    assert "UserError: --image missing.png: no such file" in proc.stderr


def test_runtime_failure_exits_1_in_one_line(capsys, monkeypatch):
    """Not a user mistake (a failure such as a disk error) -> exit 1, one line that says how to see more."""
    from ipadapter_jax.cli_errors import run_cli

    monkeypatch.delenv("IPADAPTER_JAX_DEBUG", raising=False)

    def broken(argv):
        raise OSError(28, "No space left on device")

    with pytest.raises(SystemExit) as stop:
        run_cli("tool", broken, [])
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tool: error: OSError:") and "--debug" in lines[0], lines
