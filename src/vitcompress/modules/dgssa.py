"""DGSSA: dynamic-guided static self-attention (arXiv:2310.07664).

A drop-in replacement for a timm ``Attention`` module in which the input-dependent attention
``softmax(q k^T / sqrt(d))`` is replaced by one learned, input-independent attention matrix per
head. The query and key projections (and ``q_norm``/``k_norm``) are dropped; the value projection,
the optional ``norm`` (scale_norm) and ``gate``, and the output projection are kept.

Optionally only some heads are made static (``static_heads``): the others keep their q/k
projections and run ordinary dynamic attention, so that heads whose maps differ from image to
image are not forced onto one map.

The static logits start from the mean dynamic attention measured by ``analyze`` (``log`` of the
mean probabilities), so the new layer starts out doing on average what the replaced one did;
fine-tuning then pulls ``attention()`` toward the teacher's per-image dynamic attention
("dynamic guidance").
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.errors import UnsupportedModelError, VitcompressError

# Mean probabilities are clamped to at least this before the log: an exact 0 would give -inf logits
# (NaN gradients, and a softmax entry that fine-tuning could never revive).
MIN_PROB = 1e-8

# Softmax of these is computed in float32: half-precision exp/sum loses too much over N entries.
_HALF = (torch.float16, torch.bfloat16)


class DGSSA(nn.Module):
    """Static self-attention replacing ``attn`` (a timm ``Attention``) in a block.

    Args:
        attn: the timm ``Attention`` module being replaced. Its weights are copied (the original
            module is left untouched).
        num_tokens: the token count N (prefix tokens included) this layer will always run on.
        init_probs: optional attention probabilities, [num_heads, N, N] (typically the mean dynamic
            attention of this layer; with ``static_heads`` the rows of those heads are taken) or
            [len(static_heads), N, N]. The logits are initialised to ``log(clamp(p, MIN_PROB))``;
            rows are renormalised by the softmax. Without it, the attention starts uniform.
        static_heads: the heads made static (None: all of them). The other heads stay dynamic.

    Parameters: ``logits`` [S, N, N] (S static heads) and the value projection ``v`` (rows [2A:3A]
    of the original ``qkv``, A = num_heads * head_dim, all heads), plus the original
    ``proj``/``norm``/``gate``. With dynamic heads, also ``qk`` (the q rows then the k rows of
    ``qkv`` for the dynamic heads, in head order) and ``q_norm``/``k_norm``.

    Eval mode, unfrozen: the softmax of the logits is cached while no gradient is needed; the cache
    is dropped whenever the logits change (tracked through the parameter's version counter,
    storage and dtype, which covers optimizer steps, ``load_state_dict`` and ``.to()``). Mutating
    the logits through ``.data`` bypasses the version counter: call ``clear_cache()`` after that.

    ``freeze()``: inference form. The probabilities are stored in the non-persistent buffer
    ``probs`` (the state dict is unchanged) and ``logits`` stops requiring grad, so the forward
    has no softmax and no cache bookkeeping, and traces/compiles/exports as one plain matmul.
    ``train()`` unfreezes.
    """

    probs: Optional[torch.Tensor]

    def __init__(
        self,
        attn: nn.Module,
        num_tokens: int,
        init_probs: Optional[torch.Tensor] = None,
        static_heads: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        _check_attention(attn)
        if int(num_tokens) < 1:
            raise VitcompressError(f"DGSSA needs a positive token count, got {num_tokens}")
        self.num_heads: int = int(attn.num_heads)
        self.head_dim: int = int(attn.head_dim)
        self.attn_dim: int = self.num_heads * self.head_dim
        self.num_tokens: int = int(num_tokens)
        self.static_heads: tuple[int, ...] = _normalize_heads(static_heads, self.num_heads)
        self.dynamic_heads: tuple[int, ...] = tuple(h for h in range(self.num_heads) if h not in self.static_heads)
        self.scale: float = float(getattr(attn, "scale", self.head_dim**-0.5))

        self.v = _value_projection(attn.qkv, self.attn_dim)
        self.attn_drop = copy.deepcopy(attn.attn_drop)
        self.norm = copy.deepcopy(attn.norm)
        gate = getattr(attn, "gate", None)
        self.gate = copy.deepcopy(gate) if gate is not None else None
        self.proj = copy.deepcopy(attn.proj)
        self.proj_drop = copy.deepcopy(attn.proj_drop)
        # An Identity norm is skipped in forward: a module call is a few microseconds at batch 1.
        self._has_norm = not isinstance(self.norm, nn.Identity)
        if self.dynamic_heads:
            self._init_dynamic(attn)

        weight = attn.qkv.weight
        self.logits = nn.Parameter(self._initial_logits(init_probs, weight.dtype, weight.device))
        self.register_buffer("probs", None, persistent=False)
        self._frozen = False
        self._probs_version = -1
        self._requires_grad_before_freeze = True
        self._cache: Optional[torch.Tensor] = None
        self._cache_key: Optional[tuple] = None

    # ---- construction ----------------------------------------------------------------------
    def _init_dynamic(self, attn: nn.Module) -> None:
        """q/k projection and norms of the dynamic heads; index buffers to split/merge heads."""
        self.qk = _qk_projection(attn.qkv, self.dynamic_heads, self.head_dim, self.attn_dim)
        self.q_norm = copy.deepcopy(attn.q_norm)
        self.k_norm = copy.deepcopy(attn.k_norm)
        device = attn.qkv.weight.device
        # Merged head outputs come as [static..., dynamic...]; head_order puts them back in place.
        merged = list(self.static_heads) + list(self.dynamic_heads)
        order = [merged.index(h) for h in range(self.num_heads)]
        for name, idx in (("static_index", self.static_heads), ("dynamic_index", self.dynamic_heads), ("head_order", order)):
            self.register_buffer(name, torch.tensor(idx, dtype=torch.long, device=device), persistent=False)

    def _initial_logits(self, init_probs: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        s, n = len(self.static_heads), self.num_tokens
        if init_probs is None:
            return torch.zeros((s, n, n), dtype=dtype, device=device)  # softmax(0) = uniform
        probs = torch.as_tensor(init_probs).detach()
        probs = self._static_rows(probs)
        if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
            raise VitcompressError("attention init must be finite, non-negative probabilities: re-run vitcompress analyze")
        # The log is taken in (at least) float32 before casting: in float16, MIN_PROB rounds to 0
        # and its log to -inf.
        work = torch.promote_types(torch.promote_types(probs.dtype, dtype), torch.float32)
        return probs.to(work).clamp_min(MIN_PROB).log().to(device=device, dtype=dtype)

    def _static_rows(self, probs: torch.Tensor) -> torch.Tensor:
        """The static heads' maps out of a full [H, N, N] init, or a [S, N, N] init as it is."""
        h, s, n = self.num_heads, len(self.static_heads), self.num_tokens
        if probs.dim() == 3 and tuple(probs.shape[1:]) == (n, n):
            if probs.shape[0] == h:
                return probs[list(self.static_heads)] if s != h else probs
            if probs.shape[0] == s:
                return probs
        heads = f"heads={h}" if s == h else f"heads={h} or static heads={s}"
        raise VitcompressError(
            f"attention init has shape {list(probs.shape)} but this layer needs "
            f"[{heads}, N={n}, N={n}]: measure it on the same model and input size (vitcompress analyze), "
            f"or start from uniform attention"
        )

    # ---- the attention probabilities ------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget the cached eval-mode attention (needed only after mutating ``logits.data``).

        On a frozen module, recomputes ``probs`` instead."""
        self._cache = None
        self._cache_key = None
        if self._frozen:
            self._refresh_probs()

    def freeze(self) -> "DGSSA":
        """Inference form: eval mode, ``probs`` precomputed, ``logits`` not requiring grad.

        Until ``unfreeze()``/``train()``, the forward is one matmul with ``probs`` (no softmax, no
        cache key), also when traced, compiled or exported. In eager mode an in-place change of the
        logits (optimizer step, ``load_state_dict``) still refreshes ``probs``; a traced or compiled
        graph keeps the ``probs`` it was made with: freeze and trace again after changing logits.
        Returns ``self``.
        """
        if not self._frozen:
            self._requires_grad_before_freeze = self.logits.requires_grad
        super().train(False)
        self.logits.requires_grad_(False)  # nothing will backpropagate to it: optimizers skip it
        self._frozen = True
        self._refresh_probs()
        return self

    def unfreeze(self) -> "DGSSA":
        """Back to the trainable form (``probs`` dropped, ``logits.requires_grad`` restored)."""
        if self._frozen:
            self._frozen = False
            self.probs = None
            self.logits.requires_grad_(self._requires_grad_before_freeze)
        return self

    @property
    def frozen(self) -> bool:
        return self._frozen

    def _refresh_probs(self) -> None:
        # Outside inference mode: an inference tensor could not be saved by autograd later (a
        # gradient w.r.t. the values in a frozen module's forward).
        with torch.inference_mode(False), torch.no_grad():
            self.probs = _softmax(self.logits)
        self._probs_version = _version(self.logits)

    def attention(self) -> torch.Tensor:
        """Attention probabilities of the static heads, [S, N, N] (rows sum to 1).

        Differentiable whenever autograd could use it (train mode, or grad enabled and ``logits``
        requiring grad: use it for the dynamic-guidance loss); otherwise a detached tensor that is
        computed once (the eval cache, or ``probs`` when frozen).
        """
        logits = self.logits
        if self.training or (logits.requires_grad and torch.is_grad_enabled()):
            return _softmax(logits)
        if self._frozen:
            # The version check is the only per-call work; a traced/compiled graph cannot read it.
            if not _is_exporting() and _version(logits) != self._probs_version:
                self._refresh_probs()
            return self.probs  # type: ignore[return-value]
        if _is_exporting():
            return _softmax(logits)  # the cache bookkeeping must not be traced
        return self._cached(logits)

    def _cached(self, logits: torch.Tensor) -> torch.Tensor:
        # A tensor made under inference_mode cannot be used by autograd later: key on the mode too.
        key = (_version(logits), logits.data_ptr(), logits.dtype, logits.device, torch.is_inference_mode_enabled())
        if self._cache is None or self._cache_key != key:
            with torch.no_grad():
                self._cache = _softmax(logits)
            self._cache_key = key
        return self._cache

    # ---- forward ---------------------------------------------------------------------------
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
        v = self.v(x).view(B, N, self.num_heads, self.head_dim)
        if self.dynamic_heads:
            heads = self._apply_mixed(x, v)
        else:
            heads = self._apply_static(v)
        x = heads.reshape(B, N, self.attn_dim)
        if self._has_norm:
            x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        # Dropout is the identity in eval: skip the module call.
        return self.proj_drop(x) if self.training else x

    def _apply_static(self, v: torch.Tensor) -> torch.Tensor:
        """Static attention applied to values v [B, N, S, D] -> [B, N, S, D] (a strided view)."""
        probs = self.attention()
        B, N, S, D = v.shape
        if self.training and _drops(self.attn_drop):
            # Dropout must drop different entries for each image, as it does in dynamic attention:
            # only here is the map broadcast to one copy per image.
            attn = self.attn_drop(probs.expand(B, S, N, N))
            return (attn @ v.transpose(1, 2)).transpose(1, 2)
        # One matmul per head over the whole batch, [S, N, N] @ [S, N, B*D]: the map is never copied
        # per image (a broadcast [S, N, N] @ [B, S, N, D] expands it B times before the bmm), and
        # the matrices are large enough to run at full GEMM speed. Only v is copied, once.
        vt = v.permute(2, 1, 0, 3).reshape(S, N, B * D)
        return torch.bmm(probs, vt).view(S, N, B, D).permute(2, 1, 0, 3)

    def _apply_mixed(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Static and dynamic heads, merged back in the original head order: [B, N, H, D]."""
        static = self._apply_static(v.index_select(2, self.static_index))  # type: ignore[arg-type]
        dynamic = self._apply_dynamic(x, v.index_select(2, self.dynamic_index))  # type: ignore[arg-type]
        return torch.cat([static, dynamic], dim=2).index_select(2, self.head_order)  # type: ignore[arg-type]

    def _apply_dynamic(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """timm's attention for the dynamic heads: values v [B, N, Hd, D] -> [B, N, Hd, D]."""
        B, N, Hd, D = v.shape
        q, k = self.qk(x).view(B, N, 2, Hd, D).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        p = float(getattr(self.attn_drop, "p", 0.0)) if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), dropout_p=p, scale=self.scale)
        return out.transpose(1, 2)

    # ---- state -----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "DGSSA":
        if mode:
            self.unfreeze()  # training updates the logits: a frozen copy would go stale
        self._cache = None
        self._cache_key = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._cache = None
        self._cache_key = None
        super()._load_from_state_dict(*args, **kwargs)
        if self._frozen:
            self._refresh_probs()  # load_state_dict(assign=True) replaces the tensor: no version bump

    def extra_repr(self) -> str:
        heads = "all" if not self.dynamic_heads else list(self.static_heads)
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_tokens={self.num_tokens}, "
            f"static_heads={heads}, frozen={self._frozen}"
        )


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    if logits.dtype in _HALF:
        return logits.softmax(dim=-1, dtype=torch.float32).to(logits.dtype)
    return logits.softmax(dim=-1)


