"""Turn a stock timm VisionTransformer into its compressed form by swapping modules (no forked ViT).

For a plan, ``convert`` does, in the original model's block numbering:

* ``blocks[i].attn = DGSSA(blocks[i].attn, ...)`` for each ``i`` in ``plan.static_layers``;
* for each reduction ``r``: ``blocks[r.before_block].glad = GLAD(...)`` plus a forward pre-hook on
  that block that runs ``glad`` on the block's input. A submodule + hook (rather than a wrapper
  module or an extra entry in ``blocks``) keeps every ``blocks.{i}.*`` state-dict key meaning the
  original block ``i``; the new weights appear as ``blocks.{i}.glad.weight``.

Everything else (patch embedding, LayerScale, drop-path, norms, pooling, head) is timm's own code,
so ``model(x)``, ``forward_features`` and ``forward_head`` work unchanged ('token' and 'avg' pooling
both operate on whatever tokens remain after the prefix).

Static layers that run after a reduction see aggregated tokens; the mean attention measured on the
original tokens does not apply to them, so they start from uniform attention (with a warning).
"""

from __future__ import annotations

import copy
import warnings
from typing import Mapping, Optional, Union

import torch
from torch import nn

from vitcompress.errors import UnsupportedModelError, VitcompressError
from vitcompress.modules import DGSSA, GLAD
from vitcompress.plan import Plan

AttentionMeans = Mapping[Union[int, str], torch.Tensor]


