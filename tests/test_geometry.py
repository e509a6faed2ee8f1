"""What shape a timm ViT is: the one support check, the token geometry and the one input-size rule."""

from __future__ import annotations

import pytest
import timm
from torch import nn

from conftest import TINY, tiny_vit
from vitcompress.errors import UnsupportedModelError, VitcompressError
from vitcompress.geometry import VitGeometry, check_supported, input_size, vit_geometry

PLAN_KW = dict(num_blocks=4, num_prefix_tokens=1, grid=(4, 4))


def test_stock_vits_are_supported_and_measured() -> None:
    model = tiny_vit()
    check_supported(model)
    g = vit_geometry(model)
    assert g == VitGeometry(depth=4, grid=(4, 4), num_prefix_tokens=1, embed_dim=32, num_heads=2)
    assert (g.num_patches, g.num_tokens) == (16, 17)
    distilled = tiny_vit("deit_tiny_distilled_patch16_224")
    assert vit_geometry(distilled).num_prefix_tokens == 2


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: nn.Linear(2, 2), "not a timm VisionTransformer"),
        (lambda: tiny_vit("vit_base_patch16_224", global_pool="map"), "global_pool='map'"),
        (lambda: tiny_vit(dynamic_img_size=True), "dynamic_img_size"),
        (lambda: tiny_vit(patch_drop_rate=0.5), "patch dropout"),
    ],
)
def test_unsupported_models_say_why(build, reason: str) -> None:
    with pytest.raises(UnsupportedModelError, match=f"'m' is not supported: .*{reason}"):
        check_supported(build(), "m")


def test_a_converted_model_is_measured_but_not_supported_again() -> None:
    from vitcompress.convert import convert
    from vitcompress.plan_types import Plan, Reduction

    model = tiny_vit()
    converted = convert(model, Plan(static_layers=[0], reductions=[Reduction(2, [2, 1])], **PLAN_KW))
    assert vit_geometry(converted) == vit_geometry(model)  # sizes of the original, stock or converted
    with pytest.raises(UnsupportedModelError, match="already converted"):
        check_supported(converted)
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        vit_geometry(nn.Sequential(nn.Linear(2, 2)))


def test_input_size_follows_the_patch_embedding_first() -> None:
    model = tiny_vit()
    assert input_size(model) == (3, 32, 32)
    # timm keeps the pretrained config's 224 for a model built at 32: the patch embedding wins
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert input_size(model, {"input_size": [3, 64, 64]}) == (3, 32, 32)
    gray = timm.create_model("deit_tiny_patch16_224", pretrained=False, **{**TINY, "in_chans": 1})
    assert input_size(gray) == (1, 32, 32)


def test_input_size_of_other_modules() -> None:
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(VitcompressError, match="input size"):
        input_size(plain)
    assert input_size(plain, {"input_size": [3, 2, 2]}) == (3, 2, 2)  # the data config
    plain.vitcompress_metadata = {"data_config": {"input_size": [3, 4, 4]}}  # what vitcompress.load attaches
    assert input_size(plain) == (3, 4, 4)
    assert input_size(plain, {"input_size": [3, 2, 2]}) == (3, 2, 2)  # an explicit data config comes first
    other = nn.Identity()
    other.pretrained_cfg = {"input_size": (3, 8, 8)}
    assert input_size(other) == (3, 8, 8)
