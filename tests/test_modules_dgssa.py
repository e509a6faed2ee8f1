"""DGSSA: exactness against timm's dynamic attention (all or some heads static), eval cache, frozen form
(trace, compile, export, ONNX), gradients, dropout, half precision, state dicts, errors."""

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

# torch.jit.trace is deprecated in recent torch and warns on shape checks; tracing is still tested.
quiet_trace = pytest.mark.filterwarnings(
    "ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning", "ignore::DeprecationWarning"
)


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
    with torch.no_grad():  # the cache serves only calls that need no gradient
        first = static.attention()
        assert static.attention() is first  # cached
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


# ---- gradients in eval mode --------------------------------------------------------------------
def test_eval_mode_with_grad_enabled_trains_the_logits():
    static = DGSSA(make_attention(), N).eval()
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    with torch.no_grad():
        static.attention()  # fill the cache: it must not be what the grad-enabled forward uses
    static(x).square().sum().backward()
    assert static.logits.grad is not None and static.logits.grad.abs().sum() > 0
    assert static.attention().requires_grad
    with torch.no_grad():
        assert not static.attention().requires_grad
    static.logits.requires_grad_(False)  # no gradient wanted: the cache serves grad-enabled calls too
    assert static.attention() is static.attention()


# ---- half precision ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_init_gives_finite_logits(dtype):
    probs = torch.zeros(HEADS, N, N)
    probs[..., 0] = 1.0
    static = DGSSA(make_attention().to(dtype), N, init_probs=probs)
    assert static.logits.dtype == dtype
    assert torch.isfinite(static.logits).all()
    expected = torch.tensor(MIN_PROB, dtype=torch.float32).log().to(dtype)
    assert torch.equal(static.logits.min(), expected)
    assert torch.equal(static.logits.max(), torch.zeros((), dtype=dtype))
    probs_out = static.eval().attention()
    assert probs_out.dtype == dtype and torch.isfinite(probs_out).all()


# ---- attention dropout -------------------------------------------------------------------------
def test_attention_dropout_is_drawn_per_image():
    attn = make_attention(attn_drop=0.5)
    static = DGSSA(attn, N).train()
    x = torch.randn(1, N, DIM, dtype=torch.float64).expand(2, N, DIM)  # two identical images
    torch.manual_seed(123)
    out = static(x)
    assert not torch.allclose(out[0], out[1])
    torch.manual_seed(123)
    torch.testing.assert_close(static(x), out, atol=0, rtol=0)  # reproducible under a seed

    # Exactly the dynamic formula with an independent mask per image and head.
    torch.manual_seed(123)
    probs = static.attention().detach()
    masked = torch.nn.functional.dropout(probs.expand(2, HEADS, N, N), 0.5, training=True)
    v = static.v(x).reshape(2, N, HEADS, -1).transpose(1, 2)
    expected = static.proj((masked @ v).transpose(1, 2).reshape(2, N, -1))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_attention_dropout_off_in_eval_and_with_p_zero():
    x = torch.randn(1, N, DIM, dtype=torch.float64).expand(2, N, DIM)
    dropped = DGSSA(make_attention(attn_drop=0.5), N).eval()
    plain = DGSSA(make_attention(), N).train()
    torch.testing.assert_close(dropped(x), plain(x), atol=0, rtol=0)
    out = plain(x)
    torch.testing.assert_close(out[0], out[1], atol=1e-12, rtol=0)  # one GEMM: columns may round differently


# ---- torch 2.1 compatibility -------------------------------------------------------------------
def test_is_compiling_found_on_old_and_new_torch():
    from types import SimpleNamespace

    from vitcompress.modules.dgssa import _find_is_compiling

    def new() -> bool:
        return True

    def old() -> bool:
        return True

    assert _find_is_compiling(SimpleNamespace(compiler=SimpleNamespace(is_compiling=new), _dynamo=SimpleNamespace(is_compiling=old))) is new
    assert _find_is_compiling(SimpleNamespace(compiler=SimpleNamespace(), _dynamo=SimpleNamespace(is_compiling=old))) is old  # torch 2.1
    assert _find_is_compiling(SimpleNamespace())() is False
    assert _find_is_compiling(torch)() is False


# ---- the batched product -----------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_batched_product_equals_broadcast_formula(batch):
    attn = make_attention(qkv_bias=True, scale_norm=True, gated=True)
    x = torch.randn(batch, N, DIM, dtype=torch.float64)
    probs = torch.rand(HEADS, N, N, dtype=torch.float64)
    static = DGSSA(attn, N, init_probs=probs / probs.sum(-1, keepdim=True)).eval()
    with torch.no_grad():
        a = static.attention()
        v = static.v(x).reshape(batch, N, HEADS, -1).transpose(1, 2)
        heads = (a @ v).transpose(1, 2).reshape(batch, N, -1)  # the broadcast formula
        expected = static.proj(static.norm(heads) * static.gate(x).sigmoid())
        torch.testing.assert_close(static(x), expected, atol=1e-12, rtol=0)


