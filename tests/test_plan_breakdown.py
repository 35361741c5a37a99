"""plan.breakdown (per-op roofline over compiled HLO) and plan.table (the TPU_PLANS.md table) on
hand-written inputs whose answers are worked out by hand below."""

from __future__ import annotations

import pytest

from ipadapter_jax.plan.breakdown import layer_kind, op_costs, report
from ipadapter_jax.plan.table import command_writing, row, table

PEAK, HBM = 100e12, 1e12

# Shapes and attribute syntax as the TPU compiler prints them (operands by name only, layouts with tiles).
HLO = """
HloModule jit_train_step

%fused_dense (param_0: bf16[8,4096,320], param_1: bf16[320,2560]) -> bf16[8,4096,2560] {
  %param_0 = bf16[8,4096,320]{2,1,0} parameter(0)
  %param_1 = bf16[320,2560]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,4096,2560]{2,1,0} dot(%param_0, %param_1), lhs_contracting_dims={2}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/jvp(UNet2DConditionModel)/up_blocks_3/ff/net_0/proj/dot_general"}
}

%fused_norm (param_0.1: bf16[8,64,64,320]) -> bf16[8,64,64,320] {
  %param_0.1 = bf16[8,64,64,320]{3,2,1,0} parameter(0)
  ROOT %exponential.1 = bf16[8,64,64,320]{3,2,1,0} exponential(%param_0.1), metadata={op_name="jit(train_step)/transpose(jvp(UNet2DConditionModel))/down_blocks_0/resnets_0/norm1/reduce"}
}

ENTRY %main (param.1: bf16[8,64,64,320], param.2: bf16[3,3,320,320], param.3: bf16[8,4096,320], param.4: bf16[320,2560], param.5: bf16[8,8,4096,40]) -> bf16[8,64,64,320] {
  %param.1 = bf16[8,64,64,320]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %param.2 = bf16[3,3,320,320]{3,2,1,0:T(8,128)(2,1)} parameter(1)
  %param.3 = bf16[8,4096,320]{2,1,0} parameter(2)
  %param.4 = bf16[320,2560]{1,0} parameter(3)
  %param.5 = bf16[8,8,4096,40]{3,2,1,0} parameter(4)
  %copy-start = (bf16[320,2560]{1,0:S(1)}, bf16[320,2560]{1,0}, u32[]) copy-start(%param.4)
  %copy-done = bf16[320,2560]{1,0:S(1)} copy-done(%copy-start)
  %convolution.1 = bf16[8,64,64,320]{3,2,1,0:T(8,128)(2,1)} convolution(%param.1, %param.2), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/jvp(UNet2DConditionModel)/down_blocks_0/resnets_0/conv1/conv_general_dilated"}
  %convolution-base-dilated.1 = f32[8,8,4096,4096]{2,3,1,0:T(8,128)} convolution(%param.5, %param.5), window={size=8x8 stride=7x7 lhs_dilate=8x8}, dim_labels=01bf_01oi->01bf, metadata={op_name="jit(train_step)/jvp(UNet2DConditionModel)/down_blocks_0/attentions_0/transformer_blocks_0/attn1/bnqh,bnkh->bnqk/dot_general"}
  %fusion.1 = bf16[8,4096,2560]{2,1,0} fusion(%param.3, %copy-done), kind=kOutput, calls=%fused_dense
  %flash_attention_forward.1 = (bf16[8,8,4096,40]{3,2,1,0}, f32[8,8,1,4096]{3,2,1,0}) custom-call(%param.5, %param.5, %param.5), custom_call_target="tpu_custom_call", metadata={op_name="jit(train_step)/jvp(UNet2DConditionModel)/down_blocks_0/attentions_0/transformer_blocks_0/attn1/shard_map/flash_attention_forward/pallas_call"}, backend_config={"custom_call_config":{"body":"TUzvUg","cost_estimate":{"flops":"171798691840","transcendentals":"1073741824","bytes_accessed":"378535936","remote_bytes_transferred":"0"}}}
  %concat-bitcast.1 = bf16[8,4096,320]{2,1,0} custom-call(%param.3), custom_call_target="ConcatBitcast"
  ROOT %fusion.2 = bf16[8,64,64,320]{3,2,1,0} fusion(%convolution.1), kind=kLoop, calls=%fused_norm
}
"""


