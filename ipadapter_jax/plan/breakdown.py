"""Where a compiled plan's time goes: a per-op roofline over the compiled per-chip HLO (written by
``python -m ipadapter_jax.plan --hlo FILE``).

    python -m ipadapter_jax.plan.breakdown plan.hlo --peak 197e12 --hbm 819e9 [--top 25]

XLA's ``cost_analysis`` gives one total; this re-derives it op by op so one can see what dominates. For
every top-level op of the entry computation (a fusion, a convolution, a custom call, a collective, ...):
  - FLOPs: 2 x output elements x contraction size of each convolution / dot inside it (elementwise FLOPs
    are left out: they never bound a TPU op's time);
  - bytes: its operands' and outputs' sizes (what it reads from and writes to HBM);
  - time: the roofline max(FLOPs / peak, bytes / HBM bandwidth).
It is an approximation of the compiler's own model (which also weighs transcendentals, layouts and
fusion-internal reuse, and tile padding of narrow minor dimensions), so compare its total with the plan's step
time (SD1.5 plans: 18-28% below it) before reading its shares as the compiler's.
Ops are grouped by kind (FLOP-bound matmul, HBM-bound matmul, elementwise/reduction, data movement,
collective, Pallas kernel) and by the model part named in their ``op_name`` metadata (unet / vae / text_encoder /
image_encoder, forward or backward).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_MOVES = ("copy", "transpose", "bitcast", "reshape", "slice", "dynamic-slice", "dynamic-update-slice",
          "concatenate", "pad", "broadcast", "copy-start", "copy-done", "gather", "scatter")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Module class names in op_name metadata -> model part (the text encoder with projection is SDXL's second).
# Not timed: bookkeeping, and the async copies / slices between HBM and VMEM that overlap compute.
_FREE = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "copy-start", "copy-done",
         "slice-start", "slice-done")
_PARTS = (("CLIPTextModelWithProjection", "text encoder 2"), ("CLIPTextModel", "text encoder"),
          ("CLIPVisionModel", "image encoder"), ("AutoencoderKL", "vae"), ("Encoder", "vae"),
          ("Decoder", "vae"), ("UNet2DConditionModel", "unet"))


def _elements(dims: str) -> int:
    n = 1
    for d in dims.split(","):
        if d:
            n *= int(d)
    return n


def _array_bytes(text: str) -> float:
    return sum(_elements(dims) * _DTYPE_BYTES.get(dtype, 4) for dtype, dims in _ARRAY.findall(text))


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: str
    attributes: str


def _split_call(rest: str) -> tuple[str, str, str, str]:
    """``shape opcode(operands), attributes`` -> its four parts (parentheses balanced)."""
    depth, i = 0, 0
    # The shape is a single array type or a parenthesised tuple.
    if rest.startswith("("):
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            break
    return shape, opcode.strip(), rest[:i], rest[i + 1:]


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """``({computation name: instructions}, entry computation name)``."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTRUCTION.match(line) if current else None
        if match:
            shape, opcode, operands, attributes = _split_call(match.group(2))
            computations[current].append(Instruction(match.group(1), shape, opcode, operands, attributes))
    return computations, entry


def _dims(shape: str) -> list[int]:
    found = _ARRAY.search(shape)
    return [int(d) for d in found.group(2).split(",") if d] if found else []


def _matmul(instr: Instruction, shapes: dict[str, str]) -> tuple[float, int]:
    """``(FLOPs, contraction size)`` of a convolution or dot."""
    out = _elements(",".join(map(str, _dims(instr.shape))))
    operand_shapes = _ARRAY.findall(instr.operands)
    if len(operand_shapes) < 2:  # operands printed without shapes: look them up by name
        names = re.findall(r"%([\w.\-]+)", instr.operands)
        operand_shapes = [_ARRAY.search(shapes.get(n, "")).groups() for n in names if _ARRAY.search(shapes.get(n, ""))]
    lhs = [int(d) for d in operand_shapes[0][1].split(",") if d]
    rhs = [int(d) for d in operand_shapes[1][1].split(",") if d]
    if instr.opcode == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attributes)
        k = _elements(",".join(str(lhs[int(i)]) for i in contracting.group(1).split(",") if i)) if contracting else 1
    else:
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attributes)
        if labels:
            spatial_in = {c: n for c, n in zip(labels.group(1), lhs) if c.isdigit()}
            spatial_out = {c: n for c, n in zip(labels.group(3), _dims(instr.shape)) if c.isdigit()}
            k = _elements(",".join(str(d) for d in _kernel_contraction(rhs, labels.group(2), instr.attributes,
                                                                       spatial_in, spatial_out)))
        else:
            k = 1
    return 2.0 * out * k, k


