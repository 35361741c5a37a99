"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel on the toy world (about two minutes on a
2-core CPU) and shows its pictures; the committed copy carries its outputs, so readers see them without
running it.

The kernel starts in a temporary folder and the notebook's workdir (QUICKSTART_WORKDIR) is inside it, so a run
never touches the checkout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbclient  # the test extra: pip install -e ".[test]"
import nbformat

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
DIFFUSERS_TOL = 1e-3  # max abs pixel difference, diffusers vs ours on the exported adapter (measured ~1e-6)
MIN_FIGURES = 8  # shards, loss, scales, text + image, per-block, two references, two adapters, diffusers


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _outputs(nb, output_type=None):
    return [out for cell in _code_cells(nb) for out in cell.get("outputs", [])
            if output_type is None or out.output_type == output_type]


def _images(nb):
    return [out for out in _outputs(nb) if out.output_type in ("display_data", "execute_result")
            and "image/png" in out.get("data", {})]


def _text(nb) -> str:
    return "".join(out.text for out in _outputs(nb, "stream") if out.name == "stdout")


def _check_ran_and_showed(nb) -> None:
    cells = _code_cells(nb)
    assert cells and all(cell.execution_count for cell in cells), "a code cell did not run"
    errors = _outputs(nb, "error")
    assert not errors, f"cell errors: {[(e.ename, e.evalue) for e in errors]}"
    assert len(_images(nb)) >= MIN_FIGURES, f"{len(_images(nb))} figures, expected at least {MIN_FIGURES}"
    text = _text(nb)
    assert "stopped at step 600" in text
    match = re.search(r"max abs difference, diffusers vs ipadapter-jax pixels: (\S+)", text)
    assert match and float(match.group(1)) <= DIFFUSERS_TOL, text
    loss_cell = next(c for c in cells if "plot_loss(handle)" in c.source)
    assert any("image/png" in out.get("data", {}) for out in loss_cell.outputs), "no loss plot"


def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in _code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # The kernel imports ipadapter_jax from this checkout whether or not it is pip-installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    _check_ran_and_showed(nb)
    assert (tmp_path / "workdir" / "ip_adapter.safetensors").is_file()
    assert not (tmp_path / "quickstart_workdir").exists()  # everything went where it was told to


def test_committed_notebook_carries_its_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    _check_ran_and_showed(nb)
    counts = [cell.execution_count for cell in _code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1)), "the committed outputs are not from one top-to-bottom run"
    assert str(REPO) not in NOTEBOOK.read_text(), "the committed outputs mention this machine's paths"
