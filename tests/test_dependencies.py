"""Every third-party package the library imports when a module loads is one the install brings: declared in
pyproject.toml's dependencies, or required by one of those (as jax brings ml_dtypes). A package that only
came in through a dependency we dropped (braceexpand with webdataset) breaks a fresh install, which no test
on a machine that still has it would notice."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Needs the test extra (torch); imported by tests and benchmarks only.
TEST_ONLY = ("ipadapter_jax/testing/",)


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _installed_closure(names: set[str]) -> set[str]:
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        todo += [_name(r) for r in reqs if "extra ==" not in r]
    return seen


def _module_level_imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted((REPO / "ipadapter_jax").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(TEST_ONLY):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("ipadapter_jax", "__future__"):
                    out.setdefault(top, set()).add(rel)
    return out


def test_every_module_level_import_comes_with_the_install():
    declared = {_name(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    available = _installed_closure(declared)
    distributions = packages_distributions()
    missing = {}
    for module, files in _module_level_imports().items():
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not dists & available:
            missing[module] = sorted(files)
    assert not missing, f"imported when the library loads but not brought by pyproject.toml's dependencies: {missing}"
    assert "braceexpand" in _module_level_imports()  # the check sees the import that once broke a fresh install