def _window(attributes: str, key: str, rank: int) -> list[int]:
    found = re.search(rf"\b{key}=([\dx]+)", attributes)
    return [int(v) for v in found.group(1).split("x")] if found else [1] * rank


def _kernel_contraction(rhs: list[int], labels: str, attributes: str, spatial_in: dict, spatial_out: dict
                        ) -> list[int]:
    """The kernel's contracted extents: every dimension but the output-feature one (``o``), a spatial one
    counted by the taps that meet real input. The TPU compiler writes batched matmuls (attention's
    ``bnqh,bnkh->bnqk``) as convolutions whose batch dims are windows of size n over an lhs dilated by n,
    where only one tap in n meets a real element, or as windows of size n over a size-1 input padded by n-1:
    counting the full window would overstate FLOPs n-fold. Without dilation the taps per output are the
    window's average overlap with the real input: min(size, input x size / output)."""
    spatial = [c for c in labels if c.isdigit()]
    sizes = _window(attributes, "size", len(spatial))
    dilation = _window(attributes, "lhs_dilate", len(spatial))
    extents = []
    for extent, label in zip(rhs, labels):
        if label == "o":
            continue
        if label.isdigit():
            d = int(label)
            if d < len(sizes) and dilation[d] > 1:
                extent = -(-sizes[d] // dilation[d])
            elif d < len(sizes) and spatial_out.get(label):
                extent = max(1, min(sizes[d], round(spatial_in.get(label, 1) * sizes[d] / spatial_out[label])))
        extents.append(extent)
    return extents


@dataclasses.dataclass
class OpCost:
    name: str
    kind: str
    part: str
    flops: float
    bytes: float
    seconds: float
    min_contraction: int
    op_name: str


def _op_name(attributes: str) -> str:
    found = re.search(r'op_name="([^"]*)"', attributes)
    return found.group(1) if found else ""


def _part(op_name: str) -> str:
    part = next((name for cls, name in _PARTS if cls in op_name), "other (noise, loss, optimizer, adapter)")
    if part == "unet":
        part = "unet backward" if "transpose(" in op_name else "unet forward"
    return part


def op_costs(text: str, peak_flops: float, hbm_bandwidth: float) -> list[OpCost]:
    computations, entry = parse_hlo(text)
    shapes = {i.name: i.shape for body in computations.values() for i in body}
    costs = []

    def matmuls(computation: str, seen: set) -> list[tuple[float, int, str]]:
        found = []
        for instr in computations.get(computation, []):
            if instr.opcode in ("convolution", "dot"):
                flops, k = _matmul(instr, shapes)
                found.append((flops, k, instr.attributes))
            for called in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", instr.attributes):
                if called not in seen:
                    seen.add(called)
                    found += matmuls(called, seen)
        return found

    def named(computation: str) -> str:
        """The op_name most of a fused computation's instructions carry (fusions often carry none)."""
        names = [_op_name(i.attributes) for i in computations.get(computation, [])]
        parts = collections.Counter(_part(n) for n in names if n)
        if not parts:
            return ""
        best = parts.most_common(1)[0][0]
        return next(n for n in names if n and _part(n) == best)

    for instr in computations[entry]:
        if instr.opcode in _FREE or instr.opcode.endswith(("-start", "-done")) and instr.opcode not in _COLLECTIVES:
            continue
        if 'custom_call_target="ConcatBitcast"' in instr.attributes:
            continue
        inner = []
        if instr.opcode in ("convolution", "dot"):
            flops, k = _matmul(instr, shapes)
            inner = [(flops, k, instr.attributes)]
        else:
            for called in re.findall(r"calls=%?([\w.\-]+)", instr.attributes):
                inner += matmuls(called, {called})
        flops = sum(f for f, _, _ in inner)
        operand_names = re.findall(r"%([\w.\-]+)", instr.operands)
        nbytes = _array_bytes(instr.shape) + sum(_array_bytes(shapes.get(n, "")) for n in operand_names)
        declared = re.search(r'"cost_estimate":\{"flops":"(\d+)"[^}]*"bytes_accessed":"(\d+)"', instr.attributes)
        if declared:  # a Pallas kernel: the FLOPs and bytes its cost estimate declares, as XLA's model takes them
            flops, nbytes = float(declared.group(1)), float(declared.group(2))
        seconds = max(flops / peak_flops, nbytes / hbm_bandwidth)
        if instr.opcode == "custom-call":
            kind = "Pallas kernel (declared cost)" if declared else "custom call"
        elif any(instr.opcode.startswith(c) for c in _COLLECTIVES):
            kind = "collective"
        elif inner:
            kind = "matmul, FLOP-bound" if flops / peak_flops >= nbytes / hbm_bandwidth else "matmul, HBM-bound"
        elif instr.opcode in _MOVES:
            kind = "data movement (copies, transposes, pads)"
        else:
            kind = "elementwise / reduction (norms, activations)"
        op_name = _op_name(inner[0][2] if inner else instr.attributes)
        if not op_name:
            op_name = next((named(c) for c in re.findall(r"calls=%?([\w.\-]+)", instr.attributes)), "")
        costs.append(OpCost(instr.name, kind, _part(op_name), flops, nbytes, seconds,
                            min((k for _, k, _ in inner), default=0), op_name))
    return costs


def summarize(costs: list[OpCost], key) -> list[tuple[str, float, float, float, int]]:
    """``(group, seconds, FLOPs, bytes, ops)`` per group, most time first."""
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for c in costs:
        g = groups[key(c)]
        g[0] += c.seconds
        g[1] += c.flops
        g[2] += c.bytes
        g[3] += 1
    return sorted(((k, *v) for k, v in groups.items()), key=lambda r: -r[1])


def layer_kind(c: OpCost) -> str:
    """What kind of layer an op belongs to, from its op_name: attention's batched matmuls (and the softmax
    fused into them), convolutions, other matmuls (projections, feed-forward), or the rest (norms,
    activations, noise, loss, optimizer)."""
    name = c.op_name.rsplit("/", 2)
    tail = "/".join(name[-2:])
    if re.search(r"bn\w*,bn\w*->bn", tail) or "flash_attention" in c.op_name:
        return "attention core (QK^T / softmax / PV)"
    if c.flops and "conv_general_dilated" in tail:
        return "convolutions"
    if c.flops:
        return "dense matmuls (projections, feed-forward)"
    return "norms, activations, elementwise, optimizer"


def report(text: str, peak_flops: float, hbm_bandwidth: float, top: int = 20) -> list[str]:
    costs = op_costs(text, peak_flops, hbm_bandwidth)
    total = sum(c.seconds for c in costs)
    flops = sum(c.flops for c in costs)
    lines = [f"[compiler-estimate re-derivation] per-op roofline: {1e3 * total:.1f} ms, {flops / 1e12:.2f} TFLOP "
             f"of matmul ({100 * flops / peak_flops / total:.0f}% of peak over that time), {len(costs)} ops"]
    for title, key in (("by kind", lambda c: c.kind), ("by model part", lambda c: c.part),
                       ("by layer kind", layer_kind),
                       ("by model part and kind", lambda c: f"{c.part} / {c.kind}")):
        lines.append(f"{title}:")
        for group, seconds, f, b, n in summarize(costs, key):
            lines.append(f"  {group:<50} {1e3 * seconds:8.1f} ms {100 * seconds / total:5.1f}%  "
                         f"{f / 1e12:7.2f} TFLOP  {b / 1e9:7.1f} GB  {n:5d} ops")
    lines.append(f"top {top} ops by time:")
    for c in sorted(costs, key=lambda c: -c.seconds)[:top]:
        lines.append(f"  {1e3 * c.seconds:7.2f} ms  {c.kind:<30} {c.flops / 1e9:8.1f} GFLOP {c.bytes / 1e6:8.1f} MB"
                     f"  k={c.min_contraction:<5} {c.op_name[-110:]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hlo")
    parser.add_argument("--peak", type=float, default=197e12, help="bf16 FLOP/s per chip (v5e: 197e12)")
    parser.add_argument("--hbm", type=float, default=819e9, help="HBM bytes/s per chip (v5e: 819e9)")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    with open(args.hlo) as f:
        print("\n".join(report(f.read(), args.peak, args.hbm, args.top)))


if __name__ == "__main__":
    main()