def largest_new_storage(fn) -> int:
    """Bytes of the largest storage any op allocates while ``fn`` runs (views allocate none)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Storages(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
            return out

    with torch.no_grad(), Storages() as mode:
        fn()
    return mode.largest


def test_shared_map_is_not_copied_per_image():
    batch = 8
    static = DGSSA(make_attention(), N).freeze()
    x = torch.randn(batch, N, DIM, dtype=torch.float64)
    per_image_maps = batch * HEADS * N * N * 8
    assert largest_new_storage(lambda: static(x)) < per_image_maps
    v = static.v(x).detach().reshape(batch, N, HEADS, -1).transpose(1, 2)
    assert largest_new_storage(lambda: static.probs @ v) >= per_image_maps  # what the broadcast did


# ---- frozen inference form ---------------------------------------------------------------------
def frozen_pair(**kwargs) -> tuple[DGSSA, DGSSA, torch.Tensor]:
    attn = make_attention(**kwargs)
    x = torch.randn(3, N, DIM, dtype=torch.float64)
    init = dynamic_attention(attn, x)[0]
    return DGSSA(attn, N, init_probs=init).eval(), DGSSA(attn, N, init_probs=init).freeze(), x


def test_frozen_equals_unfrozen_and_keeps_the_state_dict():
    plain, frozen, x = frozen_pair(qkv_bias=True, qk_norm=True, scale_norm=True, gated=True)
    assert frozen.frozen and not frozen.training and not frozen.logits.requires_grad
    torch.testing.assert_close(frozen(x), plain(x), atol=0, rtol=0)
    with torch.no_grad():
        assert frozen.attention() is frozen.probs
    assert set(frozen.state_dict()) == set(plain.state_dict())
    assert "frozen=True" in repr(frozen)


def test_frozen_probs_follow_load_state_dict():
    _, frozen, x = frozen_pair()
    other = DGSSA(make_attention(), N, init_probs=torch.rand(HEADS, N, N, dtype=torch.float64)).eval()
    for assign in (False, True):
        frozen.load_state_dict(other.state_dict(), assign=assign)
        assert frozen.frozen
        torch.testing.assert_close(frozen.probs, other.attention().detach(), atol=0, rtol=0)
        torch.testing.assert_close(frozen(x), other(x), atol=0, rtol=0)


def test_frozen_probs_follow_inplace_changes_and_optimizer_steps():
    _, frozen, x = frozen_pair()
    with torch.no_grad():
        frozen.logits[:, :, 0].add_(3.0)
    torch.testing.assert_close(frozen.attention(), frozen.logits.softmax(-1), atol=0, rtol=0)
    opt = torch.optim.SGD([frozen.logits], lr=0.5)
    frozen.logits.grad = torch.randn_like(frozen.logits)  # stepping a frozen module on purpose
    opt.step()
    with torch.no_grad():
        expected = DGSSA(make_attention(), N).eval()
        expected.logits.copy_(frozen.logits)
        torch.testing.assert_close(frozen(x), expected(x), atol=0, rtol=0)


def test_train_unfreezes_and_restores_requires_grad():
    _, frozen, x = frozen_pair()
    frozen.train()
    assert not frozen.frozen and frozen.probs is None and frozen.logits.requires_grad
    frozen(x).sum().backward()
    assert frozen.logits.grad is not None
    torch.optim.SGD([frozen.logits], lr=1.0).step()
    frozen.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen.attention(), frozen.logits.softmax(-1), atol=0, rtol=0)
    frozen.freeze().unfreeze()
    assert frozen.logits.requires_grad and frozen.probs is None
    frozen.logits.requires_grad_(False)
    frozen.freeze().unfreeze()
    assert not frozen.logits.requires_grad  # restored to what it was, not forced on


def test_frozen_with_requires_grad_back_on_trains_the_logits():
    _, frozen, x = frozen_pair()
    frozen.logits.requires_grad_(True)
    frozen(x).sum().backward()
    assert frozen.logits.grad is not None and frozen.logits.grad.abs().sum() > 0


def test_frozen_under_inference_mode_then_autograd():
    attn = make_attention()
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    with torch.inference_mode():
        frozen = DGSSA(attn, N).freeze()  # built and frozen in inference mode
        expected = frozen(x)
    static = DGSSA(attn, N).eval()
    with torch.inference_mode():
        static.freeze()
    xg = x.clone().requires_grad_(True)
    out = static(xg)  # autograd saves probs for the gradient w.r.t. the values
    out.sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(out.detach(), expected.clone(), atol=0, rtol=0)


@quiet_trace
def test_frozen_trace_is_softmax_free_and_exact():
    plain, frozen, x = frozen_pair(qkv_bias=True, qk_norm=True, scale_norm=True, gated=True)
    traced = torch.jit.trace(frozen, (x,))
    assert "softmax" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), plain(x), atol=0, rtol=0)
    x2 = torch.randn(5, N, DIM, dtype=torch.float64)
    torch.testing.assert_close(traced(x2), plain(x2), atol=0, rtol=0)


def test_frozen_graph_captures_whole_under_torch_compile_and_export():
    # aot_eager: dynamo's graph capture (fullgraph: no graph break) without a C++ compiler.
    plain, frozen, x = frozen_pair()
    compiled = torch.compile(frozen, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), atol=1e-12, rtol=0)
    exported = torch.export.export(frozen, (x,))
    assert "softmax" not in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), plain(x), atol=0, rtol=0)


@pytest.mark.slow
def test_frozen_under_torch_compile_inductor():
    import shutil

    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        pytest.skip("inductor needs a C++ compiler")
    plain, frozen, x = frozen_pair()
    compiled = torch.compile(frozen.float(), fullgraph=True)  # ~30 s on a busy 2-core CPU
    with torch.no_grad():
        torch.testing.assert_close(compiled(x.float()), plain.float()(x.float()), atol=1e-5, rtol=1e-5)


@quiet_trace
def test_frozen_onnx_export_is_softmax_free(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    plain, frozen, x = frozen_pair()
    plain, frozen, x = plain.float(), frozen.float(), x.float()
    path = tmp_path / "dgssa.onnx"
    torch.onnx.export(frozen, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Softmax" not in ops and "MatMul" in ops
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), plain(x), atol=1e-5, rtol=1e-5)


def test_frozen_deepcopy_and_dtype_change():
    _, frozen, x = frozen_pair()
    twin = copy.deepcopy(frozen)
    assert twin.frozen and twin.probs is not frozen.probs
    torch.testing.assert_close(twin(x), frozen(x), atol=0, rtol=0)
    frozen.float()
    assert frozen.probs.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(frozen.attention(), frozen.logits.softmax(-1), atol=1e-7, rtol=0)


# ---- per-head static attention -----------------------------------------------------------------
@quiet_trace
@pytest.mark.parametrize("kwargs", ATTENTION_VARIANTS)
@pytest.mark.parametrize("heads", [[2], [0, 3], [1, 2, 3]])
def test_partial_static_heads_reproduce_dynamic_attention_exactly(kwargs, heads):
    attn = make_attention(**kwargs)
    x = torch.randn(1, N, DIM, dtype=torch.float64)
    own = dynamic_attention(attn, x)[0]
    full_init = DGSSA(attn, N, init_probs=own, static_heads=heads).eval()
    rows_init = DGSSA(attn, N, init_probs=own[heads], static_heads=list(reversed(heads))).eval()
    assert full_init.static_heads == tuple(heads) and tuple(full_init.logits.shape) == (len(heads), N, N)
    for static in (full_init, rows_init):
        torch.testing.assert_close(static(x), attn(x), atol=1e-10, rtol=0)
        torch.testing.assert_close(static.freeze()(x), attn(x), atol=1e-10, rtol=0)
        torch.testing.assert_close(torch.jit.trace(static, (x,))(x), attn(x), atol=1e-10, rtol=0)


def test_partial_static_heads_parameters():
    attn = make_attention(qkv_bias=True, qk_norm=True)
    static = DGSSA(attn, N, static_heads=[1, 3])
    assert static.dynamic_heads == (0, 2)
    assert set(static.state_dict()) == {
        "v.weight", "v.bias", "qk.weight", "qk.bias", "q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias",
        "proj.weight", "proj.bias", "logits",
    }
    d, a = attn.head_dim, attn.num_heads * attn.head_dim
    rows = [*range(0, d), *range(2 * d, 3 * d), *range(a, a + d), *range(a + 2 * d, a + 3 * d)]
    assert torch.equal(static.qk.weight, attn.qkv.weight[rows])
    assert torch.equal(static.qk.bias, attn.qkv.bias[rows])
    assert "static_heads=[1, 3]" in repr(static)


def test_all_heads_static_is_the_default_module():
    attn = make_attention(qkv_bias=True, qk_norm=True, scale_norm=True, gated=True)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    init = dynamic_attention(attn, x)[0]
    default = DGSSA(attn, N, init_probs=init).eval()
    explicit = DGSSA(attn, N, init_probs=init, static_heads=[3, 1, 0, 2]).eval()
    assert explicit.static_heads == (0, 1, 2, 3) and explicit.dynamic_heads == ()
    assert set(explicit.state_dict()) == set(default.state_dict())
    torch.testing.assert_close(explicit(x), default(x), atol=0, rtol=0)
    assert "static_heads=all" in repr(default)


def test_partial_static_heads_train_with_dropout():
    attn = make_attention(attn_drop=0.5)
    static = DGSSA(attn, N, static_heads=[0]).train()
    x = torch.randn(1, N, DIM, dtype=torch.float64).expand(2, N, DIM)
    out = static(x)
    assert not torch.allclose(out[0], out[1])
    out.square().sum().backward()
    assert static.logits.grad.abs().sum() > 0 and static.qk.weight.grad.abs().sum() > 0


def test_partial_static_heads_errors():
    attn = make_attention()
    for heads in ([], [0, 0], [4], [-1]):
        with pytest.raises(VitcompressError, match="static_heads"):
            DGSSA(attn, N, static_heads=heads)
    with pytest.raises(VitcompressError, match=r"heads=4 or static heads=2"):
        DGSSA(attn, N, init_probs=torch.rand(3, N, N), static_heads=[0, 1])
