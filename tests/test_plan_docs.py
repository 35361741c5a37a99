"""The TPU plan figures in the docs are the committed plan JSONs, and every JSON says what made it.

Every ``benchmarks/tpu_plans/*.json``: the ``tpu_plan`` command that wrote it (its ``--config`` a shipped
config file), the git revision it was compiled at (a commit of this history, no uncommitted changes), and a
row in a doc table. README.md's and TPU_PLANS.md's plan tables are exactly what
``python -m ipadapter_jax.plan.table --write README.md TPU_PLANS.md`` generates from those files.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ipadapter_jax.plan.table import regenerate, table_files

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "TPU_PLANS.md")
PLANS = sorted((REPO / "benchmarks" / "tpu_plans").glob("*.json"))


def test_there_are_plans():
    assert PLANS


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.name)
def test_plan_records_its_command_and_revision(path):
    record = json.loads(path.read_text())
    command = record.get("command", "")
    # The command's name, or its old one (plans compiled before the move; the tables print the new name).
    assert command.startswith(("python -m ipadapter_jax.plan ", "python -m ipadapter_jax.tools.tpu_plan ")), command
    config = re.search(r"--config[= ](\S+)", command)
    assert config and (REPO / config.group(1)).is_file(), command
    assert re.search(rf"--json[= ]\S*{re.escape(path.name)}\b", command), "the command writes another file"
    revision = record.get("revision", "")
    assert re.fullmatch(r"[0-9a-f]{40}", revision), f"{path.name}: revision {revision!r} (dirty or missing)"
    if shutil.which("git") and (REPO / ".git").exists():
        known = subprocess.run(["git", "merge-base", "--is-ancestor", revision, "HEAD"], cwd=REPO)
        assert known.returncode == 0, f"{path.name}: {revision} is not a commit of this history"


@pytest.mark.parametrize("doc", DOCS)
def test_doc_tables_are_generated_from_the_plans(doc):
    text = (REPO / doc).read_text()
    assert table_files(text), f"{doc} has no plan table block"
    assert regenerate(text, REPO) == text, (
        f"{doc}'s plan table is not what its JSON files generate: run "
        f"python -m ipadapter_jax.plan.table --write README.md TPU_PLANS.md")


def test_every_plan_is_in_the_full_table():
    named = set(table_files((REPO / "TPU_PLANS.md").read_text()))
    assert named == {str(p.relative_to(REPO)) for p in PLANS}
