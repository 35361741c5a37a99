"""The plan tables of TPU_PLANS.md and README.md from ``python -m ipadapter_jax.plan --json`` files: one
markdown row per plan, every figure a compiler estimate, each row followed in a second table by the command
that produced it (plans recorded under the command's old name, ``tools.tpu_plan``, show the new one: the same
program).

    python -m ipadapter_jax.plan.table benchmarks/tpu_plans/*.json     # print a table
    python -m ipadapter_jax.plan.table --write README.md TPU_PLANS.md  # regenerate the docs' tables

In a doc, a table lives between ``<!-- plan table: FILE.json ... -->`` and ``<!-- end plan table -->``; the
files named in the opening marker are the rows, in order. ``tests/test_plan_docs.py`` fails when a doc's
table is not what its files generate.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ipadapter_jax.atomic_files import write_atomic
from ipadapter_jax.plan.topology import GIB

COLUMNS = ("#", "config", "topology", "what", "latents", "global batch (per chip)", "mesh", "remat", "attention",
           "HBM/chip (est.)", "step time (est.)", "img/s/chip (est.)", "MFU (est.)")


def _program_field(record: dict, pattern: str, default: str = "") -> str:
    for line in record.get("program", []):
        found = re.search(pattern, line)
        if found:
            return found.group(1)
    return default


def _config_name(command: str) -> str:
    found = re.search(r"--config[= ](\S+)", command)
    return Path(found.group(1)).stem if found else "?"


def row(index: int, record: dict) -> list[str]:
    chips = record["num_chips"]
    batch = record["images_per_step"]
    mesh = record.get("mesh") or {}
    mesh_text = " x ".join(f"{k}={v}" for k, v in mesh.items())
    hbm = (f"{record['total_bytes'] / GIB:.1f} / {record['hbm_capacity_bytes'] / GIB:.0f} GiB"
           + ("" if record["fits"] else " (does not fit)"))
    seconds = record.get("step_seconds")
    per_chip = record.get("images_per_second_per_chip")
    mfu = record.get("mfu")
    what = record["what"]
    if what == "sample":
        what = "sample (" + _program_field(record, r" x (\d+) steps", "?") + " steps)"
    return [str(index), _config_name(record["command"]), record["topology"], what, record.get("latents") or "-",
            f"{batch} ({batch / chips:g})", mesh_text,
            _program_field(record, r"remat (\w+)", "-"), _program_field(record, r"attention (\w+)", "-"), hbm,
            f"{1e3 * seconds:.0f} ms" if seconds else "n/a", f"{per_chip:.1f}" if per_chip else "n/a",
            f"{100 * mfu:.1f}%" if mfu is not None and seconds else "n/a"]


OLD_TOOL, TOOL = "python -m ipadapter_jax.tools.tpu_plan ", "python -m ipadapter_jax.plan "


def current_command(command: str) -> str:
    """``command`` under the plan tool's current name (plans recorded under its old one run the same program)."""
    return TOOL + command[len(OLD_TOOL):] if command.startswith(OLD_TOOL) else command


def table(records: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(i + 1, r)) + " |" for i, r in enumerate(records)]
    lines += ["", "| # | command (after `python3 -m pip install -e '.[tpu]'`, from the repository root) |", "|---|---|"]
    lines += [f"| {i + 1} | `{current_command(r['command'])}` |" for i, r in enumerate(records)]
    return lines


def command_writing(record: dict, path: str) -> str:
    """The record's command (``current_command``) with its ``--json`` output set to ``path`` and any ``--hlo``
    dump left out."""
    command = re.sub(r"\s--hlo[= ]\S+", "", current_command(record["command"]))
    command = re.sub(r"\s--json[= ]\S+", "", command)
    return f"{command} --json {path}"


def load_records(paths: list[str], root: Path = Path(".")) -> list[dict]:
    records = []
    for p in paths:
        record = json.loads((root / p).read_text())
        record["command"] = command_writing(record, p)
        records.append(record)
    return records


_BLOCK = re.compile(r"(<!-- plan table: (?P<files>[^>]*?) -->\n)(?P<body>.*?)(<!-- end plan table -->)", re.S)


def regenerate(text: str, root: Path = Path(".")) -> str:
    """``text`` with every plan-table block replaced by the table its marker's files generate."""
    def replace(match: re.Match) -> str:
        body = "\n".join(table(load_records(match.group("files").split(), root)))
        return match.group(1) + body + "\n" + match.group(4)

    return _BLOCK.sub(replace, text)


def table_files(text: str) -> list[str]:
    """The plan JSONs the doc's table blocks name."""
    return [f for m in _BLOCK.finditer(text) for f in m.group("files").split()]


def main(argv: list[str]) -> None:
    if argv[:1] == ["--write"]:
        for doc in argv[1:]:
            path = Path(doc)
            write_atomic(path, regenerate(path.read_text()))
            print(f"regenerated the plan tables of {doc}")
        return
    print("\n".join(table(load_records(argv))))


if __name__ == "__main__":
    main(sys.argv[1:])
