"""The plan table of TPU_PLANS.md from ``tpu_plan --json`` files: one markdown row per plan, every figure a
compiler estimate, each row followed in a second table by the command that produced it.

    python -m ipadapter_jax.tools.plan_table benchmarks/tpu_plans/*.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ipadapter_jax.tools.tpu_topology import GIB

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


def table(records: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(i + 1, r)) + " |" for i, r in enumerate(records)]
    lines += ["", "| # | command (`pip install '.[tpu]'`, then from the repository root) |", "|---|---|"]
    lines += [f"| {i + 1} | `{r['command']}` |" for i, r in enumerate(records)]
    return lines


def command_writing(record: dict, path: str) -> str:
    """The record's command with its ``--json`` output set to ``path`` and any ``--hlo`` dump left out."""
    command = re.sub(r"\s--hlo[= ]\S+", "", record["command"])
    command = re.sub(r"\s--json[= ]\S+", "", command)
    return f"{command} --json {path}"


def main(paths: list[str]) -> None:
    records = []
    for p in paths:
        record = json.loads(Path(p).read_text())
        record["command"] = command_writing(record, p)
        records.append(record)
    print("\n".join(table(records)))


if __name__ == "__main__":
    main(sys.argv[1:])
