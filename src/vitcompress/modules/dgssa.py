"""DGSSA: dynamic-guided static self-attention (arXiv:2310.07664).

A drop-in replacement for a timm ``Attention`` module in which the input-dependent attention
``softmax(q k^T / sqrt(d))`` is replaced by one learned, input-independent attention matrix per
head. The query and key projections (and ``q_norm``/``k_norm``) are dropped; the value projection,
the optional ``norm`` (scale_norm) and ``gate``, and the output projection are kept.

The static logits start from the mean dynamic attention measured by ``analyze`` (``log`` of the
mean probabilities), so the new layer starts out doing on average what the replaced one did;
fine-tuning then pulls ``attention()`` toward the teacher's per-image dynamic attention
("dynamic guidance").
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from vitcompress.errors import UnsupportedModelError, VitcompressError

# Mean probabilities are clamped to at least this before the log: an exact 0 would give -inf logits
# (NaN gradients, and a softmax entry that fine-tuning could never revive).
MIN_PROB = 1e-8


class DGSSA(nn.Module):
    """Static self-attention replacing ``attn`` (a timm ``Attention``) in a block.

    Args:
        attn: the timm ``Attention`` module being replaced. Its value/output weights are copied
            (the original module is left untouched).
        num_tokens: the token count N (prefix tokens included) this layer will always run on.
        init_probs: optional [num_heads, N, N] attention probabilities (typically the mean dynamic
            attention of this layer); the logits are initialised to ``log(clamp(p, MIN_PROB))``.
            Rows are renormalised by the softmax. Without it, the attention starts uniform.

    Parameters: ``logits`` [num_heads, N, N] and the value projection ``v`` (rows [2A:3A] of the
    original ``qkv``, A = num_heads * head_dim), plus the original ``proj``/``norm``/``gate``.

    In eval mode the softmax of the logits is computed once and cached; the cache is dropped
    whenever the logits change (tracked through the parameter's version counter, storage and
    dtype, which covers optimizer steps, ``load_state_dict`` and ``.to()``). Mutating the logits
    through ``.data`` bypasses the version counter: call ``clear_cache()`` after doing that.
    """

    def __init__(self, attn: nn.Module, num_tokens: int, init_probs: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        _check_attention(attn)
        if int(num_tokens) < 1:
            raise VitcompressError(f"DGSSA needs a positive token count, got {num_tokens}")
        self.num_heads: int = int(attn.num_heads)
        self.head_dim: int = int(attn.head_dim)
        self.attn_dim: int = self.num_heads * self.head_dim
        self.num_tokens: int = int(num_tokens)

        self.v = _value_projection(attn.qkv, self.attn_dim)
        self.attn_drop = copy.deepcopy(attn.attn_drop)
        self.norm = copy.deepcopy(attn.norm)
        gate = getattr(attn, "gate", None)
        self.gate = copy.deepcopy(gate) if gate is not None else None
        self.proj = copy.deepcopy(attn.proj)
        self.proj_drop = copy.deepcopy(attn.proj_drop)

        weight = attn.qkv.weight
        self.logits = nn.Parameter(self._initial_logits(init_probs, weight.dtype, weight.device))
        self._cache: Optional[torch.Tensor] = None
        self._cache_key: Optional[tuple] = None

    def _initial_logits(self, init_probs: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        shape = (self.num_heads, self.num_tokens, self.num_tokens)
        if init_probs is None:
            return torch.zeros(shape, dtype=dtype, device=device)  # softmax(0) = uniform
        probs = torch.as_tensor(init_probs).detach()
        if tuple(probs.shape) != shape:
            raise VitcompressError(
                f"attention init has shape {list(probs.shape)} but this layer needs "
                f"[heads={self.num_heads}, N={self.num_tokens}, N={self.num_tokens}]: measure it on the same "
                f"model and input size (vitcompress analyze), or start from uniform attention"
            )
        if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
            raise VitcompressError("attention init must be finite, non-negative probabilities: re-run vitcompress analyze")
        return probs.to(device=device, dtype=dtype).clamp_min(MIN_PROB).log()

    def clear_cache(self) -> None:
        """Forget the cached eval-mode attention (needed only after mutating ``logits.data``)."""
        self._cache = None
        self._cache_key = None

    def attention(self) -> torch.Tensor:
        """Attention probabilities [num_heads, N, N] (rows sum to 1).

        Differentiable in train mode (use it for the dynamic-guidance loss); in eval mode a
        detached, cached tensor.
        """
        if self.training or _is_exporting():
            return self.logits.softmax(dim=-1)
        p = self.logits
        # A tensor made under inference_mode cannot be used by autograd later: key on the mode too.
        key = (p._version, p.data_ptr(), p.dtype, p.device, torch.is_inference_mode_enabled())
        if self._cache is None or self._cache_key != key:
            with torch.no_grad():
                self._cache = p.softmax(dim=-1)
            self._cache_key = key
        return self._cache

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """Same signature as timm's ``Attention.forward``; masks are refused (the attention is fixed)."""
        if attn_mask is not None or is_causal:
            raise VitcompressError(
                "static attention (DGSSA) cannot apply an attention mask or causal masking: "
                "call the model without attn_mask/is_causal"
            )
        B, N, _ = x.shape
        if N != self.num_tokens:
            raise VitcompressError(
                f"static attention was built for {self.num_tokens} tokens but got {N}: "
                f"feed images of the size the model was converted for"
            )
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, D]
        attn = self.attn_drop(self.attention())  # [H, N, N], broadcast over the batch
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def train(self, mode: bool = True) -> "DGSSA":
        self.clear_cache()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_tokens={self.num_tokens}"


def _is_exporting() -> bool:
    """True while tracing/compiling (ONNX, torch.export): the cache bookkeeping must not be traced."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _check_attention(attn: nn.Module) -> None:
    needed = ("qkv", "proj", "num_heads", "head_dim", "attn_drop", "proj_drop", "norm")
    missing = [name for name in needed if not hasattr(attn, name)]
    if missing or not isinstance(attn.qkv, nn.Linear):
        raise UnsupportedModelError(
            f"cannot make static attention from {type(attn).__name__} (missing {', '.join(missing) or 'a fused qkv Linear'}): "
            f"only timm's standard Attention (fused qkv projection) is supported"
        )
    attn_dim = int(attn.num_heads) * int(attn.head_dim)
    if attn.qkv.out_features != 3 * attn_dim:
        raise UnsupportedModelError(
            f"{type(attn).__name__}.qkv has {attn.qkv.out_features} outputs, expected 3 x {attn_dim}: "
            f"only timm's standard Attention is supported"
        )


def _value_projection(qkv: nn.Linear, attn_dim: int) -> nn.Linear:
    """The value part (output rows [2A:3A]) of a fused qkv projection, as its own Linear."""
    w = qkv.weight
    v = nn.Linear(qkv.in_features, attn_dim, bias=qkv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        v.weight.copy_(w[2 * attn_dim : 3 * attn_dim])
        if qkv.bias is not None:
            v.bias.copy_(qkv.bias[2 * attn_dim : 3 * attn_dim])
    return v


__all__ = ["DGSSA", "MIN_PROB"]
