"""Damage: KL of the class distributions against the original on calibration images, measured on
whole plans and, from cached block inputs, on changes that start at one block."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from vitcompress.convert import convert
from vitcompress.damage import Damage, DamageMeter, Difference
from vitcompress.errors import VitcompressError
from vitcompress.plan import tome_plan
from vitcompress.plan_types import Plan, Reduction

GEOMETRY = dict(img_size=32, patch_size=8, depth=4)  # 4x4 grid, 17 tokens


def _images(n: int, size: int = 32, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _plan(**kwargs) -> Plan:
    return Plan(num_blocks=4, num_prefix_tokens=1, grid=(4, 4), **kwargs)


@pytest.fixture(scope="module")
def model64() -> torch.nn.Module:
    # float64: the cached path and the whole forward pass then agree to rounding far below any damage.
    return tiny_vit(**GEOMETRY).double()


@pytest.fixture(scope="module")
def meter64(model64: torch.nn.Module) -> DamageMeter:
    # batch 4 over 10 images: several chunks, the last one short. One thread, as the tests run
    # (module fixtures start before conftest's per-test one): another thread count sums in
    # another order, which would show as a 1e-17 "damage" of the empty plan.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return DamageMeter(model64, _images(10, dtype=torch.float64), batch_size=4)
    finally:
        torch.set_num_threads(threads)


def test_an_empty_plan_does_no_damage(meter64: DamageMeter) -> None:
    empty = _plan()
    assert meter64.whole(empty) == Damage(kl=0.0, agreement=1.0, images=10)
    for block in range(4):
        assert meter64.from_block(empty, block) == Damage(kl=0.0, agreement=1.0, images=10)


def test_an_empty_plan_does_no_damage_in_float32_either() -> None:
    model = tiny_vit(**GEOMETRY)
    meter = DamageMeter(model, _images(6), batch_size=4)
    assert meter.whole(_plan()) == Damage(0.0, 1.0, 6)


@pytest.mark.parametrize(
    "plan, first",
    [
        (_plan(static_layers=[0]), 0),
        (_plan(static_layers=[2]), 2),
        (_plan(static_layers=[2, 3]), 2),
        (_plan(reductions=[Reduction(1, [2, 1])]), 1),
        (_plan(reductions=[Reduction(3, [1])]), 3),
        (_plan(static_layers=[1], reductions=[Reduction(2, [3, 1]), Reduction(3, [1])]), 1),
        (_plan(merge_r=[0, 0, 3, 2]), 2),  # token merging from block 2: its sizes start over per batch
        (_plan(merge_r=[4, 3, 2, 1]), 0),
    ],
    ids=lambda v: v.describe() if isinstance(v, Plan) else str(v),
)
def test_from_block_equals_the_whole_forward_pass(meter64: DamageMeter, plan: Plan, first: int) -> None:
    whole, part = meter64.whole(plan), meter64.from_block(plan, first)
    assert whole.kl > 0  # the plan changes something: the comparison is not 0 == 0
    assert part.images == whole.images == 10
    assert part.kl == pytest.approx(whole.kl, rel=1e-9, abs=1e-15)
    assert part.agreement == whole.agreement
    assert meter64.from_block(plan, first) == part  # repeatable: no state left behind


def test_from_block_uses_the_first_part_images(model64: torch.nn.Module) -> None:
    images = _images(10, dtype=torch.float64)
    plan = _plan(reductions=[Reduction(2, [2, 1])])
    some = DamageMeter(model64, images, batch_size=4, part_images=6)
    first_six = DamageMeter(model64, images[:6], batch_size=4)
    assert some.from_block(plan, 2).images == 6 and some.whole(plan).images == 10
    assert some.from_block(plan, 2).kl == pytest.approx(first_six.whole(plan).kl, rel=1e-9)


def test_damage_is_a_kl_and_an_agreement(meter64: DamageMeter) -> None:
    d = meter64.whole(_plan(static_layers=[0, 1, 2, 3]))
    assert d.kl > 0 and 0.0 <= d.agreement <= 1.0
    assert d.to_dict() == {"kl": d.kl, "kl_se": d.kl_se, "agreement": d.agreement, "images": 10}


# ---- a trained model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_meter() -> DamageMeter:
    from vitcompress.models import load_model
    from vitcompress.pipeline import calibration_images, load_train_val

    model, spec = load_model("demo")  # 8x8 grid, 8 blocks, trained on the digits
    train, _ = load_train_val("demo", spec.data_config, log=lambda message: None)
    return DamageMeter(model, calibration_images(train, 32))


def _demo_plan(**kwargs) -> Plan:
    return Plan(num_blocks=8, num_prefix_tokens=1, grid=(8, 8), **kwargs)


def test_more_aggressive_aggregation_does_more_damage_on_a_trained_model(demo_meter: DamageMeter) -> None:
    for block in (1, 4, 7):
        damage = [demo_meter.from_block(_demo_plan(reductions=[Reduction(block, scales)]), block).kl
                  for scales in ([6, 3, 1], [4, 1], [2, 1], [1])]  # 46, 17, 5, 1 tokens kept
        assert 0 < damage[0] < damage[1] < damage[2] < damage[3], (block, damage)
    early, late = (demo_meter.from_block(_demo_plan(reductions=[Reduction(b, [2, 1])]), b).kl for b in (1, 7))
    assert early > late  # aggregating sooner leaves more blocks on fewer tokens


def test_merging_more_tokens_does_more_damage_on_a_trained_model(demo_meter: DamageMeter) -> None:
    model = demo_meter.model
    damage = [demo_meter.whole(tome_plan(model, r)).kl for r in (1, 3, 6)]
    assert 0 < damage[0] < damage[1] < damage[2]


# ---- bad images --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "images, message",
    [
        (torch.randn(3, 32, 32), r"\[N, C, H, W\] batch"),
        (torch.randn(0, 3, 32, 32), r"\[N, C, H, W\] batch"),
        (torch.randn(2, 3, 64, 64), r"calibration images are \[3, 64, 64\].*model takes \[3, 32, 32\]"),
        (torch.randn(2, 1, 32, 32), r"calibration images are \[1, 32, 32\].*model takes \[3, 32, 32\]"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "not floating point"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
    ],
    ids=["3d", "empty", "size", "channels", "uint8", "nan"],
)
def test_bad_images_are_refused_saying_why(images: torch.Tensor, message: str) -> None:
    with pytest.raises(VitcompressError, match=message):
        DamageMeter(tiny_vit(**GEOMETRY), images)


def test_whole_on_the_first_images_is_the_meter_of_those_images_and_extends_without_remeasuring(model64) -> None:
    images = _images(10, dtype=torch.float64)
    plan = _plan(merge_r=[4, 3, 2, 1])
    meter = DamageMeter(model64, images, batch_size=4)
    first = meter.whole(plan, 6)
    _assert_same(first, DamageMeter(model64, images[:6], batch_size=4).whole(plan))
    assert first.images == 6 and meter.whole(plan, 99).images == 10  # capped at what the meter holds
    # (the images 6-9 measured as one more batch: the same figures to rounding)
    _assert_same(meter.whole(plan), DamageMeter(model64, images, batch_size=4).whole(plan))


def _assert_same(a: Damage, b: Damage) -> None:
    assert (a.images, a.agreement) == (b.images, b.agreement)
    assert a.kl == pytest.approx(b.kl, rel=1e-9) and a.kl_se == pytest.approx(b.kl_se, rel=1e-9)


def test_the_standard_error_is_that_of_the_per_image_kl(model64, meter64) -> None:
    plan = _plan(reductions=[Reduction(1, [2, 1])])
    student = convert(model64, plan).eval()
    with torch.inference_mode():
        ref = model64(meter64.images).log_softmax(-1)
        kl = (ref.exp() * (ref - student(meter64.images).log_softmax(-1))).sum(-1)
    damage = meter64.whole(plan)
    assert damage.kl == pytest.approx(float(kl.mean()), rel=1e-9)
    assert damage.kl_se == pytest.approx(float(kl.std()) / 10 ** 0.5, rel=1e-9) and damage.kl_se > 0


def test_compare_decides_on_the_search_sample_or_else_on_every_image(model64) -> None:
    meter = DamageMeter(model64, _images(10, dtype=torch.float64), batch_size=4, search_images=4)
    heavy, light = _plan(merge_r=[6, 4, 2, 1]), _plan(merge_r=[0, 0, 0, 1])
    clear = meter.compare(heavy, light)
    assert clear.decided and clear.kl > 0 and clear.images == 4
    assert clear.kl == pytest.approx(meter.whole(heavy, 4).kl - meter.whole(light, 4).kl, rel=1e-9)
    assert meter.difference(heavy, light, 4) == clear  # compare is difference on the search sample here
    same = meter.compare(heavy, heavy)  # no difference: never decided, so measured on all 10
    assert not same.decided and same.kl == 0.0 and same.images == 10


def test_b_is_less_damaging_only_beyond_the_significance_and_in_its_favour() -> None:
    assert Difference(0.01, 0.001, 100).b_less_damaging  # a - b > 0: b damages less, 10 standard errors
    assert not Difference(-0.01, 0.001, 100).b_less_damaging  # a damages less
    assert not Difference(0.001, 0.001, 100).b_less_damaging  # within SIGNIFICANT standard errors
