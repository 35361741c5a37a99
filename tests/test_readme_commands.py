"""Every shell command README.md shows is exercised somewhere: by a named test (which must exist), by CI
(``.ci/run`` must contain it), or, for third-party tools (gcloud, hf, tensorboard), listed as such with what
of ours it depends on. On top of that, every command of our own CLIs is parsed by that CLI here, with its
real argument parser and, for training, the real config loading and validation: a misspelt flag, an unknown
``--config.`` key or an impossible value in the README fails this test. Commands wrapped in
``gcloud ... ssh --command="..."`` are unwrapped and checked the same way.

The README's commands are the lines of its fenced ``bash`` blocks and of its indented code blocks (the two
new-machine commands), and the inline code spans in its prose that start with a command (``python3 ...``,
``jupyter ...``, ``pip ...``, ...); fenced ``python`` blocks must compile and their per-block scales must fit
SD1.5.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHELL_LANGUAGES = {"bash", "sh", "shell"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)

# The README's test command: it does its own setup, so it works on a new machine, and .ci/run runs this line.
TEST_COMMAND = 'python3 -m pip install -e ".[test]" && python3 -m pytest -q -n 2 --dist loadfile'

# README command prefix -> what exercises it. Test node ids must exist; ".ci/run: X" means .ci/run runs X.
# The longest matching prefix wins; an entry no README command uses is an error (the table cannot go stale).
COVERED_BY = {
    "python3 -m pip install -e . && python3 train.py": [
        '.ci/run: ' + TEST_COMMAND,  # installs the package, with the test extra
        "tests/test_notebook.py::test_quickstart_runs_top_to_bottom",  # configs/tiny.py's full default run
        "tests/test_train_e2e.py::test_run_writes_metrics_checkpoints_exports_and_resumes"],
    "python3 train.py": ["tests/test_notebook.py::test_quickstart_runs_top_to_bottom",
                         "tests/test_train_e2e.py::test_run_writes_metrics_checkpoints_exports_and_resumes"],
    TEST_COMMAND: [".ci/run: " + TEST_COMMAND],  # CI runs the README's test command verbatim
    "python3 benchmarks/sample_bench.py": ["tests/test_benchmarks_smoke.py::test_sample_bench_prints_the_ratio"],
    "python3 benchmarks/train_bench.py": ["tests/test_benchmarks_smoke.py::test_train_bench_prints_the_ratio"],
    'python3 -m pip install -e ".[test]"': [".ci/run: " + TEST_COMMAND],  # the install half of it
    'python3 -m pip install -e ".[tpu]"': ["tests/test_readme_commands.py::test_extras_the_readme_installs_exist"],
    'python3 -m pip install -e ".[face]"': ["tests/test_readme_commands.py::test_extras_the_readme_installs_exist"],
    "python3 -m ipadapter_jax.tools.face_embeds": ["tests/test_face_embeds_cli.py::test_largest_face_per_image_and_crops",
                                                   "tests/test_face_embeds_cli.py::test_missing_model_folder_is_one_line"],
    "jupyter execute notebooks/quickstart.ipynb": ["tests/test_notebook.py::test_quickstart_runs_top_to_bottom"],
    "jupyter execute --inplace notebooks/quickstart.ipynb": [
        "tests/test_notebook.py::test_quickstart_runs_top_to_bottom",
        "tests/test_notebook.py::test_committed_notebook_carries_its_outputs"],
    "python3 sample.py --model /models/stable-diffusion-v1-5 --ip-adapter /models/IP-Adapter-FaceID/": [
        "tests/test_faceid_pipeline.py::test_sample_cli_face_embeds_end_to_end"],
    "python3 sample.py": ["tests/test_sample_cli.py::test_sample_cli_writes_images_grid_and_reuses_compilations",
                          "tests/test_pipeline_parity.py::test_pixels_match_diffusers"],
    "python3 -m ipadapter_jax.evaluate": ["tests/test_evaluate.py::test_cli_end_to_end_on_the_toy_base",
                                          "tests/test_evaluate.py::test_coco_captions_and_folder"],
    "python3 -m ipadapter_jax.data.make_shards --images": [
        "tests/test_make_shards.py::test_sidecar_captions", "tests/test_make_shards.py::test_captions_json_and_csv"],
    "python3 -m ipadapter_jax.data.make_shards --tencent-json": [
        "tests/test_make_shards.py::test_tencent_json_via_python_dash_m"],
    "python -m ipadapter_jax.data.make_shards": ["tests/test_make_shards.py::test_tencent_json_via_python_dash_m"],
    "python -m ipadapter_jax.cache": [
        "tests/test_cache_train.py::test_cached_training_checkpoints_and_resumes_exactly"],
    "python3 train.py --config configs/sd15.py": [
        "tests/test_gcs_workdir.py::test_gs_workdir_survives_kills_sigterm_and_a_damaged_checkpoint",
        "tests/test_train_e2e.py::test_run_writes_metrics_checkpoints_exports_and_resumes",
        "tests/test_train_e2e.py::test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_cleanly",
        "tests/test_train_config.py::test_shipped_configs_set_and_comment_every_field"],
    "python3 train.py --config configs/sdxl.py": [
        "tests/test_gcs_workdir.py::test_gs_workdir_survives_kills_sigterm_and_a_damaged_checkpoint",
        "tests/test_train_multidevice.py::test_eight_devices_give_the_same_losses_and_adapter",
        "tests/test_train_config.py::test_shipped_configs_set_and_comment_every_field"],
    "python3 -m ipadapter_jax.plan": ["tests/test_tpu_plan.py::test_plan_on_tpu_topology"],
    # The commands of the plan tables' rows (they made the committed JSONs) and the table generator.
    "python -m ipadapter_jax.plan": ["tests/test_tpu_plan.py::test_plan_on_tpu_topology",
                                               "tests/test_plan_docs.py::test_plan_records_its_command_and_revision"],
    "python -m ipadapter_jax.plan.table --write": [
        "tests/test_plan_docs.py::test_doc_tables_are_generated_from_the_plans"],
    "python3 -m ipadapter_jax.tools.config_reference > docs/CONFIG_REFERENCE.md": [
        "tests/test_config_reference.py::test_committed_reference_is_what_the_tool_prints"],
    # Third-party tools. What of ours they rely on is tested where named; the inner --command of an ssh is
    # checked as a README command of its own.
    "gcloud compute tpus tpu-vm ssh": [
        "tests/test_train_multiprocess.py::test_two_processes_train_on_disjoint_shards_write_one_checkpoint_and_stop_together"],
    "gcloud compute tpus tpu-vm create": ["third-party: creates the TPU VM"],
    "gcloud compute tpus tpu-vm scp": ["third-party: copies the checkout to the workers"],
    "gcloud storage cp": ["third-party: gs:// shard URLs are read by tests/test_data_webdataset_source.py"
                          "::test_pipe_and_fsspec_urls (pipe: and fsspec schemes)"],
    "hf download": ["third-party: downloads the diffusers / transformers folders the loaders read"],
    "sudo mkdir -p /models": ["third-party: shell"],
    "sudo chmod 777 /models": ["third-party: shell"],
    "python3 --version": ["third-party: Python itself"],
    "pip install tensorboard": ["third-party: the TensorBoard viewer (the trainer writes events with tensorboardX)"],
    "tensorboard --logdir": ["tests/test_train_e2e.py::test_run_writes_metrics_checkpoints_exports_and_resumes",
                             "tests/test_gcs_workdir.py::test_gs_workdir_survives_kills_sigterm_and_a_damaged_checkpoint"],
}
THIRD_PARTY = {"gcloud", "gsutil", "hf", "mkdir", "sudo", "tensorboard"}  # programs that are not ours
THIRD_PARTY_COMMANDS = {"python3 --version", "pip install tensorboard"}


INLINE_PROGRAMS = {"python", "python3", "jupyter", "pip", "gcloud", "gsutil", "hf", "tensorboard"}


def _inline_commands() -> list[str]:
    """Inline code spans of the prose (outside code blocks) that are commands: a known program and arguments."""
    prose = FENCE.sub("", README.read_text())
    spans = re.findall(r"`([^`\n]+)`", prose)
    return [span for span in spans if " " in span and span.split()[0] in INLINE_PROGRAMS]


def _readme_blocks() -> tuple[list[str], list[str]]:
    """(shell commands of the code blocks, python snippets) of README.md."""
    text = README.read_text()
    commands, snippets = [], []
    for language, body in FENCE.findall(text):
        if language in SHELL_LANGUAGES:
            commands += _command_lines(body)
        elif language == "python":
            snippets.append(body)
        else:
            assert language == "text", f"README.md: a fenced block of language {language!r}; use bash, python or text"
    indented = [line[4:] for line in FENCE.sub("", text).splitlines() if line.startswith("    ") and line.strip()]
    commands += _command_lines("\n".join(indented))
    return commands, snippets


def _command_lines(body: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _inner_commands(command: str) -> list[str]:
    """The shell command a ``gcloud ... ssh --command=...`` runs on the workers, split at ``&&``, without
    ``cd``, ``nohup``, redirections and a trailing ``&``."""
    tokens = shlex.split(command)
    inner = [t.split("=", 1)[1] for t in tokens if t.startswith("--command=")]
    out = []
    for script in inner:
        for part in script.split("&&"):
            part = re.sub(r"\s*&\s*$", "", part.strip())
            part = re.sub(r"\s*(2>&1|\d?>\s*\S+)", "", part).strip()
            part = re.sub(r"^nohup\s+", "", part)
            if part and not part.startswith("cd "):
                out.append(part)
    return out


def _block_commands() -> list[str]:
    """Commands of the code blocks, with what ``gcloud ... ssh --command=`` runs on the workers."""
    commands, _ = _readme_blocks()
    return commands + [inner for c in commands for inner in _inner_commands(c)]


def _all_commands() -> list[str]:
    return _block_commands() + _inline_commands()


def _entry(command: str) -> str | None:
    command = command.replace("'", '"')  # -e '.[tpu]' inside an ssh --command="..." is -e ".[tpu]"
    matches = [prefix for prefix in COVERED_BY if command.startswith(prefix)]
    return max(matches, key=len) if matches else None


def _node_exists(node: str) -> bool:
    path, _, name = node.partition("::")
    file = REPO / path
    if not file.is_file():
        return False
    functions = {n.name for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.FunctionDef)}
    return name in functions


def test_readme_shows_commands_and_keeps_the_new_machine_contract():
    commands, _ = _readme_blocks()
    assert "python3 -m pip install -e . && python3 train.py" in commands
    assert TEST_COMMAND in commands
    assert len(commands) >= 15
    text = README.read_text()
    for marker in ("<!-- TPU_PLAN_TABLE -->", "<!-- BENCHMARKS -->", "<!-- TOY_RESULTS -->"):
        assert f"\n{marker}\n" in text, f"README.md: {marker} must stay on a line of its own"


def test_every_readme_command_is_covered():
    uncovered = [c for c in _all_commands() if _entry(c) is None]
    assert not uncovered, "README commands that nothing exercises (add them to COVERED_BY):\n" + "\n".join(uncovered)
    used = {_entry(c) for c in _all_commands()}
    stale = sorted(set(COVERED_BY) - used)
    assert not stale, f"COVERED_BY entries no README command uses: {stale}"
    for prefix, targets in COVERED_BY.items():
        for target in targets:
            if target.startswith(".ci/run: "):
                ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
                assert target.split(": ", 1)[1] in ci_lines, f"{prefix!r}: .ci/run does not run it"
            elif target.startswith("third-party:"):
                assert prefix.split()[0] in THIRD_PARTY or prefix in THIRD_PARTY_COMMANDS, f"{prefix!r} is one of ours: name the test that covers it"
            else:
                assert _node_exists(target), f"{prefix!r}: the covering test {target} does not exist"


def test_extras_the_readme_installs_exist():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set()
    for command in _all_commands():
        named |= set(re.findall(r"\.\[(\w+)\]", command))
    assert named and named <= set(extras), f"README installs extras {sorted(named - set(extras))} pyproject lacks"
    assert any(req.startswith("jax[tpu]") for req in extras["tpu"])
    for needed in ("nbclient", "nbformat", "ipykernel", "matplotlib"):  # what the notebook test runs
        assert any(req.startswith(needed) for req in extras["test"]), f"the test extra lacks {needed}"


def test_python_snippets_compile():
    _, snippets = _readme_blocks()
    assert len(snippets) >= 2
    for snippet in snippets:
        compile(snippet, "README.md", "exec")


def test_ip_scale_dicts_in_the_snippets_fit_sd15():
    """The Python snippets use SD1.5 folders: every ``ip_scale={...}`` in them must name layers that SD1.5's
    UNet has (the published config in ipadapter_jax/reference_configs)."""
    from ipadapter_jax.models.ip_scales import resolve_ip_scales
    from ipadapter_jax.models.unet_config import UNetConfig

    config = UNetConfig.from_diffusers(json.loads(
        (REPO / "ipadapter_jax" / "reference_configs" / "sd15_unet.json").read_text()))
    _, snippets = _readme_blocks()
    specs = [ast.literal_eval(keyword.value) for snippet in snippets for node in ast.walk(ast.parse(snippet))
             if isinstance(node, ast.Call) for keyword in node.keywords
             if keyword.arg == "ip_scale" and isinstance(keyword.value, ast.Dict)]
    assert specs, "no per-block ip_scale in the README's snippets"
    for spec in specs:
        assert resolve_ip_scales(config, spec, 1).any(), f"ip_scale={spec} selects no SD1.5 layer"


# Parses commands' arguments with each CLI's own parser, without running them; prints one JSON line per
# command: {"command": index, "error": "" or what the CLI said}. absl CLIs (train.py, the plan) define their
# flags on import, so each gets a process of its own; the config file is loaded and its overrides applied by
# the parse, then validated the way training validates it. argparse CLIs stop right after parse_args and
# share one process.
_PARSE_ONLY = r"""
import argparse, contextlib, io, json, runpy, sys
parse_args = argparse.ArgumentParser.parse_args
def parse_and_stop(self, args=None, namespace=None):
    parse_args(self, args, namespace)
    raise SystemExit(0)
