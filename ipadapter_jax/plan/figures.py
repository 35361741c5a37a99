"""What a compiled program says about itself, per chip: HBM use from ``compiled.memory_analysis()`` and FLOPs
and time from XLA's cost model (``compiled.cost_analysis()``), turned into images/s and MFU.

Every figure is a compiler estimate, not a measurement:
  - memory: arguments + outputs - donated (aliased) bytes + temporaries + generated code, per chip, as the
    TPU compiler laid the program out; the runtime adds a little (buffers in flight between steps).
  - FLOPs: XLA's count for the partitioned per-chip program, including rematerialised recomputation and
    the FLOPs Pallas kernels declare in their cost estimates.
  - step time: the cost model's ``optimal_seconds`` (a roofline per HLO op over FLOPs, transcendentals and
    HBM bytes). XLA's internal ``ConcatBitcast`` custom calls (sliced prefetches into VMEM) carry no cost
    and are reported as -1 s each; they are zero-cost bitcasts, so each one's -1 s is taken back out.
  - MFU: model FLOPs per chip / (step time x the chip's bf16 peak). Model FLOPs are the same computation's
    without rematerialisation and with XLA attention (no kernel padding), counted by XLA on the unpartitioned
    program and divided by the chip count. HFU uses the compiled FLOPs instead.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ipadapter_jax.plan.topology import GIB, Topology

COST_FREE_CUSTOM_CALLS = ("ConcatBitcast",)


@dataclasses.dataclass
class PlanFigures:
    """Per-chip compiler estimates for one program on one topology (bytes, FLOPs, seconds)."""

    topology: str
    device_kind: str
    num_chips: int
    hbm_capacity_bytes: int
    peak_bf16_flops: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    compiled_flops: float
    model_flops: float | None
    hbm_bytes_accessed: float
    step_seconds: float | None
    cost_free_ops_corrected: int
    images_per_step: int

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_capacity_bytes

    @property
    def images_per_second_per_chip(self) -> float | None:
        if not self.step_seconds:
            return None
        return self.images_per_step / self.num_chips / self.step_seconds

    def _utilisation(self, flops: float | None) -> float | None:
        if flops is None or not self.step_seconds:
            return None
        return flops / (self.step_seconds * self.peak_bf16_flops)

    @property
    def mfu(self) -> float | None:
        return self._utilisation(self.model_flops)

    @property
    def hfu(self) -> float | None:
        return self._utilisation(self.compiled_flops)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(total_bytes=self.total_bytes, fits=self.fits, mfu=self.mfu, hfu=self.hfu,
                   images_per_second_per_chip=self.images_per_second_per_chip,
                   estimate="XLA TPU compiler estimates (memory_analysis / cost_analysis), not measurements")
        return out


def count_cost_free_custom_calls(hlo_text: str) -> int:
    targets = re.findall(r'custom_call_target="([^"]+)"', hlo_text)
    return sum(t in COST_FREE_CUSTOM_CALLS for t in targets)


def corrected_step_seconds(optimal_seconds: float | None, hlo_text: str) -> tuple[float | None, int]:
    """``(seconds, corrections)``: the cost model's time with each cost-free custom call's -1 s removed; None
    when the figure is missing or still negative (an op the cost model cannot time)."""
    if optimal_seconds is None:
        return None, 0
    corrections = count_cost_free_custom_calls(hlo_text) if optimal_seconds < 0 else 0
    seconds = optimal_seconds + corrections
    return (seconds if seconds > 0 else None), corrections


def _single(analysis: Any) -> dict:
    # Older jax returned a one-element list of dicts.
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def figures_from_compiled(compiled: Any, topology: Topology, device_kind: str, images_per_step: int,
                          model_flops_global: float | None = None) -> PlanFigures:
    memory = compiled.memory_analysis()
    cost = _single(compiled.cost_analysis())
    seconds, corrections = corrected_step_seconds(cost.get("optimal_seconds"), compiled.as_text())
    chips = topology.num_chips
    return PlanFigures(
        topology=topology.name, device_kind=device_kind, num_chips=chips,
        hbm_capacity_bytes=topology.chip.hbm_bytes, peak_bf16_flops=topology.chip.peak_bf16_flops,
        argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        compiled_flops=float(cost.get("flops", 0.0)),
        model_flops=None if model_flops_global is None else model_flops_global / chips,
        hbm_bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        step_seconds=seconds, cost_free_ops_corrected=corrections, images_per_step=images_per_step,
    )


def add_repeats(figures: PlanFigures, body: PlanFigures, count: int) -> PlanFigures:
    """``figures`` of a program whose loop body (``body``, compiled on its own) runs ``count`` more times than
    the cost model counted: its FLOPs, HBM traffic and time added ``count`` times; memory unchanged."""
    seconds = None
    if figures.step_seconds is not None and body.step_seconds is not None:
        seconds = figures.step_seconds + count * body.step_seconds
    return dataclasses.replace(
        figures, compiled_flops=figures.compiled_flops + count * body.compiled_flops,
        hbm_bytes_accessed=figures.hbm_bytes_accessed + count * body.hbm_bytes_accessed, step_seconds=seconds,
        cost_free_ops_corrected=figures.cost_free_ops_corrected + count * body.cost_free_ops_corrected)


def model_flops(fn: Any, args: tuple) -> float | None:
    """XLA's FLOP count of ``fn`` on ``args`` (unsharded ``ShapeDtypeStruct``s), lowered for CPU: no compile,
    no partitioning, so it is the whole computation's count."""
    import jax

    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",))
    analysis = _single(lowered.cost_analysis())
    return float(analysis["flops"]) if "flops" in analysis else None


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def format_figures(f: PlanFigures) -> list[str]:
    """Human-readable lines; every one says it is a compiler estimate."""
    def tflop(x: float) -> str:
        return f"{x / 1e12:.3g} TFLOP"

    lines = [
        f"[compiler estimate] per-chip HBM on {f.topology} ({f.num_chips} x {f.device_kind}, "
        f"{_gib(f.hbm_capacity_bytes)} each):",
        f"    arguments {_gib(f.argument_bytes)} + outputs {_gib(f.output_bytes)} - donated {_gib(f.alias_bytes)} "
        f"+ temporaries {_gib(f.temp_bytes)} + code {_gib(f.code_bytes)}",
        f"    = {_gib(f.total_bytes)} of {_gib(f.hbm_capacity_bytes)} "
        f"({100 * f.total_bytes / f.hbm_capacity_bytes:.0f}%): {'FITS' if f.fits else 'DOES NOT FIT'}",
        f"[compiler estimate] cost model per chip: {tflop(f.compiled_flops)} compiled"
        + (f", {tflop(f.model_flops)} model" if f.model_flops is not None else "")
        + f", {f.hbm_bytes_accessed / 1e9:.3g} GB HBM traffic",
    ]
    if f.step_seconds is None:
        lines.append("[compiler estimate] step time: not available (the cost model could not time an op)")
        return lines
    peak = f.peak_bf16_flops / 1e12
    lines.append(f"[compiler estimate] step time {1e3 * f.step_seconds:.3g} ms -> "
                 f"{f.images_per_second_per_chip:.2f} images/s per chip "
                 f"({f.images_per_step} images per step over {f.num_chips} chips)")
    util = f"[compiler estimate] vs {peak:.0f} TFLOP/s bf16 peak per chip:"
    if f.mfu is not None:
        util += f" MFU {100 * f.mfu:.1f}% (model FLOPs),"
    util += f" HFU {100 * f.hfu:.1f}% (compiled FLOPs)"
    lines.append(util)
    if f.cost_free_ops_corrected:
        lines.append(f"    ({f.cost_free_ops_corrected} cost-free ConcatBitcast ops: the cost model's -1 s each "
                     f"taken back out)")
    return lines
