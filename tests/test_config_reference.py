"""docs/CONFIG_REFERENCE.md is what ``python -m ipadapter_jax.tools.config_reference`` prints from the current
configs (so it never goes stale), and the values it shows are the values the configs produce."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from ipadapter_jax.tools.config_reference import CONFIG_ORDER, read_fields, render
from ipadapter_jax.toy_assets import ASSETS

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "CONFIG_REFERENCE.md"
REGENERATE = "python -m ipadapter_jax.tools.config_reference > docs/CONFIG_REFERENCE.md"


def test_committed_reference_is_what_the_tool_prints():
    printed = subprocess.run([sys.executable, "-m", "ipadapter_jax.tools.config_reference"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    assert printed == REFERENCE.read_text(), f"docs/CONFIG_REFERENCE.md is stale: run `{REGENERATE}`"
    assert printed == render()


def _leaves(node, prefix=""):
    out = {}
    for key, value in node.items():
        if hasattr(value, "items"):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("name", CONFIG_ORDER)
def test_every_field_is_listed_with_the_value_the_config_gives(name):
    sys.path.insert(0, str(REPO))
    try:
        config = importlib.import_module(f"configs.{name}").get_config()
    finally:
        sys.path.remove(str(REPO))
    expected = _leaves(config)
    fields = read_fields(REPO / "configs" / f"{name}.py")
    listed = {f"{f.section}.{f.name}" if f.section else f.name: f for f in fields}
    assert sorted(listed) == sorted(expected)
    for key, field in listed.items():
        assert field.comment, f"configs/{name}.py: {key} has no comment"
        value = eval(field.value, {"ASSETS": ASSETS})  # the expression as shown in the reference
        assert value == expected[key], f"{name}: {key} shows {field.value!r}, the config gives {expected[key]!r}"
        assert f"`{key}`" in REFERENCE.read_text()


def test_differing_comments_are_shown_per_config(tmp_path):
    for name, comment in (("a", "one meaning"), ("b", "another meaning")):
        (tmp_path / f"{name}.py").write_text(
            "import ml_collections\n\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
            f"    c.seed = 0  # {comment}\n    c.opt = ml_collections.ConfigDict()\n"
            "    c.opt.lr = 1e-4  # a | pipe\n    return c\n")
    text = render(tmp_path, ("a", "b"))
    assert "| `seed` | `0` | `0` | *a*: one meaning<br>*b*: another meaning |" in text
    assert "| `opt.lr` | `1e-4` | `1e-4` | a \\| pipe |" in text
