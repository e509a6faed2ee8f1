"""FLOP counting for any ``nn.Module`` (stock or converted ViTs), attention included.

Built on ``torch.utils.flop_counter.FlopCounterMode``: one forward pass under
``torch.inference_mode`` (on shape-only meta tensors when the model allows it, so it costs no
arithmetic) counts every matmul-like op (linear, conv, bmm, matmul, einsum, ...), so custom
modules written with plain ops (DGSSA's ``attn @ v``, GLAD's ``weight @ tokens``) are counted
without special cases. Convention: 1 multiply-accumulate (MAC) = 2 FLOPs; elementwise ops, softmax
and norms are not counted (the usual convention for ViT figures: deit_tiny at 224 = 1.25 GMACs).

Why a custom mapping: in this torch the CPU fused attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) has no FLOP formula, so timm's fused
attention would silently count as zero. We pass formulas for the fused attention ops that lack one
to ``FlopCounterMode(custom_mapping=...)`` (per call, so nothing is registered globally).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils import flop_counter

from vitcompress.errors import VitcompressError
from vitcompress.geometry import input_size as geometry_input_size

aten = torch.ops.aten

# Fused attention ops whose FLOPs are those of softmax(q k^T) v; a formula is added for each one
# that this torch does not already count (checked at call time, so a newer torch's own wins).
_FUSED_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def _fused_attention_flop(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """q k^T and (scores) v: 2 x B x H x Nq x Nk x D FLOPs each (as torch's own sdpa formula)."""
    return int(flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape))


def _custom_mapping() -> dict[Any, Callable[..., int]]:
    mapping: dict[Any, Callable[..., int]] = {}
    for name in _FUSED_ATTENTION_OPS:
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            mapping[op] = _fused_attention_flop
    return mapping


def _input_shape(model: nn.Module, input_size: Optional[Sequence[int]]) -> tuple[int, ...]:
    if input_size is None:
        return (1, *geometry_input_size(model))
    shape = tuple(int(s) for s in input_size)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or min(shape) < 1:
        raise VitcompressError(f"input_size must be (batch, channels, height, width), got {tuple(input_size)}")
    return shape


def _dtype_of(model: nn.Module) -> torch.dtype:
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    return ref.dtype if ref is not None else torch.float32


def _count_on_meta(model: nn.Module, shape: tuple[int, ...]) -> dict[str, int]:
    """Run the model on shape-only 'meta' tensors: no arithmetic, so the cost does not grow with
    the model or the batch. The model's own tensors are swapped for meta ones during the call only."""
    from torch.func import functional_call

    state = {name: torch.empty_like(t, device="meta") for name, t in _named_tensors(model)}
    x = torch.zeros(shape, dtype=_dtype_of(model), device="meta")
    return _count(lambda: functional_call(model, state, (x,), tie_weights=False, strict=True))


def _count_for_real(model: nn.Module, shape: tuple[int, ...]) -> dict[str, int]:
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    x = torch.zeros(shape, dtype=_dtype_of(model), device=device)
    return _count(lambda: model(x))


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))


def _count(forward: Callable[[], Any]) -> dict[str, int]:
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    # inference_mode: no autograd bookkeeping; the model's train/eval mode is left as is.
    with torch.inference_mode(), counter:
        forward()
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def flop_counts(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> dict[str, int]:
    """FLOPs of one forward pass per aten op (e.g. ``{"aten.addmm": ..., "aten.bmm": ...}``).

    Runs on meta tensors (fast, no arithmetic); a model that cannot (an op without a meta
    kernel, a value read from a tensor, a tensor made on a fixed device) runs for real instead.
    """
    shape = _input_shape(model, input_size)
    try:
        return _count_on_meta(model, shape)
    except Exception:  # any failure on meta tensors: the real forward pass gives the same counts
        return _count_for_real(model, shape)


def count_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """FLOPs (1 MAC = 2 FLOPs) of one forward pass of ``model`` on an input of ``input_size``.

    ``input_size`` is ``(batch, C, H, W)`` (default: batch 1 at the model's own input size, see
    ``vitcompress.geometry.input_size``); FLOPs scale linearly with the batch. Counting runs the forward pass
    on shape-only meta tensors (about the Python overhead of one call), falling back to one real
    forward pass on the model's device for models that cannot run on meta tensors.
    """
    return sum(flop_counts(model, input_size).values())


def count_macs(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """Multiply-accumulates of one forward pass: ``count_flops(...) // 2``."""
    return count_flops(model, input_size) // 2


def format_flops(flops: float) -> str:
    """``1.25e9`` -> ``"1.25 G"`` (for tables)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} "


__all__ = ["count_flops", "count_macs", "flop_counts", "format_flops"]
