"""GLAD: pyramid initialisation against adaptive average pooling, prefix pass-through, stacking, errors.

Shapes inside each supported timm model family are tested in test_convert.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitcompress.errors import VitcompressError
from vitcompress.modules import GLAD
from vitcompress.modules.glad import pooling_matrix

C = 8


def grid_tokens(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, H*W, C] row-major tokens -> [B, C, H, W] image."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


def reference_pyramid(patches: torch.Tensor, grid: tuple[int, int], scales: list[int]) -> torch.Tensor:
    """The pyramid computed directly with adaptive_avg_pool2d on the patch image."""
    image = grid_tokens(patches, grid)
    return torch.cat([F.adaptive_avg_pool2d(image, s).flatten(2).transpose(1, 2) for s in scales], dim=1)


@pytest.mark.parametrize(
    ("grid", "scales", "prefix"),
    [((8, 8), [4, 2, 1], 1), ((14, 14), [7, 3, 1], 2), ((8, 8), [5, 3], 0), ((6, 4), [3, 2, 1], 4)],
)
def test_initial_weights_equal_adaptive_average_pooling(grid, scales, prefix):
    x = torch.randn(3, prefix + grid[0] * grid[1], C, dtype=torch.float64)
    glad = GLAD(prefix, [grid], scales, dtype=torch.float64)
    out = glad(x)
    assert out.shape == (3, prefix + sum(s * s for s in scales), C)
    assert torch.equal(out[:, :prefix], x[:, :prefix])  # prefix tokens untouched
    torch.testing.assert_close(out[:, prefix:], reference_pyramid(x[:, prefix:], grid, scales), atol=1e-12, rtol=0)


def test_constant_patch_tokens_stay_constant():
    token = torch.randn(C, dtype=torch.float64)
    x = torch.cat([torch.randn(2, 1, C, dtype=torch.float64), token.expand(2, 49, C)], dim=1)
    out = GLAD(1, [(7, 7)], [5, 3, 2, 1], dtype=torch.float64)(x)
    torch.testing.assert_close(out[:, 1:], token.expand(2, 25 + 9 + 4 + 1, C), atol=1e-12, rtol=0)
    assert torch.equal(out[:, :1], x[:, :1])


def test_one_by_one_pyramid_is_the_patch_mean():
    x = torch.randn(2, 2 + 35, C, dtype=torch.float64)
    out = GLAD(2, [(5, 7)], [1], dtype=torch.float64)(x)
    assert out.shape == (2, 3, C)
    torch.testing.assert_close(out[:, 2], x[:, 2:].mean(dim=1), atol=1e-12, rtol=0)


def test_pooling_matrix_rows_sum_to_one():
    m = pooling_matrix((14, 14), 3, torch.float64)
    assert m.shape == (9, 196)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(9, dtype=torch.float64), atol=1e-12, rtol=0)


def test_later_stage_pools_the_finest_input_grid():
    first = GLAD(1, [(8, 8)], [4, 2, 1], dtype=torch.float64)
    second = GLAD(1, first.out_grids, [2, 1], dtype=torch.float64)
    assert second.in_grids == [(4, 4), (2, 2), (1, 1)]
    assert second.weight.shape == (5, 16 + 4 + 1)
    assert torch.equal(second.weight[:, 16:], torch.zeros(5, 5, dtype=torch.float64))
    x = torch.randn(2, 1 + 64, C, dtype=torch.float64)
    out = second(first(x))
    # Pooling the 4x4 grid (itself an exact 2x2 pooling of 8x8) again equals pooling 8x8 directly.
    torch.testing.assert_close(out[:, 1:], reference_pyramid(x[:, 1:], (8, 8), [2, 1]), atol=1e-12, rtol=0)


def test_weight_is_learnable():
    glad = GLAD(1, [(4, 4)], [2, 1])
    x = torch.randn(2, 17, C)
    glad(x).square().sum().backward()
    assert glad.weight.grad is not None and glad.weight.grad.abs().sum() > 0


def test_state_dict_holds_only_the_weight():
    glad = GLAD(1, [(4, 4)], [2, 1])
    assert list(glad.state_dict()) == ["weight"]


@pytest.mark.parametrize(
    ("in_grids", "scales", "match"),
    [
        ([(8, 8)], [1, 2], "strictly decreasing"),
        ([(8, 8)], [4, 4], "strictly decreasing"),
        ([(8, 8)], [9], "between 1 and 8"),
        ([(8, 8)], [0], "between 1 and 8"),
        ([(8, 8)], [], "at least one"),
        ([], [1], "input grids"),
    ],
)
def test_bad_pyramids_are_refused(in_grids, scales, match):
    with pytest.raises(VitcompressError, match=match):
        GLAD(1, in_grids, scales)


def test_wrong_token_count_is_refused():
    glad = GLAD(1, [(4, 4)], [2, 1])
    with pytest.raises(VitcompressError, match="1 prefix \\+ 16 patch tokens but got 16"):
        glad(torch.randn(1, 16, C))


# ---- parametrisations: simplex and content-adaptive -------------------------------------------
@pytest.mark.parametrize("mode", ["simplex", "adaptive"])
@pytest.mark.parametrize("in_grids,scales", [([(8, 8)], [4, 2, 1]), ([(4, 4), (2, 2), (1, 1)], [2, 1]), ([(5, 7)], [3, 1])])
def test_every_mode_starts_as_the_pooling_pyramid(mode, in_grids, scales):
    torch.manual_seed(0)
    n = sum(h * w for h, w in in_grids)
    x = torch.randn(3, 1 + n, 12, dtype=torch.float64)
    linear = GLAD(1, in_grids, scales, dtype=torch.float64)
    other = GLAD(1, in_grids, scales, mode=mode, dim=12, dtype=torch.float64)
    torch.testing.assert_close(other(x), linear(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(other.aggregation(), linear.weight, rtol=0, atol=1e-15)


def test_simplex_rows_stay_convex_mixes_of_their_region():
    g = GLAD(1, [(4, 4)], [2, 1], mode="simplex", dtype=torch.float64)
    with torch.no_grad():
        g.logits.normal_(std=3.0)
    rows = g.aggregation()
    torch.testing.assert_close(rows.sum(-1), torch.ones(5, dtype=torch.float64))
    assert bool((rows >= 0).all())
    assert bool((rows[g.domain == 0] == 0).all())  # nothing leaks outside the pooled region


def test_adaptive_weights_depend_on_the_image_and_train():
    torch.manual_seed(0)
    g = GLAD(1, [(4, 4)], [2, 1], mode="adaptive", dim=8)
    x = torch.randn(2, 17, 8)
    (g(x) ** 2).sum().backward()
    assert g.query.grad.abs().sum() > 0 and g.logits.grad.abs().sum() > 0  # zero queries still learn
    with torch.no_grad():
        g.query.normal_()
    out = g(x)
    same = torch.stack([x[0], x[0]])
    # Per-image weights: one image's output does not depend on the other image in the batch.
    torch.testing.assert_close(g(same)[0], out[0])
    pooled = torch.matmul(g.aggregation(), x[:, 1:])  # what the fixed part alone would give
    assert (out[:, 1:] - pooled).abs().max() > 1e-3


def test_attention_init_sets_the_domain_to_every_token():
    g = GLAD(1, [(2, 2)], [1], mode="simplex", dtype=torch.float64)
    attn = torch.rand(2, 5, 5, dtype=torch.float64)
    attn = attn / attn.sum(-1, keepdim=True)
    linear = GLAD(1, [(2, 2)], [1], dtype=torch.float64)
    g.init_from_attention(attn)
    linear.init_from_attention(attn)
    assert bool((g.domain == 1).all())
    torch.testing.assert_close(g.aggregation(), linear.weight, rtol=0, atol=1e-12)
    # The sizes (patches each output token stands for) still come from the pyramid region.
    torch.testing.assert_close(g.out_size(torch.ones(1, 5, 1, dtype=torch.float64))[0, 1:], torch.tensor([[4.0]], dtype=torch.float64))


def test_modes_are_checked():
    with pytest.raises(VitcompressError, match="not one of"):
        GLAD(1, [(4, 4)], [2], mode="free")
    with pytest.raises(VitcompressError, match="token width"):
        GLAD(1, [(4, 4)], [2], mode="adaptive")