for index, (kind, argv) in enumerate(json.loads(sys.argv[1])):
    sys.argv = [kind] + argv
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if kind in ("train.py", "ipadapter_jax.plan"):
                from absl import flags
                if kind == "train.py":
                    runpy.run_path("train.py", run_name="readme_check")
                else:
                    runpy.run_module(kind, run_name="readme_check")
                flags.FLAGS(sys.argv)
                from ipadapter_jax.train.config import TrainConfig
                TrainConfig.from_config_dict(flags.FLAGS.config)
                error = ""
            else:
                argparse.ArgumentParser.parse_args = parse_and_stop
                try:
                    (runpy.run_path if kind.endswith(".py") else runpy.run_module)(kind, run_name="__main__")
                    error = "ran past its argument parser"
                finally:
                    argparse.ArgumentParser.parse_args = parse_args
    except SystemExit as stop:
        error = "" if stop.code in (0, None) else f"exit {stop.code}"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"command": index, "error": error and f"{error}\n{stderr.getvalue()[-2000:]}"}), flush=True)
"""
ABSL_CLIS = ("train.py", "ipadapter_jax.plan")


def _own_cli(command: str) -> tuple[str, list[str]] | None:
    """(script or module, arguments) of a command that runs one of our CLIs, else None."""
    tokens = shlex.split(command)
    if ">" in tokens:  # an output redirection
        tokens = tokens[:tokens.index(">")]
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):  # leading environment assignments
        tokens.pop(0)
    if tokens[:1] != ["python3"] or tokens[1:3] in (["-m", "pip"], ["-m", "pytest"]):
        return None
    if tokens[1] == "-m":
        return tokens[2], tokens[3:]
    return tokens[1], tokens[2:]


def _parse_only(commands: list[str]) -> dict[str, str]:
    """command -> "" when its CLI accepts its arguments, else the CLI's complaint. One process for all the
    argparse commands and one per absl command, run side by side."""
    parsed = [(c, _own_cli(c)) for c in commands]
    groups = [[(c, p) for c, p in parsed if p[0] not in ABSL_CLIS]] + [[(c, p)] for c, p in parsed if p[0] in ABSL_CLIS]
    procs = [(group, subprocess.Popen([sys.executable, "-c", _PARSE_ONLY, json.dumps([p for _, p in group])],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "JAX_PLATFORMS": "cpu"}))
             for group in groups if group]
    results = {}
    for group, proc in procs:
        out, err = proc.communicate(timeout=300)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith('{"command"')]
        assert len(lines) == len(group), f"the parse-only check died:\n{err[-3000:]}"
        for line in lines:
            results[group[line["command"]][0]] = line["error"]
    return results


# Only full commands (code blocks) are parsed; an inline mention such as `python3 -m ipadapter_jax.evaluate`
# names a tool rather than giving its arguments.
OWN_CLI_COMMANDS = sorted({c for c in _block_commands() if _own_cli(c)})
MISTAKES = ["python3 train.py --config configs/sd15.py --config.optimizer.learnig_rate=1e-4",
            "python3 train.py --config configs/sd15.py --config.batch_size=-8",
            "python3 sample.py --sacle 0.6",
            "python3 -m ipadapter_jax.data.make_shards --images photos/"]  # no --out


@pytest.fixture(scope="module")
def parse_results():
    return _parse_only(OWN_CLI_COMMANDS + MISTAKES)


@pytest.mark.parametrize("command", OWN_CLI_COMMANDS)
def test_our_cli_accepts_the_readme_arguments(command, parse_results):
    assert parse_results[command] == "", f"{command}\n{parse_results[command]}"


@pytest.mark.parametrize("command", MISTAKES)
def test_parse_only_check_catches_mistakes(command, parse_results):
    assert parse_results[command], f"accepted: {command}"