def convert(
    model: nn.Module,
    plan: Plan,
    attention_means: Optional[AttentionMeans] = None,
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` compressed according to ``plan`` (a deep copy unless ``inplace=True``).

    Args:
        model: a stock timm VisionTransformer (not already converted), fixed input size.
        plan: the plan; its ``num_blocks``, ``grid`` and ``num_prefix_tokens`` must match the model.
        attention_means: ``{block index (or "blocks.{i}"): [heads, N, N] probabilities}`` from
            ``analyze``, used to initialise static layers that run on the original N tokens.
            ``None``: every static layer starts from uniform attention.
        inplace: modify ``model`` itself. Nothing is modified if the plan is rejected.

    Raises VitcompressError (or UnsupportedModelError) when the plan does not fit the model.
    """
    validate_plan(model, plan)
    means = _normalize_means(attention_means)
    target = model if inplace else copy.deepcopy(model)
    # Build every new module first so that a rejected plan leaves the model untouched.
    glads = _build_glads(target, plan)
    static = _build_static(target, plan, means)
    for i, glad in glads.items():
        target.blocks[i].glad = glad.train(target.blocks[i].training)  # new modules follow the model's mode
        target.blocks[i].register_forward_pre_hook(_run_glad)
    for i, dgssa in static.items():
        target.blocks[i].attn = dgssa.train(target.blocks[i].training)
    return target


def _run_glad(block: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: aggregate the block's input tokens with its GLAD stage."""
    return (block.glad(args[0]),) + tuple(args[1:])


def static_attention_modules(model: nn.Module) -> dict[int, DGSSA]:
    """``{original block index: DGSSA}`` of a converted model."""
    return {i: blk.attn for i, blk in enumerate(model.blocks) if isinstance(blk.attn, DGSSA)}


def glad_modules(model: nn.Module) -> dict[int, GLAD]:
    """``{index of the block the stage runs before: GLAD}`` of a converted model."""
    return {i: blk.glad for i, blk in enumerate(model.blocks) if isinstance(getattr(blk, "glad", None), GLAD)}


def validate_plan(model: nn.Module, plan: Plan) -> None:
    """Raise a VitcompressError saying what is wrong if ``plan`` cannot be applied to ``model``."""
    depth, grid, prefix = vit_geometry(model)
    if static_attention_modules(model) or glad_modules(model):
        raise VitcompressError("the model is already converted: convert the original (uncompressed) model")
    if plan.num_blocks != depth or tuple(plan.grid) != grid or plan.num_prefix_tokens != prefix:
        raise VitcompressError(
            f"the plan was made for a model with {plan.num_blocks} blocks, a {_fmt(plan.grid)} grid and "
            f"{plan.num_prefix_tokens} prefix tokens, but this model has {depth}, {_fmt(grid)} and {prefix}: "
            f"make the plan for this model (vitcompress plan)"
        )
    _check_indices("static_layers", list(plan.static_layers), depth)
    _check_indices("reduction before_block", [r.before_block for r in plan.reductions], depth)
    patch_tokens = grid[0] * grid[1]
    for r in plan.reductions:
        if r.keep_tokens >= patch_tokens:
            raise VitcompressError(
                f"the reduction before block {r.before_block} (scales {r.scales}) keeps {r.keep_tokens} tokens, "
                f"not fewer than its {patch_tokens} input tokens: use smaller scales"
            )
        patch_tokens = r.keep_tokens


def vit_geometry(model: nn.Module) -> tuple[int, tuple[int, int], int]:
    """(depth, patch grid, prefix tokens) of a supported timm ViT, or UnsupportedModelError."""
    blocks = getattr(model, "blocks", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not isinstance(blocks, nn.Sequential) or grid is None or not hasattr(model, "num_prefix_tokens"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer (needs blocks, patch_embed.grid_size, "
            f"num_prefix_tokens): use a timm ViT/DeiT model"
        )
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError(
            "static attention needs a fixed token count: create the model without dynamic_img_size=True"
        )
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        raise UnsupportedModelError(
            "patch dropout changes the token count during training: create the model with patch_drop_rate=0"
        )
    return len(blocks), (int(grid[0]), int(grid[1])), int(model.num_prefix_tokens)


def _check_indices(what: str, indices: list[int], depth: int) -> None:
    if any(not 0 <= i < depth for i in indices):
        raise VitcompressError(f"plan {what} {indices} out of range: the model has blocks 0..{depth - 1}")
    if any(a >= b for a, b in zip(indices, indices[1:])):
        raise VitcompressError(f"plan {what} {indices} must be sorted ascending without repeats")


def _normalize_means(means: Optional[AttentionMeans]) -> Optional[dict[int, torch.Tensor]]:
    """Accept int keys or the on-disk ``blocks.{i}`` keys."""
    if means is None:
        return None
    out: dict[int, torch.Tensor] = {}
    for key, value in means.items():
        text = str(key)
        index = text.removeprefix("blocks.")
        if not index.isdigit():
            raise VitcompressError(f"attention means key {key!r} is not a block index or 'blocks.<i>': re-run vitcompress analyze")
        out[int(index)] = value
    return out


def _build_glads(model: nn.Module, plan: Plan) -> dict[int, GLAD]:
    grids = [tuple(plan.grid)]
    glads: dict[int, GLAD] = {}
    for r in plan.reductions:
        ref = next(model.blocks[r.before_block].parameters())
        try:
            glad = GLAD(plan.num_prefix_tokens, grids, r.scales, device=ref.device, dtype=ref.dtype)
        except VitcompressError as exc:
            raise VitcompressError(f"reduction before block {r.before_block}: {exc}") from exc
        glads[r.before_block] = glad
        grids = glad.out_grids
    return glads


def _build_static(model: nn.Module, plan: Plan, means: Optional[dict[int, torch.Tensor]]) -> dict[int, DGSSA]:
    tokens = plan.tokens_per_block()
    full = plan.num_prefix_tokens + plan.grid[0] * plan.grid[1]
    late = [i for i in plan.static_layers if tokens[i] != full]
    if means is not None and late:
        warnings.warn(
            f"static layers {late} run on aggregated tokens, where the measured mean attention does not apply: "
            f"they start from uniform attention",
            stacklevel=3,
        )
    static: dict[int, DGSSA] = {}
    for i in plan.static_layers:
        init = None
        if means is not None and tokens[i] == full:
            init = _means_for(means, i, model.blocks[i].attn, full)
        static[i] = DGSSA(model.blocks[i].attn, tokens[i], init)
    return static


def _means_for(means: dict[int, torch.Tensor], i: int, attn: nn.Module, n: int) -> torch.Tensor:
    if i not in means:
        raise VitcompressError(
            f"attention means have no entry for static layer {i}: re-run vitcompress analyze on this model, "
            f"or convert without attention means (uniform start)"
        )
    expected = (int(getattr(attn, "num_heads", -1)), n, n)
    if tuple(means[i].shape) != expected:
        raise VitcompressError(
            f"attention means for block {i} have shape {list(means[i].shape)}, expected {list(expected)} "
            f"(heads, tokens, tokens): they were measured on another model or input size; re-run vitcompress analyze"
        )
    return means[i]


def _fmt(grid: tuple[int, ...]) -> str:
    return "x".join(str(g) for g in grid)


__all__ = ["convert", "glad_modules", "static_attention_modules", "validate_plan"]
