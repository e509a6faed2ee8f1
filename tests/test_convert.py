"""convert(): module swapping in stock timm ViTs, exactness, state-dict reload, plan validation, ONNX."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import timm
import torch
from timm.layers import Attention
from torch import nn

from conftest import tiny_vit
from vitcompress.convert import convert, glad_modules, static_attention_modules, validate_plan
from vitcompress.errors import UnsupportedModelError, VitcompressError
from vitcompress.modules import DGSSA
from vitcompress.plan import Plan, Reduction

TINY = dict(pretrained=False, img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=4, num_heads=2)
# (timm name, extra kwargs, prefix tokens): the families convert must support.
FAMILIES = {
    "deit": ("deit_tiny_patch16_224", {}, 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, 2),
    "deit3_layerscale": ("deit3_small_patch16_224", {}, 1),
    "reg4_gap": ("vit_base_patch16_reg4_gap_256", {}, 4),
    "cls_reg2_avg": ("deit_tiny_patch16_224", {"reg_tokens": 2, "global_pool": "avg"}, 3),
}


def make_model(family: str = "deit", dtype: torch.dtype = torch.float32) -> nn.Module:
    name, extra, _ = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, **TINY, **extra).to(dtype).eval()


def make_plan(model: nn.Module, static=(), reductions=()) -> Plan:
    return Plan(
        static_layers=list(static),
        reductions=[Reduction(b, list(s)) for b, s in reductions],
        num_blocks=len(model.blocks),
        num_prefix_tokens=model.num_prefix_tokens,
        grid=tuple(model.patch_embed.grid_size),
    )


def dynamic_attention_maps(model: nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-block dynamic attention [B, H, N, N] of a stock timm ViT, recomputed from each block's input."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        blk.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0]))
        for i, blk in enumerate(model.blocks)
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    maps = {}
    for i, blk in enumerate(model.blocks):
        attn, h = blk.attn, blk.norm1(inputs[i])
        B, n, _ = h.shape
        q, k, _ = attn.qkv(h).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        maps[i] = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return maps


def test_empty_plan_gives_an_identical_model():
    model = make_model()
    x = torch.randn(2, 3, 32, 32)
    converted = convert(model, make_plan(model))
    assert converted is not model
    assert torch.equal(converted(x), model(x))


@pytest.mark.parametrize("static", [[1], [0, 2]])
def test_static_layers_from_own_attention_reproduce_the_logits(static):
    model = make_model("deit3_layerscale", torch.float64)
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)  # LayerScale must be kept around the new attention
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    maps = dynamic_attention_maps(model, x)
    converted = convert(model, make_plan(model, static), {i: maps[i][0] for i in static})
    assert sorted(static_attention_modules(converted)) == static
    torch.testing.assert_close(converted(x), model(x), atol=1e-10, rtol=0)
    # A different image gets different outputs: the static layers really replaced the dynamic ones.
    other = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert not torch.allclose(converted(other), model(other), atol=1e-6)


def test_original_model_untouched_unless_inplace():
    model = make_model()
    plan = make_plan(model, [0], [(2, [2, 1])])
    converted = convert(model, plan)
    assert not any(m.training for m in converted.modules())  # an eval model stays entirely in eval
    assert isinstance(model.blocks[0].attn, Attention) and not hasattr(model.blocks[2], "glad")
    same = convert(model, plan, inplace=True)
    assert same is model and isinstance(model.blocks[0].attn, DGSSA)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shapes_and_heads_for_each_family(family):
    model = make_model(family)
    prefix = FAMILIES[family][2]
    plan = make_plan(model, [0, 2], [(1, [4, 2, 1]), (3, [2, 1])])
    converted = convert(model, plan)
    x = torch.randn(2, 3, 32, 32)
    feats = converted.forward_features(x)
    assert feats.shape == (2, prefix + 4 + 1, 64)
    assert converted(x).shape == (2, 10)
    torch.testing.assert_close(converted.forward_head(feats), converted(x))
    if converted.global_pool == "avg":
        # timm averages x[:, num_prefix_tokens:], i.e. exactly the aggregated tokens.
        expected = converted.fc_norm(feats[:, prefix:].mean(dim=1))
    elif family == "deit_distilled":
        expected = (feats[:, 0] + feats[:, 1]) / 2  # class and distillation tokens, untouched by GLAD
    else:
        expected = converted.fc_norm(feats[:, 0])
    torch.testing.assert_close(converted.forward_head(feats, pre_logits=True), expected)
    assert static_attention_modules(converted)[2].num_tokens == prefix + 16 + 4 + 1
    assert sorted(glad_modules(converted)) == [1, 3]


def test_avg_pool_of_a_divisible_pyramid_keeps_the_patch_mean():
    # Each exact pooling level has the same mean as the patches, so 'avg' pooling sees the same mean.
    model = make_model("reg4_gap", torch.float64)
    converted = convert(model, make_plan(model, reductions=[(3, [4, 2, 1])]))
    glad = glad_modules(converted)[3]
    tokens = torch.randn(2, 4 + 64, 64, dtype=torch.float64)
    torch.testing.assert_close(glad(tokens)[:, 4:].mean(1), tokens[:, 4:].mean(1), atol=1e-12, rtol=0)


def test_static_layers_after_a_reduction_run_on_fewer_tokens_and_start_uniform():
    model = make_model()
    x = torch.randn(1, 3, 32, 32)
    maps = {i: m[0] for i, m in dynamic_attention_maps(model, x).items()}
    with pytest.warns(UserWarning, match=r"static layers \[2, 3\] run on aggregated tokens"):
        converted = convert(model, make_plan(model, [0, 2, 3], [(2, [2, 1])]), maps)
    static = static_attention_modules(converted)
    assert [static[i].num_tokens for i in (0, 2, 3)] == [65, 6, 6]
    torch.testing.assert_close(static[0].attention(), maps[0])
    torch.testing.assert_close(static[3].attention(), torch.full((2, 6, 6), 1 / 6))
    assert converted(x).shape == (1, 10)


def test_state_dict_loads_into_a_fresh_conversion():
    model = make_model("deit_distilled")
    plan = make_plan(model, [0, 1], [(2, [3, 1])])
    trained = convert(model, plan).train()
    with torch.no_grad():  # stand-in for fine-tuning: every parameter moves
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trained.eval()
    state = trained.state_dict()
    assert "blocks.2.glad.weight" in state and "blocks.0.attn.logits" in state
    assert "blocks.0.attn.qkv.weight" not in state and "blocks.2.attn.qkv.weight" in state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = convert(make_model("deit_distilled"), plan)
    fresh.load_state_dict(state)  # strict
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), trained(x))


def test_deep_copy_keeps_the_aggregation_hook():
    model = make_model()
    converted = convert(model, make_plan(model, [0], [(1, [2, 1])]))
    clone = copy.deepcopy(converted)
    x = torch.randn(2, 3, 32, 32)
    assert clone.forward_features(x).shape == (2, 1 + 5, 64)
    with torch.no_grad():
        clone.blocks[1].glad.weight.zero_()  # the clone's hook must use the clone's GLAD
    assert converted.blocks[1].glad.weight.abs().sum() > 0
    assert not torch.equal(clone(x), converted(x))


def test_train_mode_forward_backward_reaches_new_parameters():
    model = make_model()
    converted = convert(model, make_plan(model, [0], [(1, [2, 1])])).train()
    converted(torch.randn(2, 3, 32, 32)).sum().backward()
    assert converted.blocks[0].attn.logits.grad.abs().sum() > 0
    assert converted.blocks[1].glad.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("static", "reductions", "match"),
    [
        ([4], [], r"out of range: the model has blocks 0..3"),
        ([-1], [], "out of range"),
        ([2, 1], [], "sorted ascending"),
        ([1, 1], [], "sorted ascending"),
        ([], [(3, [2]), (1, [4])], "sorted ascending"),
        ([], [(1, [8])], "keeps 64 tokens, not fewer than its 64"),
        ([], [(1, [4, 2]), (2, [4, 2])], "keeps 20 tokens, not fewer than its 20"),
        ([], [(1, [2, 3])], "reduction before block 1: pyramid scales"),
    ],
)
def test_bad_plans_are_refused_without_touching_the_model(static, reductions, match):
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(VitcompressError, match=match):
        convert(model, make_plan(model, static, reductions), inplace=True)
    assert model.state_dict().keys() == before.keys()
    assert not static_attention_modules(model) and not glad_modules(model)


def test_plan_for_another_model_is_refused():
    model = make_model()
    plan = make_plan(model, [0])
    plan.grid = (14, 14)
    with pytest.raises(VitcompressError, match="made for a model with 4 blocks, a 14x14 grid"):
        validate_plan(model, plan)


def test_a_hand_written_plan_without_its_model_is_told_what_to_add():
    model = make_model()
    plan = Plan.from_dict({"static_layers": [1]})  # no num_blocks, grid or prefix: from_dict's defaults
    with pytest.raises(VitcompressError, match=r'no num_blocks.*"num_blocks": 4, "grid": \[8, 8\], "num_prefix_tokens": 1'):
        validate_plan(model, plan)
    fixed = Plan.from_dict({"static_layers": [1], "num_blocks": 4, "grid": [8, 8], "num_prefix_tokens": 1})
    validate_plan(model, fixed)  # what the message says to add is enough


def test_bad_attention_means_are_refused():
    model = make_model()
    plan = make_plan(model, [1])
    with pytest.raises(VitcompressError, match=r"block 1 have shape \[2, 64, 64\], expected \[2, 65, 65\]"):
        convert(model, plan, {1: torch.full((2, 64, 64), 1 / 64)})
    with pytest.raises(VitcompressError, match="no entry for static layer 1"):
        convert(model, plan, {0: torch.full((2, 65, 65), 1 / 65)})
    with pytest.raises(VitcompressError, match="not a block index"):
        convert(model, plan, {"layer1": torch.full((2, 65, 65), 1 / 65)})
    # The on-disk key form is accepted.
    converted = convert(model, plan, {"blocks.1": torch.full((2, 65, 65), 1 / 65)})
    assert isinstance(converted.blocks[1].attn, DGSSA)


def test_unsupported_models_and_double_conversion_are_refused():
    model = make_model()
    converted = convert(model, make_plan(model, [0]))
    with pytest.raises(VitcompressError, match="already converted"):
        convert(converted, make_plan(model, [1]))
    dynamic = timm.create_model("deit_tiny_patch16_224", **TINY, dynamic_img_size=True)
    with pytest.raises(UnsupportedModelError, match="dynamic_img_size"):
        convert(dynamic, make_plan(model, [0]))
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        convert(nn.Linear(2, 2), make_plan(model, [0]))


def test_onnx_export_matches_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    pytest.importorskip("onnxscript", reason="the torch.export-based ONNX exporter needs onnxscript")
    model = make_model("deit3_layerscale")
    converted = convert(model, make_plan(model, [0, 1], [(2, [2, 1])])).eval()
    path = tmp_path / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            converted, (torch.randn(2, 3, 32, 32),), str(path), input_names=["x"], dynamic_shapes={"x": {0: "batch"}}
        )
        x = torch.randn(3, 3, 32, 32)  # another batch size: no data-dependent control flow was baked in
        expected = converted(x)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)


def test_token_merging_plans_are_validated_before_the_model_changes() -> None:
    from vitcompress.modules.tome import is_patched

    model = tiny_vit(img_size=64)  # 8x8 grid, 65 tokens
    bad = [
        (Plan(num_blocks=4, num_prefix_tokens=1, grid=(8, 8), merge_r=[40, 0, 0, 0]), "at most"),
        (Plan(num_blocks=4, num_prefix_tokens=1, grid=(8, 8), merge_r=[2, 2]), "one count"),
        (Plan(static_layers=[2], num_blocks=4, num_prefix_tokens=1, grid=(8, 8), merge_r=[2, 2, 2, 2]), "after the first merging block"),
        (Plan(reductions=[Reduction(2, [2, 1])], num_blocks=4, num_prefix_tokens=1, grid=(8, 8), merge_r=[2, 2, 0, 0]), "both"),
    ]
    for plan, words in bad:
        with pytest.raises(VitcompressError, match=words):
            convert(model, plan, inplace=True)
        assert not is_patched(model)


def test_static_layers_before_merging_are_kept() -> None:
    model = tiny_vit(img_size=64)
    plan = Plan(static_layers=[0], num_blocks=4, num_prefix_tokens=1, grid=(8, 8), merge_r=[0, 4, 4, 4])
    out = convert(model, plan)
    assert list(static_attention_modules(out)) == [0]
    assert out(torch.randn(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("metric", ["tokens", "keys"])
def test_merging_matches_on_the_plans_metric(metric: str) -> None:
    model = tiny_vit(img_size=64)
    plan = Plan(num_blocks=4, num_prefix_tokens=1, grid=(8, 8), merge_r=[8, 4, 0, 0], tome_metric=metric)
    out = convert(model, plan)
    assert [blk.tome_metric for blk in out.blocks] == [metric] * 4
    other = convert(model, Plan.from_dict({**plan.to_dict(), "tome_metric": "keys" if metric == "tokens" else "tokens"}))
    x = torch.randn(2, 3, 64, 64)
    assert (out(x) - other(x)).abs().max() > 1e-6  # the metric reaches the forward


def test_glad_hands_token_sizes_to_the_blocks_after_it() -> None:
    from vitcompress.modules.tome import token_size

    model = tiny_vit(img_size=64)
    plan = Plan(reductions=[Reduction(1, [4, 2, 1])], num_blocks=4, num_prefix_tokens=1, grid=(8, 8),
                proportional_attention=True)
    out = convert(model, plan)
    seen = []
    out.blocks[2].register_forward_pre_hook(lambda m, a: seen.append(token_size(m).clone()))
    out(torch.randn(2, 3, 64, 64))
    sizes = seen[0][0, :, 0]
    assert sizes[0] == 1  # the class token stands for itself
    assert sizes[1:17].tolist() == [4.0] * 16 and sizes[17:21].tolist() == [16.0] * 4 and sizes[21] == 64
    plain = convert(model, dataclasses.replace(plan, proportional_attention=False))
    x = torch.randn(2, 3, 64, 64)
    assert not torch.allclose(out(x), plain(x))  # sizes change attention after the stage


def test_glad_attention_init_mixes_tokens_by_the_mean_attention() -> None:
    model = tiny_vit(img_size=64)
    n = 65
    probs = torch.softmax(torch.randn(2, n, n), -1)
    plan = Plan(reductions=[Reduction(1, [4, 1])], num_blocks=4, num_prefix_tokens=1, grid=(8, 8), glad_init="attention")
    glad = glad_modules(convert(model, plan, {1: probs}))[1]
    rows = probs.double().mean(0)[1:, 1:]
    rows = rows / rows.sum(-1, keepdim=True)
    support = glad.support.double()
    expected = (support / support.sum(-1, keepdim=True)) @ rows
    torch.testing.assert_close(glad.weight.double(), expected.to(glad.weight.dtype).double())
    torch.testing.assert_close(glad.weight.sum(-1), torch.ones(17))
