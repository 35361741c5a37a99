"""The training-config reference, generated from the config files themselves:

    python -m ipadapter_jax.tools.config_reference > docs/CONFIG_REFERENCE.md

Every field of ``configs/*.py`` is one assignment ``c.section.field = value  # comment``: all of them in the
base config (``sd15.py``), and in a config built on it (``c = sd15.get_config()``) the ones it overrides.
This reads those assignments with ``ast`` (the value as written, so ``str(ASSETS / "base")`` stays an
expression instead of becoming this machine's absolute path) and their trailing comments with ``tokenize``,
following a config to its base, and prints one Markdown table per section: field, the value in each config,
and the comment (an override's own, else the base's). Reading the source rather than
calling ``get_config()`` keeps the output identical on every machine; ``tests/test_config_reference.py``
checks that the committed file is what this prints, so the reference cannot go stale.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG_ORDER = ("tiny", "sd15", "sd15_plus", "sdxl")  # the default first, then by model size
TOP_LEVEL = "run"  # the section name shown for fields set directly on the root ConfigDict


@dataclasses.dataclass(frozen=True)
class Field:
    section: str  # "" for root fields
    name: str
    value: str  # the assigned expression, as written
    comment: str


def read_fields(path: Path) -> list[Field]:
    """Every field of one config file, in its base's order: the base's fields (``c = base.get_config()``,
    ``base`` a config beside this one) with this file's ``c.<section>.<name> = value  # comment`` assignments
    over them (an override without a comment keeps the base's), then any fields the base does not have."""
    source = path.read_text()
    base = _base_config(source)
    own = _own_fields(path, source)
    if base is None:
        return own
    fields = {(f.section, f.name): f for f in read_fields(path.parent / f"{base}.py")}
    for f in own:
        inherited = fields.get((f.section, f.name))
        fields[(f.section, f.name)] = f if f.comment or inherited is None else dataclasses.replace(
            f, comment=inherited.comment)
    return list(fields.values())


def _base_config(source: str) -> str | None:
    """``name`` when the config starts from ``c = name.get_config()``."""
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "c" and isinstance(node.value, ast.Call)):
            func = node.value.func
            if (isinstance(func, ast.Attribute) and func.attr == "get_config"
                    and isinstance(func.value, ast.Name)):
                return func.value.id
    return None


def _own_fields(path: Path, source: str) -> list[Field]:
    """The ``c.<section>.<name> = value  # comment`` assignments of the file itself, in file order."""
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    fields = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        parts = _attribute_path(node.targets[0])
        if parts is None or parts[0] != "c" or len(parts) < 2:
            continue
        value = ast.get_source_segment(source, node.value)
        if isinstance(node.value, ast.Call) and value.endswith("ConfigDict()"):
            continue  # a section header, not a field
        if len(parts) > 3:
            raise ValueError(f"{path}:{node.lineno}: nested sections are not supported: {'.'.join(parts)}")
        section, name = (parts[1], parts[2]) if len(parts) == 3 else ("", parts[1])
        fields.append(Field(section, name, " ".join(value.split()), comments.get(node.end_lineno, "")))
    return sorted(fields, key=lambda f: _line_of(source, f))


def _line_of(source: str, field: Field) -> int:
    target = f"c.{field.section}.{field.name} =" if field.section else f"c.{field.name} ="
    for number, line in enumerate(source.splitlines()):
        if line.strip().startswith(target):
            return number
    return 0


def _attribute_path(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`"


def _comment_cell(per_config: dict[str, str]) -> str:
    """One comment when the configs agree; else each distinct one, prefixed with the configs that use it."""
    distinct: dict[str, list[str]] = {}
    for name, comment in per_config.items():
        distinct.setdefault(comment, []).append(name)
    if len(distinct) == 1:
        return _cell(next(iter(distinct)))
    return "<br>".join(f"*{', '.join(names)}*: {_cell(comment)}" for comment, names in distinct.items())


def render(configs_dir: Path = REPO / "configs", names: tuple[str, ...] = CONFIG_ORDER) -> str:
    per_config = {name: read_fields(configs_dir / f"{name}.py") for name in names}
    sections: dict[str, dict[str, dict[str, Field]]] = {}  # section -> field name -> config -> Field
    for name, fields in per_config.items():
        for f in fields:
            sections.setdefault(f.section, {}).setdefault(f.name, {})[name] = f
    lines = [
        "# Training config reference",
        "",
        "<!-- Generated by `python -m ipadapter_jax.tools.config_reference > docs/CONFIG_REFERENCE.md` from the",
        "     trailing comments of configs/*.py; edit those, not this file (tests/test_config_reference.py). -->",
        "",
        "Every field of the shipped configs, with its value in each. Override any of them on the command line:",
        "`python train.py --config configs/sd15.py --config.<section>.<field>=<value>` (e.g.",
        "`--config.optimizer.learning_rate=5e-5`). A field a config does not set shows as *not set*.",
        "",
    ]
    for section, fields in sections.items():
        title = f"`{section}`" if section else f"{TOP_LEVEL} (top level)"
        lines += [f"## {title}", "", "| field | " + " | ".join(names) + " | meaning |",
                  "|---|" + "---|" * len(names) + "---|"]
        for field_name, by_config in fields.items():
            key = f"{section}.{field_name}" if section else field_name
            values = [_code(by_config[n].value) if n in by_config else "*not set*" for n in names]
            comment = _comment_cell({n: f.comment for n, f in by_config.items()})
            lines.append(f"| `{key}` | " + " | ".join(values) + f" | {comment} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipadapter_jax.tools.config_reference",
                                     description="print the config reference (Markdown) from configs/*.py")
    parser.add_argument("--configs", type=Path, default=REPO / "configs", help="folder of the config files")
    args = parser.parse_args(argv)
    sys.stdout.write(render(args.configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
