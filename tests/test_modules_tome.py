"""ToMe token merging: pure matching/merging, proportional attention, the timm block patch, schedules."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from vitcompress.errors import UnsupportedModelError, VitcompressError
from vitcompress.modules.dgssa import DGSSA
from vitcompress.modules.tome import (
    TokenSize,
    bipartite_soft_matching,
    descending_rank,
    is_patched,
    max_merge,
    merge_wavg,
    patch_tome,
    proportional_attention,
    merge_schedule,
    r_schedule,
    set_token_size,
    token_size,
    tokens_after,
    tome_schedule,
)

SMALL = dict(pretrained=False, img_size=32, patch_size=4, num_classes=10, depth=4, embed_dim=32, num_heads=2)
TOKENS = 64  # 8x8 patches

VARIANTS = {
    "deit": ("deit_tiny_patch16_224", {}),
    "deit3": ("deit3_small_patch16_224", dict(init_values=1e-1)),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_small_patch16_224", dict(reg_tokens=4, class_token=True)),
    "avg_pool": ("deit_tiny_patch16_224", dict(global_pool="avg")),
    "qk_norm": ("vit_small_patch16_224", dict(qk_norm=True, init_values=1e-1)),
}


def make_model(variant: str = "deit", dtype: torch.dtype = torch.float64, **overrides) -> nn.Module:
    arch, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(arch, **{**SMALL, **kwargs, **overrides}).to(dtype).eval()
    with torch.no_grad():  # non-trivial LayerScale/norm parameters, so dropping any of them shows
        for name, p in model.named_parameters():
            if "gamma" in name or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def images(batch: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)


def num_tokens(model: nn.Module) -> int:
    return TOKENS + model.num_prefix_tokens


def patched(model: nn.Module, schedule, metric: str = "tokens") -> nn.Module:
    return patch_tome(copy.deepcopy(model), schedule, metric=metric)


# ----------------------------------------------------------------------------- hand-written reference


def reference_attention(attn: Attention, x: torch.Tensor, size: torch.Tensor):
    """softmax(q k^T * scale + log size) v, written out; returns (output, keys averaged over heads)."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale + size[:, None, None, :, 0].log()
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, -1)
    return attn.proj(attn.norm(out)), k.mean(dim=1)


def reference_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, prefix: int):
    """Bipartite soft matching on ``metric`` + size-weighted mean, one image at a time with Python lists."""
    out_x, out_s = [], []
    for xb, sb, kb in zip(x, size, metric):
        n = xb.shape[0]
        set_a, set_b = list(range(prefix, n, 2)), list(range(prefix + 1, n, 2))
        unit = kb / kb.norm(dim=-1, keepdim=True)
        best = []
        for i in set_a:
            scores = [float(unit[i] @ unit[j]) for j in set_b]
            best.append((max(scores), scores.index(max(scores))))
        r_here = min(r, len(set_a) if set_b else 0)
        ranked = sorted(range(len(set_a)), key=lambda t: -best[t][0])  # stable, like the real code
        merged = set(ranked[:r_here])
        groups = [[j] for j in set_b]
        for t in merged:
            groups[best[t][1]].append(set_a[t])
        rows = list(range(prefix)) + [set_a[t] for t in range(len(set_a)) if t not in merged]
        xs = [xb[i] for i in rows] + [sum(sb[i] * xb[i] for i in g) / sum(sb[i] for i in g) for g in groups]
        ss = [sb[i] for i in rows] + [sum(sb[i] for i in g) for g in groups]
        out_x.append(torch.stack(xs))
        out_s.append(torch.stack(ss))
    return torch.stack(out_x), torch.stack(out_s)


