"""FLOP counts checked against closed-form MAC counts of the same architectures."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from conftest import TINY, tiny_vit
from vitcompress.errors import VitcompressError
from vitcompress.flops import _count_for_real, _count_on_meta, count_flops, count_macs, format_flops
from vitcompress.plan import Plan, Reduction


def vit_macs(
    *,
    img: int,
    patch: int,
    dim: int,
    depth: int,
    classes: int,
    prefix: int = 1,
    heads_out: int = 1,
    tokens_per_block: list[int] | None = None,
    static: set[int] = frozenset(),
    glad: dict[int, tuple[int, int]] | None = None,
) -> int:
    """MACs of a timm ViT (MLP ratio 4) counting matmuls only: patch conv, qkv, q k^T, attn v, proj,
    fc1, fc2, head(s); static layers skip q, k and q k^T; GLAD stages cost M x N_in x dim."""
    patches = (img // patch) ** 2
    macs = patches * dim * 3 * patch * patch  # patch-embedding convolution
    for i in range(depth):
        n = tokens_per_block[i] if tokens_per_block else prefix + patches
        if glad and i in glad:
            m, n_in = glad[i]
            macs += m * n_in * dim
        if i in static:
            macs += n * dim * dim + n * n * dim  # v projection + attn @ v (all heads)
        else:
            macs += n * dim * 3 * dim + 2 * n * n * dim  # qkv + q k^T + attn @ v
        macs += n * dim * dim + 2 * n * dim * 4 * dim  # proj + MLP
    return macs + heads_out * dim * classes


def test_deit_tiny_224_is_1_25_gmacs_with_attention() -> None:
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    expected = vit_macs(img=224, patch=16, dim=192, depth=12, classes=1000)
    assert count_macs(model) == expected
    assert count_flops(model) == 2 * expected
    assert 1.24e9 < expected < 1.26e9  # the figure usually quoted for DeiT-Ti


def test_fused_unfused_and_meta_counts_agree() -> None:
    model = tiny_vit()
    shape = (1, 3, 32, 32)
    fused = _count_for_real(model, shape)
    assert any("scaled_dot_product" in op for op in fused), "this torch should take the fused kernel on CPU"
    meta = _count_on_meta(model, shape)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    unfused = _count_for_real(model, shape)
    assert not any("scaled_dot_product" in op for op in unfused)
    expected = 2 * vit_macs(img=32, patch=8, dim=32, depth=4, classes=5)
    assert sum(fused.values()) == sum(unfused.values()) == sum(meta.values()) == expected


def test_models_that_cannot_run_on_meta_are_run_for_real() -> None:
    class ReadsAValue(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.abs().sum()) >= 0:  # reading a value is impossible on meta tensors
                return self.fc(x.flatten(1))
            return x

    model = ReadsAValue()
    with pytest.raises(Exception):
        _count_on_meta(model, (2, 3, 2, 2))
    assert count_flops(model, (2, 3, 2, 2)) == 2 * 2 * 12 * 5


def test_distilled_model_counts_two_prefix_tokens_and_two_heads() -> None:
    model = tiny_vit("deit_tiny_distilled_patch16_224")
    assert count_macs(model) == vit_macs(img=32, patch=8, dim=32, depth=4, classes=5, prefix=2, heads_out=2)


def test_converted_model_counts_static_attention_and_aggregation() -> None:
    from vitcompress.convert import convert

    model = tiny_vit(img_size=64)  # 8 x 8 patch grid
    plan = Plan(static_layers=[0, 1], reductions=[Reduction(2, [4, 2])], num_blocks=4, num_prefix_tokens=1, grid=(8, 8))
    compressed = convert(model, plan).eval()
    tokens = plan.tokens_per_block()
    assert tokens == [65, 65, 21, 21]
    expected = vit_macs(
        img=64, patch=8, dim=32, depth=4, classes=5, tokens_per_block=tokens, static={0, 1}, glad={2: (20, 64)}
    )
    assert count_macs(compressed) == expected
    assert sum(_count_for_real(compressed, (1, 3, 64, 64)).values()) == 2 * expected  # meta and real agree
    assert count_macs(compressed) < count_macs(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():  # counting on meta tensors must leave the (caching) model working
        assert torch.isfinite(compressed(x)).all()


def test_flops_scale_with_batch_and_follow_input_size() -> None:
    model = tiny_vit()
    one = count_flops(model)  # at the model's own input size (geometry.input_size)
    assert count_flops(model, (1, 3, TINY["img_size"], TINY["img_size"])) == one
    assert count_flops(model, (3, 3, 32, 32)) == 3 * one
    assert count_flops(model, (3, 32, 32)) == one  # (C, H, W) means batch 1


def test_plain_modules_and_mode_untouched() -> None:
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 7))
    assert count_flops(linear, (4, 3, 2, 2)) == 2 * 4 * 12 * 7
    conv = nn.Sequential(nn.Conv2d(3, 8, kernel_size=2, stride=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 6)).train()
    expected = 16 * 8 * 3 * 2 * 2 + 8 * 4 * 4 * 6
    assert count_macs(conv, (1, 3, 8, 8)) == expected
    assert conv.training, "counting must not switch the model's mode"


def test_errors_and_formatting() -> None:
    with pytest.raises(VitcompressError, match="input size"):
        count_flops(nn.Sequential(nn.Flatten()))
    with pytest.raises(VitcompressError, match="batch, channels, height, width"):
        count_flops(tiny_vit(), (32, 32))
    assert format_flops(2.5e9) == "2.50 G" and format_flops(1.5e6) == "1.50 M" and format_flops(12) == "12 "


def test_model_dtype_and_device_are_followed() -> None:
    model = tiny_vit().to(torch.bfloat16)
    assert count_flops(model) == 2 * vit_macs(img=32, patch=8, dim=32, depth=4, classes=5)
