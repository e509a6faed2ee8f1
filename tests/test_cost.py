"""Cost model: analytic FLOPs/params (static attention, token aggregation, token merging) against
the ones counted on converted models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_vit
from vitcompress.convert import convert
from vitcompress.cost import (
    DYNAMIC,
    STATIC,
    LatencyTable,
    base_flops,
    block_halves,
    layout_seconds,
    layout_token_counts,
    table_speedup,
    flop_speedup,
    glad_macs_per_channel,
    merge_macs,
    model_geometry,
    plan_flops,
    plan_layout,
    plan_params,
)
from vitcompress.errors import UnsupportedModelError, VitcompressError
from vitcompress.flops import count_flops
from vitcompress.plan import Plan, Reduction, tome_plan

VARIANTS = [
    ("deit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),  # 2 prefix tokens, 2 heads
    ("deit3_small_patch16_224", {}),  # LayerScale
    ("vit_small_patch16_224", {"reg_tokens": 4, "global_pool": "avg", "class_token": False}),
    ("vit_small_patch16_224", {"qkv_bias": False, "qk_norm": True, "mlp_ratio": 3.0}),
]
GEOMETRY = dict(img_size=64, patch_size=8, depth=6)  # 8x8 grid


def _plan_for(model: torch.nn.Module, **changes) -> Plan:
    g = model_geometry(model)
    fields = dict(static_layers=[0, 2], reductions=[Reduction(3, [4, 2, 1]), Reduction(5, [2, 1])])
    return Plan(num_blocks=g.depth, num_prefix_tokens=g.num_prefix_tokens, grid=g.grid, **{**fields, **changes})


def _plans_for(model: torch.nn.Module) -> dict[str, Plan]:
    return {
        "static + glad": _plan_for(model),
        "static only": _plan_for(model, reductions=[]),
        "adaptive glad": _plan_for(model, glad_mode="adaptive"),
        "simplex glad": _plan_for(model, glad_mode="simplex"),
        "tome constant": tome_plan(model, 2),
        "tome on the keys": dataclasses.replace(tome_plan(model, 2), tome_metric="keys"),
        "tome decreasing": tome_plan(model, 5, kind="decreasing"),
        "tome clipped": tome_plan(model, 40),  # more than the later blocks can merge: clipped
        "static then tome": _plan_for(model, static_layers=[0], reductions=[], merge_r=[0, 6, 5, 4, 3, 0]),
    }


@pytest.mark.parametrize("arch, kwargs", VARIANTS)
def test_analytic_flops_and_params_equal_counted_ones(arch: str, kwargs: dict) -> None:
    model = tiny_vit(arch, **GEOMETRY, **kwargs)
    geom = model_geometry(model)
    assert base_flops(geom) == count_flops(model)
    assert geom.params == sum(p.numel() for p in model.parameters())
    for name, plan in _plans_for(model).items():
        converted = convert(model, plan)
        assert plan_flops(geom, plan) == count_flops(converted), name
        assert plan_params(geom, plan) == sum(p.numel() for p in converted.parameters()), name
        assert flop_speedup(geom, plan) == base_flops(geom) / count_flops(converted) > 1.0, name


def test_token_merging_costs_attention_on_n_matching_then_mlp_on_n_minus_r() -> None:
    model = tiny_vit(**GEOMETRY)  # C = 32, 2 heads of 16, MLP ratio 4, one prefix token
    block = model_geometry(model).blocks[0]
    c, d, n, r = 32, 16, 65, 7
    attention = n * 4 * c * c + 2 * n * n * c
    matching = 32 * 32 * c  # A and B: 32 patch tokens each, similarity on the tokens themselves
    assert merge_macs(n, 1, c) == matching and merge_macs(n + 1, 1, c) == 33 * 32 * c
    assert block.macs(n, merge=r) == attention + matching + (n - r) * 8 * c * c
    assert block.macs(n, merge=r, metric="keys") == attention + 32 * 32 * d + (n - r) * 8 * c * c  # keys: head dim
    assert block.macs(n, merge=0) == block.macs(n)  # r = 0: no matching either
    assert block.macs(n, merge=r, num_prefix_tokens=2) == attention + 32 * 31 * c + (n - r) * 8 * c * c


def test_merging_layout_follows_the_schedule() -> None:
    model = tiny_vit(**GEOMETRY)
    plan = tome_plan(model, 5, kind="decreasing")
    assert plan.merges() == [10, 8, 6, 4, 2, 0] and plan.method == "tome"
    layout = plan_layout(model_geometry(model), plan)
    assert layout.blocks == tuple((DYNAMIC, n, r) for n, r in zip([65, 55, 47, 41, 37, 35], [10, 8, 6, 4, 2, 0]))
    assert layout.glads == ()
    clipped = tome_plan(model, 40).merges()
    assert clipped[0] == 32 and sum(clipped) <= 63  # at most every A token, at least one patch token left


def test_block_macs_follow_the_textbook_formula() -> None:
    model = tiny_vit(**GEOMETRY)  # C = 32, 2 heads, MLP ratio 4
    block = model_geometry(model).blocks[0]
    c, n = 32, 65
    dynamic = n * (3 * c * c + c * c + 2 * 4 * c * c) + 2 * n * n * c
    static = n * (c * c + c * c + 2 * 4 * c * c) + n * n * c
    assert block.macs(n) == dynamic
    assert block.macs(n, static=True) == static
    assert block.static_params_delta(n) == 2 * n * n - (2 * c * c + 2 * c)  # H*N*N logits in, q/k weights+bias out
    assert glad_macs_per_channel([4, 2, 1], [(8, 8)]) == 21 * 64


def test_layout_follows_the_plan() -> None:
    model = tiny_vit(**GEOMETRY)
    layout = plan_layout(model_geometry(model), _plan_for(model))
    assert layout.blocks == ((STATIC, 65, 0), (DYNAMIC, 65, 0), (STATIC, 65, 0), (DYNAMIC, 22, 0), (DYNAMIC, 22, 0), (DYNAMIC, 6, 0))
    assert layout.glads == ((3, (4, 2, 1), ((8, 8),)), (5, (2, 1), ((4, 4), (2, 2), (1, 1))))


def test_plan_for_another_model_is_refused() -> None:
    model = tiny_vit(**GEOMETRY)
    plan = _plan_for(model)
    plan.num_blocks = 12
    with pytest.raises(VitcompressError, match="make the plan for this model"):
        plan_flops(model_geometry(model), plan)


def test_converted_model_is_not_planned_again() -> None:
    model = tiny_vit(**GEOMETRY)
    converted = convert(model, _plan_for(model))
    with pytest.raises(UnsupportedModelError, match="already converted"):
        model_geometry(converted)


# ---- latency from a measured table -----------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"init_values": 0.1}])  # LayerScale on: DeiT-III's blocks
def test_the_halves_of_a_block_compose_to_the_block_exactly(kwargs: dict) -> None:
    block = tiny_vit(**kwargs).blocks[1].eval()
    halves = block_halves(block)
    x = torch.randn(2, 17, block.norm1.normalized_shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(halves["mlp"](halves["attention"](x)), block(x))


def test_a_block_without_the_residual_branches_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="the block has no norm1, .*: not a standard timm ViT block"):
        block_halves(torch.nn.Linear(4, 4))


def test_the_table_adds_up_attention_on_n_and_mlp_on_n_minus_r() -> None:
    model = tiny_vit()  # 4 blocks, 4x4 grid, 17 tokens
    geom = model_geometry(model)
    table = LatencyTable(attention={n: 10.0 + n for n in range(1, 18)}, mlp={n: 2.0 * n for n in range(1, 18)})
    merging = tome_plan(model, 3)  # tokens 17, 14, 11, 8; MLPs on 14, 11, 8, 5
    layout = plan_layout(geom, merging)
    assert layout_token_counts([layout]) == [5, 8, 11, 14, 17]
    assert layout_seconds(geom, layout, table) == sum(10 + n for n in (17, 14, 11, 8)) + sum(2 * n for n in (14, 11, 8, 5))
    assert table_speedup(geom, merging, table) == pytest.approx(4 * (27 + 34) / (90 + 76))
    # a static block's attention: the table's dynamic attention scaled by its share of the MACs
    static = Plan(static_layers=[0], num_blocks=4, num_prefix_tokens=1, grid=(4, 4))
    g, n = geom.blocks[0], 17
    share = (g.macs(n, static=True) - n * g.mlp_macs) / (g.macs(n) - n * g.mlp_macs)
    assert 0 < share < 1
    assert layout_seconds(geom, plan_layout(geom, static), table) == pytest.approx(4 * 61 - 27 * (1 - share))
    assert table_speedup(geom, Plan(num_blocks=4, num_prefix_tokens=1, grid=(4, 4)), table) == 1.0