def reference_forward(model: nn.Module, x: torch.Tensor, schedule, use_layerscale: bool = True, stage_at=None,
                      metric: str = "tokens"):
    """ToMe forward of a timm ViT written from the paper, matching on the tokens where they are merged
    (``metric="tokens"``) or on the keys (the paper's); ``stage_at[i](x, size) -> (x, size)`` runs before block i."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype)
    for i, (blk, r) in enumerate(zip(model.blocks, schedule)):
        if stage_at and i in stage_at:
            x, size = stage_at[i](x, size)
        ls1 = blk.ls1 if use_layerscale else nn.Identity()
        ls2 = blk.ls2 if use_layerscale else nn.Identity()
        attn_out, keys = reference_attention(blk.attn, blk.norm1(x), size)
        x = x + ls1(attn_out)
        if r:
            x, size = reference_merge(x, size, keys if metric == "keys" else x, r, model.num_prefix_tokens)
        x = x + ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x))


# ----------------------------------------------------------------------------- exactness of the patch


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_r_zero_reproduces_stock_logits(variant):
    model = make_model(variant)
    x = images()
    tome = patched(model, [0] * 4)
    assert is_patched(tome) and not is_patched(model)
    torch.testing.assert_close(tome(x), model(x), atol=1e-10, rtol=0)


def test_r_zero_reproduces_stock_logits_without_fused_attention():
    model = make_model("deit3")
    for blk in model.blocks:
        blk.attn.fused_attn = False
    x = images()
    torch.testing.assert_close(patched(model, [0] * 4)(x), model(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("variant", ["deit", "deit3", "distilled", "registers", "avg_pool", "qk_norm"])
def test_merging_forward_equals_hand_written_reference(variant):
    model = make_model(variant)
    x = images()
    schedule = r_schedule(4, 12, num_tokens(model), model.num_prefix_tokens, "decreasing")
    with torch.no_grad():
        torch.testing.assert_close(patched(model, schedule)(x), reference_forward(model, x, schedule), atol=1e-10, rtol=0)


@pytest.mark.parametrize("variant", ["deit", "deit3", "registers"])
def test_merging_on_the_keys_equals_the_reference_and_differs_from_the_tokens(variant):
    model = make_model(variant)
    x = images()
    schedule = r_schedule(4, 12, num_tokens(model), model.num_prefix_tokens, "decreasing")
    with torch.no_grad():
        on_keys = patched(model, schedule, metric="keys")(x)
        torch.testing.assert_close(on_keys, reference_forward(model, x, schedule, metric="keys"), atol=1e-10, rtol=0)
        assert (on_keys - patched(model, schedule)(x)).abs().max() > 1e-6  # the two metrics match differently


def test_an_unknown_metric_is_refused():
    with pytest.raises(VitcompressError, match="metric 'values' is not one of tokens, keys"):
        patch_tome(make_model(), [4, 0, 0, 0], metric="values")


def test_layerscale_is_honoured():
    model = make_model("deit3")
    x = images()
    schedule = [8, 8, 8, 8]
    with torch.no_grad():
        out = patched(model, schedule)(x)
        without_ls = reference_forward(model, x, schedule, use_layerscale=False)
        torch.testing.assert_close(out, reference_forward(model, x, schedule), atol=1e-10, rtol=0)
    assert (out - without_ls).abs().max() > 1e-3


def test_fused_and_unfused_attention_agree_with_sizes():
    model = make_model("deit3")
    x = images()
    fused = patched(model, [10, 10, 5, 0])
    unfused = copy.deepcopy(fused)
    for blk in unfused.blocks:
        blk.attn.fused_attn = False
    torch.testing.assert_close(unfused(x), fused(x), atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- token counts and sizes


def record_blocks(model: nn.Module):
    """Per forward: (tokens, sizes) each block starts with; sizes of 1 stand for a None size."""
    seen = []

    def hook(block, args):
        x = args[0]
        size = token_size(block)
        seen.append((x.shape[1], torch.ones(x.shape[0], x.shape[1], 1) if size is None else size))

    for blk in model.blocks:
        blk.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("variant", ["deit", "distilled", "registers"])
@pytest.mark.parametrize("r, kind", [(8, "constant"), (20, "constant"), (12, "decreasing"), (40, "decreasing")])
def test_tokens_per_block_and_sizes_follow_the_schedule(variant, r, kind):
    model = make_model(variant)
    n, prefix = num_tokens(model), model.num_prefix_tokens
    schedule = r_schedule(4, r, n, prefix, kind)
    tome = patched(model, schedule)
    seen = record_blocks(tome)
    tome(images())
    assert [tokens for tokens, _ in seen] == tokens_after(schedule, n, prefix)
    for tokens, size in seen:
        assert size.shape == (2, tokens, 1)
        assert torch.equal(size.sum(dim=1), torch.full((2, 1), float(n), dtype=size.dtype))
        assert torch.equal(size[:, :prefix], torch.ones(2, prefix, 1, dtype=size.dtype))  # prefix never merged
    assert tome.tome_state.size is None  # cleared after the forward


def test_final_merge_is_counted_too():
    model = make_model()
    tome = patched(model, [0, 0, 0, 30])
    sizes = []
    tome.blocks[3].register_forward_hook(lambda blk, args, out: sizes.append((out.shape[1], token_size(blk))))
    tome(images())
    assert sizes[0][0] == 65 - 30 and torch.equal(sizes[0][1].sum(dim=1), torch.full((2, 1), 65.0))


def test_r_schedule_constant_decreasing_and_clipping():
    assert r_schedule(12, 8, 197, 1) == [8] * 12
    decreasing = r_schedule(12, 8, 197, 1, "decreasing")
    assert decreasing[0] == 16 and decreasing[-1] == 0 and sum(decreasing) == 96
    assert all(a >= b for a, b in zip(decreasing, decreasing[1:]))
    assert r_schedule(1, 5, 197, 1, "decreasing") == [5]
    # 65 tokens, 1 prefix: 64 -> merge 32 -> 33 tokens (32 patches) -> 16 -> 8 -> 4
    assert r_schedule(4, 100, 65, 1) == [32, 16, 8, 4]
    clipped = r_schedule(10, 100, 6, 2)  # 4 patches -> 2 -> 1, then nothing can merge
    assert clipped == [2, 1] + [0] * 8
    assert tokens_after(clipped, 6, 2) == [6, 4] + [3] * 8
    assert tokens_after([100, 100, 0, 5], 65, 1) == [65, 33, 17, 17]
    with pytest.raises(VitcompressError, match="unknown merge schedule"):
        r_schedule(4, 8, 65, 1, "linear")
    with pytest.raises(VitcompressError):
        r_schedule(4, -1, 65, 1)
    with pytest.raises(VitcompressError):
        tokens_after([1], 3, 3)


def test_merge_schedule_any_total_and_r_schedule_is_its_multiple_of_depth():
    for kind in ("constant", "decreasing"):
        for r in range(6):
            assert merge_schedule(12, 12 * r, 197, 1, kind) == r_schedule(12, r, 197, 1, kind)
        for total in range(0, 80):
            schedule = merge_schedule(12, total, 197, 1, kind)
            assert sum(schedule) == total and schedule[0] >= schedule[-1]
            if kind == "constant":
                assert all(a >= b for a, b in zip(schedule, schedule[1:])) and max(schedule) - min(schedule) <= 1
            else:  # running sums follow the exact ramp's, rounded
                exact = [total * (2 * (k + 1) * 11 - k * (k + 1)) / (12 * 11) for k in range(12)]
                assert all(abs(sum(schedule[: k + 1]) - e) <= 0.5 for k, e in enumerate(exact))
    assert merge_schedule(4, 10, 197, 1) == [3, 3, 2, 2]
    ramp = merge_schedule(4, 10, 197, 1, "decreasing")  # exact ramp 5, 3.33, 1.67, 0
    assert ramp == [5, 3, 2, 0]
    assert merge_schedule(4, 100, 65, 1) == [25, 20, 10, 5]  # 25 each, clipped to half the patches left
    with pytest.raises(VitcompressError):
        merge_schedule(4, -1, 65, 1)


def test_every_k_schedules_merge_only_in_every_kth_block():
    assert merge_schedule(12, 60, 197, 1, "every-2") == [10, 0] * 6
    assert merge_schedule(12, 61, 197, 1, "every-3") == [16, 0, 0, 15, 0, 0, 15, 0, 0, 15, 0, 0]
    assert merge_schedule(4, 100, 65, 1, "every-2") == [32, 0, 16, 0]  # clipped to what can merge
    assert merge_schedule(12, 30, 65, 1, "every-4") == [10, 0, 0, 0, 10, 0, 0, 0, 10, 0, 0, 0]
    assert merge_schedule(12, 30, 65, 1, "every-6") == [15, 0, 0, 0, 0, 0, 15, 0, 0, 0, 0, 0]
    for kind in ("every-2", "every-3", "every-4", "every-6"):
        step = int(kind[len("every-"):])
        for total in range(0, 80):
            schedule = merge_schedule(12, total, 197, 1, kind)
            assert sum(schedule) == total and all(r == 0 for i, r in enumerate(schedule) if i % step)
            merging = schedule[::step]
            assert max(merging) - min(merging) <= 1


def test_arbitrary_schedule_is_clipped_like_tokens_after():
    model = make_model()
    schedule = [100, 3, 100, 7]
    tome = patched(model, schedule)
    seen = record_blocks(tome)
    tome(images())
    assert [t for t, _ in seen] == tokens_after(schedule, 65, 1) == [65, 33, 30, 15]  # 29 patches: all 15 of A merge


# ----------------------------------------------------------------------------- pure functions


def random_tokens(batch=2, n=11, channels=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, channels, generator=g, dtype=torch.float64).to(dtype)  # full float64 mantissas


@pytest.mark.parametrize("r", [0, -3])
def test_r_not_positive_is_an_exact_identity(r):
    x, size = random_tokens(), torch.rand(2, 11, 1, dtype=torch.float64) + 1
    merge = bipartite_soft_matching(random_tokens(seed=1), r, protected=1)
    assert merge.r == 0
    out, out_size = merge_wavg(merge, x, size)
    assert out is x and out_size is size
    assert merge(x) is x


def test_prefix_tokens_pass_through_unchanged():
    prefix = 3
    metric = random_tokens(n=13)
    metric[:, :prefix] = metric[:, prefix : 2 * prefix]  # the prefix looks exactly like some patches
    # sizes such that x * s / s is often not x in floating point
    size = torch.tensor([3.0, 5.0, 7.0, 11.0]).repeat(7)[:13].expand(2, 13)[..., None].double()
    x = random_tokens(n=13, seed=2)
    merge = bipartite_soft_matching(metric, 5, protected=prefix)
    out, out_size = merge_wavg(merge, x, size)
    assert out.shape == (2, 8, 6) and torch.equal(out[:, :prefix], x[:, :prefix])
    untouched = ~merge.received(x)[..., 0]
    assert torch.equal(out[untouched], merge.drop(x)[untouched])  # unmerged tokens keep their exact values
    assert torch.equal(out_size[:, :prefix], size[:, :prefix])
    assert torch.equal(out_size.sum(dim=1), size.sum(dim=1))


def test_merging_a_token_with_an_identical_copy_gives_the_weighted_mean():
    # positions 1..4 after one prefix token: A = {1, 3}, B = {2, 4}; token 1 has the same metric as token 2.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    metric = torch.stack([e2, e1, e1, e2 + e1 * 0.1, -e2])[None].double()
    x = torch.tensor([[7.0], [1.0], [5.0], [2.0], [3.0]])[None].double()
    size = torch.tensor([[1.0], [3.0], [1.0], [2.0], [1.0]])[None].double()
    merge = bipartite_soft_matching(metric, 1, protected=1)
    out, out_size = merge_wavg(merge, x, size)
    # prefix, unmerged A (token 3), B = (merged 1+2, token 4)
    assert torch.equal(out, torch.tensor([[[7.0], [2.0], [(3 * 1.0 + 1 * 5.0) / 4], [3.0]]]).double())
    assert torch.equal(out_size, torch.tensor([[[1.0], [2.0], [4.0], [1.0]]]).double())


def test_most_similar_pairs_are_merged_first_and_several_can_share_a_destination():
    metric = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.1], [1.0, 1.0]])[None]
    # no prefix: A = {0, 2, 4}, B = {1, 3, 5}; A0 -> B5 (0.71), A2 -> B1 (1.0), A4 -> B5 (0.77)
    merge = bipartite_soft_matching(metric, 2, protected=0)
    assert merge.merged_a.tolist() == [[1, 2]] and merge.dst_b.tolist() == [[0, 2]]
    merge = bipartite_soft_matching(metric, 3, protected=0)
    out, size = merge_wavg(merge, torch.arange(6.0)[None, :, None], None)
    assert size.flatten().tolist() == [2.0, 1.0, 3.0]
    assert out.flatten().tolist() == [1.5, 3.0, (0 + 4 + 5) / 3]


def test_descending_rank_is_the_rank_a_stable_sort_gives():
    score = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])  # ties everywhere
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    expected = torch.empty_like(order).scatter_(1, order, torch.arange(6).expand(2, 6))
    assert descending_rank(score).tolist() == expected.tolist() == [[2, 0, 3, 5, 1, 4], [0, 1, 2, 3, 4, 5]]
    rough = torch.randint(0, 4, (3, 40)).float()  # many ties, more entries
    order = torch.sort(rough, dim=-1, descending=True, stable=True).indices
    assert torch.equal(descending_rank(rough), torch.empty_like(order).scatter_(1, order, torch.arange(40).expand(3, 40)))


def test_r_is_clipped_to_the_a_set():
    assert max_merge(7, 1) == 3 and max_merge(8, 1) == 4 and max_merge(2, 1) == 0 and max_merge(1, 1) == 0
    metric, x = random_tokens(n=8), random_tokens(n=8, seed=3)
    out, size = merge_wavg(bipartite_soft_matching(metric, 50, protected=1), x, None)
    assert out.shape[1] == 4 and torch.equal(size.sum(dim=1), torch.full((2, 1), 8.0, dtype=size.dtype))
    out, size = merge_wavg(bipartite_soft_matching(metric[:, :2], 50, protected=1), x[:, :2], None)
    assert out.shape[1] == 2 and size is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes_and_sizes_kept_exact(dtype):
    metric, x = random_tokens(n=300, dtype=dtype), random_tokens(n=300, dtype=dtype, seed=4)
    size = None
    for _ in range(6):  # sizes grow past what bf16 holds exactly (256)
        x, size = merge_wavg(bipartite_soft_matching(metric, 60, protected=1), x, size)
        metric = x
    assert x.dtype == dtype and size.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.equal(size.sum(dim=1), torch.full((2, 1), 300.0, dtype=size.dtype))
    assert bool(torch.isfinite(x.float()).all())


def test_matching_is_deterministic_and_per_image():
    metric, x = random_tokens(batch=3, n=21), random_tokens(batch=3, n=21, seed=5)
    first = merge_wavg(bipartite_soft_matching(metric, 7, 1), x, None)
    again = merge_wavg(bipartite_soft_matching(metric, 7, 1), x, None)
    single = merge_wavg(bipartite_soft_matching(metric[1:2], 7, 1), x[1:2], None)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert torch.equal(first[0][1:2], single[0]) and torch.equal(first[1][1:2], single[1])


def test_merge_gradients_flow_to_tokens_not_through_the_choice():
    metric = random_tokens(n=9).requires_grad_()
    x = random_tokens(n=9, seed=6).requires_grad_()
    out, _ = merge_wavg(bipartite_soft_matching(metric, 3, 1), x, None)
    out.sum().backward()
    assert metric.grad is None  # the matching is a discrete choice
    torch.testing.assert_close(x.grad.sum(), torch.tensor(float(out.numel()), dtype=x.dtype))  # weights of each output sum to 1


# ----------------------------------------------------------------------------- proportional attention


def make_attention(**kwargs) -> Attention:
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, norm_layer=nn.LayerNorm, **kwargs).double().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return attn


ATTENTIONS = [dict(qkv_bias=True), dict(qk_norm=True, scale_norm=True), dict(qkv_bias=True, gated=True)]


@pytest.mark.parametrize("kwargs", ATTENTIONS)
@pytest.mark.parametrize("fused", [True, False])
def test_proportional_attention_without_or_with_unit_sizes_is_plain_attention(kwargs, fused):
    attn = make_attention(**kwargs)
    attn.fused_attn = fused
    x = random_tokens(n=9, channels=16)
    plain = attn(x)
    out, metric = proportional_attention(attn, x, None)
    torch.testing.assert_close(out, plain, atol=1e-12, rtol=0)
    torch.testing.assert_close(proportional_attention(attn, x, torch.ones(2, 9, 1, dtype=x.dtype))[0], plain, atol=1e-12, rtol=0)
    assert metric.shape == (2, 9, attn.head_dim)


@pytest.mark.parametrize("fused", [True, False])
def test_a_token_of_size_k_attends_like_k_copies(fused):
    attn = make_attention(qkv_bias=True)
    attn.fused_attn = fused
    x = random_tokens(n=5, channels=16)
    copies = torch.cat([x, x[:, 2:3].expand(-1, 2, -1)], dim=1)  # token 2 three times
    size = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0], dtype=x.dtype).expand(2, 5)[..., None]
    out, _ = proportional_attention(attn, x, size)
    torch.testing.assert_close(out, attn(copies)[:, :5], atol=1e-12, rtol=0)


def test_the_size_bias_is_computed_once_per_change_of_the_sizes():
    state = TokenSize(num_prefix_tokens=1)
    assert state.bias() is None
    size = torch.tensor([[[1.0], [3.0], [2.0]]])
    state.size = size
    bias = state.bias()
    torch.testing.assert_close(bias, size.log().reshape(1, 1, 1, 3), atol=0, rtol=0)
    assert state.bias() is bias  # the blocks after a merge share one bias
    state.size = size * 2  # a merge or a handed-over size replaces it
    torch.testing.assert_close(state.bias(), (size * 2).log().reshape(1, 1, 1, 3), atol=0, rtol=0)
    state.size = None
    assert state.bias() is None


# ----------------------------------------------------------------------------- the patch as a module


def test_train_mode_backward_reaches_every_parameter():
    model = make_model("deit3", dtype=torch.float32, drop_path_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1)
    tome = patch_tome(model, [8, 8, 8, 8]).train()
    loss = F.cross_entropy(tome(images(4, torch.float32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [name for name, p in tome.named_parameters() if p.grad is None or not bool(torch.isfinite(p.grad).all())]
    assert not missing
    assert tome.blocks[0].ls1.gamma.grad.abs().sum() > 0


def test_deepcopy_gives_identical_outputs_and_own_state():
    tome = patch_tome(make_model("registers"), [10, 6, 4, 2])
    clone = copy.deepcopy(tome)
    assert clone.tome_state is not tome.tome_state
    assert all(blk.tome_state is clone.tome_state for blk in clone.blocks)
    assert tome_schedule(clone) == [10, 6, 4, 2]
    # While the clone runs, the original's state stays untouched (and vice versa).
    during = []
    clone.blocks[2].register_forward_pre_hook(lambda blk, args: during.append((token_size(blk), tome.tome_state.size)))
    x = images()
    torch.testing.assert_close(clone(x), tome(x), atol=0, rtol=0)
    assert during[0][0] is not None and during[0][1] is None


def test_pickle_round_trip():
    tome = patch_tome(make_model(), [8, 8, 0, 4])
    buffer = io.BytesIO()
    torch.save(tome, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(blk.tome_state is loaded.tome_state for blk in loaded.blocks)
    x = images()
    torch.testing.assert_close(loaded(x), tome(x), atol=0, rtol=0)


def test_batch_of_one_equals_its_row_of_a_batch():
    tome = patch_tome(make_model(), r_schedule(4, 10, 65, 1, "decreasing"))
    x = images(3)
    torch.testing.assert_close(tome(x[1:2]), tome(x)[1:2], atol=1e-10, rtol=0)


def test_state_dict_unchanged_and_loadable_from_the_stock_model():
    model = make_model("deit3")
    tome = patched(model, [8, 8, 8, 8])
    assert list(tome.state_dict()) == list(model.state_dict())
    fresh = patch_tome(timm.create_model(VARIANTS["deit3"][0], **{**SMALL, **VARIANTS["deit3"][1]}).double().eval(), [8] * 4)
    fresh.load_state_dict(model.state_dict())
    x = images()
    torch.testing.assert_close(fresh(x), tome(x), atol=0, rtol=0)


def test_repatching_changes_only_the_schedule():
    model = make_model()
    tome = patch_tome(copy.deepcopy(model), [8, 8, 8, 8])
    hooks = len(tome._forward_pre_hooks)
    patch_tome(tome, [0, 0, 0, 0])
    assert len(tome._forward_pre_hooks) == hooks and tome_schedule(tome) == [0] * 4
    assert type(tome.blocks[0]).__name__ == "ToMeBlock"
    x = images()
    torch.testing.assert_close(tome(x), model(x), atol=1e-10, rtol=0)
    assert tome_schedule(model) == [0] * 4


def test_forward_features_alone_starts_from_fresh_sizes():
    tome = patch_tome(make_model(), [8, 8, 8, 8])
    x = images()
    first = tome.forward_features(x)  # the model's own hooks do not run; patch_embed's do
    torch.testing.assert_close(tome.forward_features(x), first, atol=0, rtol=0)
    torch.testing.assert_close(tome.forward_head(first), tome(x), atol=0, rtol=0)


@pytest.mark.slow
def test_compiles_as_one_graph():  # dynamo only (eager backend): no C++ compiler needed
    tome = patch_tome(make_model(dtype=torch.float32), [8, 8, 4, 0])
    x = images(2, torch.float32)
    compiled = torch.compile(tome, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), tome(x), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- handing sizes over


def halve_last_patches(x: torch.Tensor, size: torch.Tensor, pairs: int = 4):
    """A stand-in for a token-aggregation stage: average the last 2*pairs tokens pairwise."""
    tail = x[:, -2 * pairs :].reshape(x.shape[0], pairs, 2, -1)
    tail_size = size[:, -2 * pairs :].reshape(size.shape[0], pairs, 2, 1)
    pooled = (tail * tail_size).sum(dim=2) / tail_size.sum(dim=2)
    return torch.cat([x[:, : -2 * pairs], pooled], dim=1), torch.cat([size[:, : -2 * pairs], tail_size.sum(dim=2)], dim=1)


def test_sizes_handed_over_by_another_stage_weigh_later_attention():
    model = make_model("deit3")
    schedule = [6, 0, 0, 4]
    tome = patched(model, schedule)

    def stage(block, args):  # like a GLAD pre-hook: change the tokens, then hand over their sizes
        x, size = halve_last_patches(args[0], token_size(block))
        set_token_size(block, size)
        return (x,)

    tome.blocks[2].register_forward_pre_hook(stage)
    x = images()
    with torch.no_grad():
        expected = reference_forward(model, x, schedule, stage_at={2: halve_last_patches})
        torch.testing.assert_close(tome(x), expected, atol=1e-10, rtol=0)


def test_unit_sizes_handed_over_change_nothing():
    model = make_model()
    tome = patched(model, [0] * 4)
    tome.blocks[1].register_forward_pre_hook(lambda blk, args: set_token_size(blk, torch.ones(2, 65, 1, dtype=torch.float64)))
    x = images()
    torch.testing.assert_close(tome(x), model(x), atol=1e-10, rtol=0)


def test_a_stage_that_forgets_to_hand_over_sizes_is_caught():
    tome = patch_tome(make_model(), [8, 0, 0, 0])
    tome.blocks[2].register_forward_pre_hook(lambda blk, args: (args[0][:, :-4],))
    with pytest.raises(VitcompressError, match="set_token_size"):
        tome(images())
    assert tome.tome_state.size is not None  # left over by the failed forward ...
    tome.blocks[2]._forward_pre_hooks.clear()
    tome(images())  # ... and reset by the next one


def test_set_token_size_checks_its_input():
    tome = patch_tome(make_model(), [0] * 4)
    with pytest.raises(VitcompressError, match=r"\[B, N, 1\]"):
        set_token_size(tome, torch.ones(2, 65))
    with pytest.raises(VitcompressError, match="not patched"):
        set_token_size(make_model(), None)
    state = tome.tome_state
    assert isinstance(state, TokenSize)
    set_token_size(state, torch.ones(1, 3, 1))
    assert token_size(tome.blocks[3]).shape == (1, 3, 1)


# ----------------------------------------------------------------------------- user mistakes


def test_static_attention_blocks_are_refused_where_tokens_move():
    model = make_model()
    model.blocks[1].attn = DGSSA(model.blocks[1].attn, 65)
    with pytest.raises(UnsupportedModelError, match="block 1 has DGSSA"):
        patch_tome(copy.deepcopy(model), [0, 4, 0, 0])
    with pytest.raises(UnsupportedModelError, match="block 1 has DGSSA"):
        patch_tome(copy.deepcopy(model), [4, 0, 0, 0])
    tome = patch_tome(copy.deepcopy(model), [0, 0, 4, 4])  # merging after the static block is fine
    x = images()
    with torch.no_grad():
        assert tome(x).shape == (2, 10)
        torch.testing.assert_close(patch_tome(copy.deepcopy(model), [0] * 4)(x), model(x), atol=1e-10, rtol=0)


def test_static_attention_swapped_in_after_patching_fails_clearly():
    tome = patch_tome(make_model(), [4, 0, 0, 0])
    tome.blocks[2].attn = DGSSA(tome.blocks[2].attn, 61)
    with pytest.raises(VitcompressError, match="cannot merge tokens nor weigh them by size"):
        tome(images())


def test_user_mistakes_raise_one_line_errors():
    model = make_model()
    with pytest.raises(VitcompressError, match="one r >= 0 for each of the model's 4 blocks"):
        patch_tome(copy.deepcopy(model), [1, 2])
    with pytest.raises(VitcompressError, match="one r >= 0"):
        patch_tome(copy.deepcopy(model), [1, -2, 0, 0])
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        patch_tome(nn.Linear(2, 2), [0])
    tome = patch_tome(copy.deepcopy(model), [4, 0, 0, 0])
    with pytest.raises(VitcompressError, match="attn_mask"):
        tome(images(), attn_mask=torch.zeros(65, 65, dtype=torch.bool))
    tome.set_grad_checkpointing(True)
    tome.train()
    with pytest.raises(VitcompressError, match="gradient checkpointing"):
        tome(images())
    with torch.no_grad():
        tome(images())  # no recomputation without gradients


def test_non_standard_blocks_are_refused():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", **{**SMALL, "block_fn": timm.models.vision_transformer.ResPostBlock})
    with pytest.raises(UnsupportedModelError, match="ResPostBlock"):
        patch_tome(model, [0] * 4)