def _version(t: torch.Tensor) -> int:
    """The version counter of ``t``; -1 for an inference tensor (a module built under
    ``inference_mode``), which has none and cannot be changed in place outside inference mode."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _drops(module: nn.Module) -> bool:
    """Whether an attention-dropout module can change its input in train mode."""
    return not isinstance(module, nn.Identity) and float(getattr(module, "p", 1.0)) > 0


def _find_is_compiling(ns: object) -> Callable[[], bool]:
    """``torch.compiler.is_compiling`` (torch >= 2.3), else ``torch._dynamo.is_compiling``, else
    a function returning False. ``ns`` is the torch module (a parameter, so that tests can
    stand in an older torch)."""
    fn = getattr(getattr(ns, "compiler", None), "is_compiling", None)
    if fn is None:
        try:
            fn = getattr(getattr(ns, "_dynamo"), "is_compiling", None)
        except (ImportError, AttributeError):  # torch._dynamo is imported lazily, and can fail to import
            fn = None
    return fn if fn is not None else _never


def _never() -> bool:
    return False


_is_compiling = _find_is_compiling(torch)


def _is_exporting() -> bool:
    """True while tracing/compiling (ONNX, torch.export): the cache bookkeeping must not be traced."""
    return torch.jit.is_tracing() or _is_compiling()


def _normalize_heads(static_heads: Optional[Sequence[int]], num_heads: int) -> tuple[int, ...]:
    if static_heads is None:
        return tuple(range(num_heads))
    heads = [int(h) for h in static_heads]
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad or len(set(heads)) != len(heads) or not heads:
        raise VitcompressError(
            f"static_heads {list(static_heads)} must be distinct head indices in 0..{num_heads - 1}, at least one: "
            f"pass None to make every head static"
        )
    return tuple(sorted(heads))


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


def _rows_linear(qkv: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """The output rows ``rows`` of a fused qkv projection, as their own Linear."""
    w = qkv.weight
    out = nn.Linear(qkv.in_features, len(rows), bias=qkv.bias is not None, device=w.device, dtype=w.dtype)
    rows = rows.to(w.device)
    with torch.no_grad():
        out.weight.copy_(w[rows])
        if qkv.bias is not None:
            out.bias.copy_(qkv.bias[rows])
    return out


def _value_projection(qkv: nn.Linear, attn_dim: int) -> nn.Linear:
    """The value part (output rows [2A:3A]) of a fused qkv projection, as its own Linear."""
    return _rows_linear(qkv, torch.arange(2 * attn_dim, 3 * attn_dim))


def _qk_projection(qkv: nn.Linear, heads: Sequence[int], head_dim: int, attn_dim: int) -> nn.Linear:
    """The q rows then the k rows of ``heads`` (in that order) of a fused qkv projection."""
    per_head = [torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]
    q = torch.cat(per_head)
    return _rows_linear(qkv, torch.cat([q, q + attn_dim]))


__all__ = ["DGSSA", "MIN_PROB"]