def test_op_costs_by_hand():
    costs = {c.name: c for c in op_costs(HLO, PEAK, HBM)}
    # The async copy (an HBM -> VMEM prefetch overlapping compute) and the parameters are not timed.
    # ConcatBitcast is a zero-cost view (the cost model's -1 s).
    assert set(costs) == {"convolution.1", "convolution-base-dilated.1", "fusion.1", "fusion.2",
                          "flash_attention_forward.1"}
    act = 8 * 64 * 64 * 320 * 2

    conv = costs["convolution.1"]
    # 3x3 window, padding 1: 9 taps per output almost everywhere (edges: 9 x 64/64 rounds to 9).
    assert conv.flops == 2 * 8 * 64 * 64 * 320 * (3 * 3 * 320) and conv.min_contraction == 2880
    assert conv.bytes == 2 * act + 3 * 3 * 320 * 320 * 2
    assert conv.seconds == pytest.approx(max(conv.flops / PEAK, conv.bytes / HBM))
    assert conv.kind == "matmul, FLOP-bound" and conv.part == "unet forward"

    logits = costs["convolution-base-dilated.1"]
    # A batched matmul in convolution form: one real tap per dilated window, contraction over head_dim 40.
    assert logits.flops == 2 * 8 * 8 * 4096 * 4096 * 40 and logits.min_contraction == 40
    assert logits.bytes == 8 * 8 * 4096 * 4096 * 4 + 2 * (8 * 8 * 4096 * 40 * 2)
    assert logits.kind == "matmul, HBM-bound"
    assert layer_kind(logits) == "attention core (QK^T / softmax / PV)"

    dense = costs["fusion.1"]
    assert dense.flops == 2 * 8 * 4096 * 2560 * 320 and dense.part == "unet forward"
    assert layer_kind(dense) == "dense matmuls (projections, feed-forward)"

    kernel = costs["flash_attention_forward.1"]
    # A Pallas kernel is timed from the cost estimate it declares, as XLA's cost model does.
    assert kernel.flops == 171798691840 and kernel.bytes == 378535936
    assert kernel.kind == "Pallas kernel (declared cost)" and kernel.part == "unet forward"
    assert layer_kind(kernel) == "attention core (QK^T / softmax / PV)"

    norm = costs["fusion.2"]
    # No op_name on the fusion itself: the part comes from its fused computation; backward through transpose.
    assert norm.flops == 0 and norm.bytes == 2 * act and norm.part == "unet backward"
    assert norm.kind == "elementwise / reduction (norms, activations)"
    assert layer_kind(norm) == "norms, activations, elementwise, optimizer"


def test_report_totals():
    lines = report(HLO, PEAK, HBM, top=2)
    total = sum(c.seconds for c in op_costs(HLO, PEAK, HBM))
    assert f"{1e3 * total:.1f} ms" in lines[0]
    assert any(line.startswith("by layer kind") for line in lines)
    top = lines[lines.index("top 2 ops by time:") + 1:]
    assert len(top) == 2 and "attn1/bnqh,bnkh->bnqk" in top[0]  # the materialised logits lead


RECORD = {"command": "python -m ipadapter_jax.tools.tpu_plan --config configs/sd15.py --topology v5e-8 "
                     "--json /tmp/x.json --hlo /tmp/x.hlo",
          "what": "train", "latents": "cached",
          "program": ["train step (cached latents): global batch 64, 512px, compute bfloat16, attention pallas, "
                      "remat False, grad accumulation 1"],
          "mesh": {"data": 8, "fsdp": 1}, "topology": "v5e-8", "num_chips": 8, "images_per_step": 64,
          "total_bytes": 15 * 2**30, "hbm_capacity_bytes": 16 * 2**30, "fits": True, "step_seconds": 0.2,
          "images_per_second_per_chip": 40.0, "mfu": 0.5}


def test_table_row_and_command():
    assert row(3, RECORD) == ["3", "sd15", "v5e-8", "train", "cached", "64 (8)", "data=8 x fsdp=1", "False",
                              "pallas", "15.0 / 16 GiB", "200 ms", "40.0", "50.0%"]
    # A plan recorded under the command's old name prints its current one.
    assert command_writing(RECORD, "benchmarks/tpu_plans/a.json") == (
        "python -m ipadapter_jax.plan --config configs/sd15.py --topology v5e-8 "
        "--json benchmarks/tpu_plans/a.json")
    lines = table([RECORD])
    assert lines[0].startswith("| # | config") and lines[2].startswith("| 1 | sd15")
    assert lines[-1].startswith("| 1 | `python -m ipadapter_jax.plan --config")
