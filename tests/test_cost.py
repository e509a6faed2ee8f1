"""Cost model: analytic FLOPs/params against counted ones, latency calibration mechanics."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from vitcompress.convert import convert
from vitcompress.cost import (
    DYNAMIC,
    STATIC,
    LatencyModel,
    base_flops,
    fit_quadratic,
    glad_macs_per_channel,
    model_geometry,
    plan_flops,
    plan_layout,
    plan_params,
    time_interleaved,
    torch_threads,
)
from vitcompress.errors import UnsupportedModelError, VitcompressError
from vitcompress.flops import count_flops
from vitcompress.plan import Plan, Reduction

VARIANTS = [
    ("deit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),  # 2 prefix tokens, 2 heads
    ("deit3_small_patch16_224", {}),  # LayerScale
    ("vit_small_patch16_224", {"reg_tokens": 4, "global_pool": "avg", "class_token": False}),
    ("vit_small_patch16_224", {"qkv_bias": False, "qk_norm": True, "mlp_ratio": 3.0}),
]
GEOMETRY = dict(img_size=64, patch_size=8, depth=6)  # 8x8 grid


def _plan_for(model: torch.nn.Module) -> Plan:
    g = model_geometry(model)
    return Plan(
        static_layers=[0, 2],
        reductions=[Reduction(3, [4, 2, 1]), Reduction(5, [2, 1])],
        num_blocks=g.depth,
        num_prefix_tokens=g.num_prefix_tokens,
        grid=g.grid,
    )


@pytest.mark.parametrize("arch, kwargs", VARIANTS)
def test_analytic_flops_and_params_equal_counted_ones(arch: str, kwargs: dict) -> None:
    model = tiny_vit(arch, **GEOMETRY, **kwargs)
    geom = model_geometry(model)
    assert base_flops(geom) == count_flops(model)
    assert geom.params == sum(p.numel() for p in model.parameters())
    plan = _plan_for(model)
    converted = convert(model, plan)
    assert plan_flops(geom, plan) == count_flops(converted)
    assert plan_params(geom, plan) == sum(p.numel() for p in converted.parameters())


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
    assert layout.blocks == ((STATIC, 65), (DYNAMIC, 65), (STATIC, 65), (DYNAMIC, 22), (DYNAMIC, 22), (DYNAMIC, 6))
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


def test_fit_quadratic_recovers_exact_coefficients() -> None:
    a, b, c = 0.5, 0.01, 2e-4
    points = [(n, a + b * n + c * n * n) for n in (5, 20, 60, 197)]
    assert fit_quadratic(points) == pytest.approx([a, b, c], rel=1e-9)
    assert fit_quadratic([(10, 3.0)]) == [3.0, 0.0, 0.0]  # one point: a constant


def test_time_interleaved_calls_each_function_in_every_round() -> None:
    calls = {"a": 0, "b": 0}

    def make(name: str):
        def fn() -> None:
            calls[name] += 1

        return fn

    table = time_interleaved([make("a"), make("b")], torch.device("cpu"), rounds=4, round_seconds=0.0)
    assert len(table) == 4 and all(len(row) == 2 and min(row) >= 0 for row in table)
    assert calls == {"a": 5, "b": 5}  # one warm-up call and one call per round (round_seconds=0)


def test_torch_threads_sets_and_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(VitcompressError, match="threads"):
        with torch_threads(0):
            pass


def test_calibration_times_the_parts_and_the_plans_own_cases() -> None:
    model = tiny_vit(**GEOMETRY)
    geom = model_geometry(model)
    lat = LatencyModel.calibrate(model, batch_size=2, threads=1, token_counts=[6, 22], glads=[((4, 2, 1), ((8, 8),))], rounds=2)
    assert (lat.device, lat.threads, lat.batch_size) == ("cpu", 1, 2)
    assert set(lat.block_times) == {(DYNAMIC, 65), (STATIC, 65), (DYNAMIC, 6), (DYNAMIC, 22)}
    assert lat.block_times[(DYNAMIC, 65)] == lat.reference_s > 0
    assert lat.fixed_s > 0 and all(t > 0 for t in lat.glad_times.values())
    layout = plan_layout(geom, _plan_for(model))
    assert not lat.measured(layout)  # the second GLAD stage was not timed
    estimate = lat.glad_s((2, 1), ((4, 4), (2, 2), (1, 1)))
    timed = lat.glad_times[((4, 2, 1), ((8, 8),))]
    assert estimate == pytest.approx(timed * (5 * 21) / (21 * 64))  # scaled by multiply-adds
    lat.ensure(layout)
    assert lat.measured(layout)
    total, blocks, glads = lat.layout_s(layout)
    assert blocks[0] == lat.block_times[(STATIC, 65)] and blocks[5] == lat.block_times[(DYNAMIC, 6)]
    assert total == pytest.approx(lat.fixed_s + sum(blocks) + sum(glads))
    data = lat.to_dict()
    assert {(d["kind"], d["tokens"]) for d in data["blocks_ms"]} == set(lat.block_times)


def test_untimed_cases_come_from_the_fit() -> None:
    lat = LatencyModel(device="cpu", threads=1, batch_size=1, num_tokens=100, reference_s=1.2)
    a, b, c = 0.1, 0.001, 1e-4
    for n in (10, 40, 100):
        lat.block_times[(DYNAMIC, n)] = a + b * n + c * n * n
    lat.block_times[(STATIC, 100)] = 0.6
    assert lat.block_s(DYNAMIC, 70) == pytest.approx(a + b * 70 + c * 4900)
    assert lat.block_s(STATIC, 70) == pytest.approx(0.6 / 1.2 * (a + b * 70 + c * 4900))
    with pytest.raises(VitcompressError, match="calibrate again"):
        lat.ensure(plan_layout(model_geometry(tiny_vit(**GEOMETRY)), _plan_for(tiny_vit(**GEOMETRY))))
