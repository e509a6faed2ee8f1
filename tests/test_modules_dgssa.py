"""DGSSA: exactness against timm's dynamic attention, eval cache, gradients, state dicts, errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import Attention
from torch import nn

from vitcompress.errors import UnsupportedModelError, VitcompressError
from vitcompress.modules import DGSSA
from vitcompress.modules.dgssa import MIN_PROB

DIM, HEADS, N = 64, 4, 17


def dynamic_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) of a timm Attention, q_norm/k_norm included: [B, H, N, N]."""
    B, n, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def make_attention(**kwargs) -> Attention:
    torch.manual_seed(0)
    attn = Attention(DIM, num_heads=HEADS, norm_layer=nn.LayerNorm, **kwargs).double().eval()
    # Non-trivial norm parameters, so that dropping q_norm/k_norm and keeping `norm` is really tested.
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return attn


ATTENTION_VARIANTS = [
    dict(qkv_bias=True),
    dict(qkv_bias=False),
    dict(qkv_bias=True, qk_norm=True, scale_norm=True, gated=True),
]


@pytest.mark.parametrize("kwargs", ATTENTION_VARIANTS)
def test_own_attention_reproduces_dynamic_attention_exactly(kwargs):
    attn = make_attention(**kwargs)
    x = torch.randn(1, N, DIM, dtype=torch.float64)
    static = DGSSA(attn, N, init_probs=dynamic_attention(attn, x)[0]).eval()
    torch.testing.assert_close(static(x), attn(x), atol=1e-10, rtol=0)


def test_block_output_equals_original_block_for_that_image():
    torch.manual_seed(0)
    model = timm.create_model(
        "deit3_small_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=DIM, depth=2,
        num_heads=HEADS, num_classes=10,
    ).double().eval()
    block = model.blocks[1]
    with torch.no_grad():
        block.ls1.gamma.uniform_(0.5, 1.5)  # LayerScale must be reused by the new attention
    x = torch.randn(1, 65, DIM, dtype=torch.float64)
    probs = dynamic_attention(block.attn, block.norm1(x))[0]
    new_block = copy.deepcopy(block)
    new_block.attn = DGSSA(block.attn, 65, init_probs=probs)
    new_block.eval()
    torch.testing.assert_close(new_block(x), block(x), atol=1e-10, rtol=0)


def test_uniform_without_init_and_rows_sum_to_one():
    static = DGSSA(make_attention(), N).eval()
    torch.testing.assert_close(static.attention(), torch.full((HEADS, N, N), 1.0 / N, dtype=torch.float64))


def test_zero_probabilities_give_finite_logits():
    probs = torch.zeros(HEADS, N, N)
    probs[..., 0] = 1.0
    static = DGSSA(make_attention(), N, init_probs=probs)
    assert torch.isfinite(static.logits).all()
    assert static.logits.min().item() == pytest.approx(torch.log(torch.tensor(MIN_PROB, dtype=torch.float64)).item())


def test_eval_cache_reused_and_dropped_after_inplace_change():
    static = DGSSA(make_attention(), N).eval()
    first = static.attention()
    assert static.attention() is first  # cached
    with torch.no_grad():
        static.logits[:, :, 0].add_(3.0)
    after = static.attention()
    torch.testing.assert_close(after, static.logits.detach().softmax(-1), atol=0, rtol=0)
    assert not torch.equal(after, first)


def test_eval_cache_dropped_after_optimizer_step_and_load_state_dict():
    attn = make_attention()
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    static = DGSSA(attn, N).eval()
    for opt_cls in (torch.optim.SGD, torch.optim.AdamW):
        stale = static.attention()
        opt = opt_cls([static.logits], lr=0.5)
        static(x).square().sum().backward()  # eval-mode forward: grads reach v/proj, not the cached logits
        static.logits.grad = torch.randn_like(static.logits)
        opt.step()
        torch.testing.assert_close(static.attention(), static.logits.detach().softmax(-1), atol=0, rtol=0)
        assert not torch.equal(static.attention(), stale)

    other = DGSSA(attn, N, init_probs=dynamic_attention(attn, x)[0]).eval()
    stale = static.attention()
    static.load_state_dict(other.state_dict())
    torch.testing.assert_close(static.attention(), other.attention(), atol=0, rtol=0)
    assert not torch.equal(static.attention(), stale)


def test_cache_made_under_inference_mode_is_not_reused_by_autograd():
    static = DGSSA(make_attention(), N).eval()
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    with torch.inference_mode():
        expected = static(x)
    out = static(x)  # grad-enabled eval forward (e.g. a validation loss)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected.clone(), atol=0, rtol=0)
    # Autograd must be able to save the eval attention itself, which an inference tensor forbids.
    weight = torch.ones(N, dtype=torch.float64, requires_grad=True)
    (static.attention() * weight).sum().backward()
    assert weight.grad is not None


def test_cache_follows_dtype_change():
    static = DGSSA(make_attention(), N).eval()
    assert static.attention().dtype == torch.float64
    static.float()
    assert static.attention().dtype == torch.float32


def test_gradient_flows_to_logits_in_train_mode():
    attn = make_attention()
    static = DGSSA(attn, N).train()
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    static(x).square().sum().backward()
    assert static.logits.grad is not None and static.logits.grad.abs().sum() > 0

    # Dynamic guidance: attention() is differentiable and a loss pulls it toward a target.
    static.zero_grad()
    target = dynamic_attention(attn, x).mean(0).detach()
    loss = (static.attention() - target).square().sum()
    loss.backward()
    with torch.no_grad():
        static.logits -= 10.0 * static.logits.grad
    assert (static.attention() - target).square().sum() < loss


def test_state_dict_round_trip():
    attn = make_attention(qkv_bias=True)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    static = DGSSA(attn, N, init_probs=dynamic_attention(attn, x)[0]).eval()
    fresh = DGSSA(make_attention(qkv_bias=True), N).eval()
    assert set(static.state_dict()) == {"v.weight", "v.bias", "proj.weight", "proj.bias", "logits"}
    fresh.load_state_dict(static.state_dict())
    torch.testing.assert_close(fresh(x), static(x), atol=0, rtol=0)


def test_original_attention_is_not_modified():
    attn = make_attention()
    before = copy.deepcopy(attn.state_dict())
    static = DGSSA(attn, N)
    with torch.no_grad():
        static.proj.weight.zero_()
        static.v.weight.zero_()
    for key, value in attn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_errors():
    attn = make_attention()
    static = DGSSA(attn, N)
    with pytest.raises(VitcompressError, match="built for 17 tokens but got 16"):
        static(torch.randn(1, N - 1, DIM, dtype=torch.float64))
    with pytest.raises(VitcompressError, match="mask"):
        static(torch.randn(1, N, DIM, dtype=torch.float64), attn_mask=torch.zeros(N, N, dtype=torch.bool))
    with pytest.raises(VitcompressError, match="mask"):
        static(torch.randn(1, N, DIM, dtype=torch.float64), is_causal=True)
    with pytest.raises(VitcompressError, match=r"shape \[4, 16, 16\]"):
        DGSSA(attn, N, init_probs=torch.rand(HEADS, N - 1, N - 1))
    with pytest.raises(VitcompressError, match="non-negative"):
        DGSSA(attn, N, init_probs=-torch.rand(HEADS, N, N))
    with pytest.raises(UnsupportedModelError, match="MultiheadAttention"):
        DGSSA(nn.MultiheadAttention(DIM, HEADS), N)
