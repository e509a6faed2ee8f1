"""Turn a stock timm VisionTransformer into its compressed form by swapping modules (no forked ViT).

For a plan, ``convert`` does, in the original model's block numbering:

* ``blocks[i].attn = DGSSA(blocks[i].attn, ...)`` for each ``i`` in ``plan.static_layers``;
* for each reduction ``r``: ``blocks[r.before_block].glad = GLAD(...)`` plus a forward pre-hook on
  that block that runs ``glad`` on the block's input;
* with ``plan.merge_r``: token merging patched into the blocks (``modules.tome.patch_tome``; the
  blocks' modules and state-dict keys are unchanged). A submodule + hook (rather than a wrapper
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

from vitcompress.errors import VitcompressError
from vitcompress.modules import DGSSA, GLAD
from vitcompress.geometry import vit_geometry
from vitcompress.plan_types import Plan

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
    glads = _build_glads(target, plan, means)
    static = _build_static(target, plan, means)
    sized = bool(plan.proportional_attention and plan.reductions)
    for i, glad in glads.items():
        target.blocks[i].glad = glad.train(target.blocks[i].training)  # new modules follow the model's mode
        target.blocks[i].register_forward_pre_hook(_run_glad_sized if sized else _run_glad)
    for i, dgssa in static.items():
        target.blocks[i].attn = dgssa.train(target.blocks[i].training)
    if any(plan.merges()) or sized:
        from vitcompress.modules.tome import patch_tome

        # Size-aware blocks: token merging's, or (r = 0) the blocks that weigh GLAD's tokens by size.
        patch_tome(target, plan.merges(), metric=plan.tome_metric)
    return target


def _run_glad(block: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: aggregate the block's input tokens with its GLAD stage."""
    return (block.glad(args[0]),) + tuple(args[1:])


def _run_glad_sized(block: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook with proportional attention: aggregate, then hand the output tokens'
    sizes (original patches each stands for) to the blocks after it."""
    from vitcompress.modules.tome import set_token_size, token_size

    x = args[0]
    size = token_size(block)
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    set_token_size(block, block.glad.out_size(size))
    return (block.glad(x),) + tuple(args[1:])


def static_attention_modules(model: nn.Module) -> dict[int, DGSSA]:
    """``{original block index: DGSSA}`` of a converted model."""
    return {i: blk.attn for i, blk in enumerate(model.blocks) if isinstance(blk.attn, DGSSA)}


def glad_modules(model: nn.Module) -> dict[int, GLAD]:
    """``{index of the block the stage runs before: GLAD}`` of a converted model."""
    return {i: blk.glad for i, blk in enumerate(model.blocks) if isinstance(getattr(blk, "glad", None), GLAD)}


def validate_plan(model: nn.Module, plan: Plan) -> None:
    """Raise a VitcompressError saying what is wrong if ``plan`` cannot be applied to ``model``."""
    geom = vit_geometry(model)
    depth, grid, prefix = geom.depth, geom.grid, geom.num_prefix_tokens
    if static_attention_modules(model) or glad_modules(model):
        raise VitcompressError("the model is already converted: convert the original (uncompressed) model")
    if plan.num_blocks == 0:  # a hand-written plan: Plan.from_dict's default, not a real depth
        raise VitcompressError(
            f"the plan does not say which model it is for (no num_blocks): make it with `vitcompress plan`, or add "
            f'"num_blocks": {depth}, "grid": [{grid[0]}, {grid[1]}], "num_prefix_tokens": {prefix} for this model'
        )
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
    _check_merges(plan, depth)


def _check_merges(plan: Plan, depth: int) -> None:
    """Token merging: one r per block, each within what bipartite matching can merge, static
    layers only before the first merge (static attention needs the original, fixed tokens)."""
    from vitcompress.modules.tome import max_merge

    merges = plan.merges()
    if not any(merges):
        return
    if len(plan.merge_r) != depth or any(r < 0 for r in merges):
        raise VitcompressError(f"plan merge_r {plan.merge_r} must give one count >= 0 for each of the {depth} blocks")
    if plan.reductions:
        raise VitcompressError("a plan cannot both aggregate tokens (GLAD) and merge them (token merging): choose one")
    first = next(i for i, r in enumerate(merges) if r > 0)
    late = [i for i in plan.static_layers if i >= first]
    if late:
        raise VitcompressError(
            f"static layers {late} are at or after the first merging block ({first}): static attention needs "
            f"a fixed set of tokens; put static layers first or merge later"
        )
    for i, (n, r) in enumerate(zip(plan.tokens_per_block(), merges)):
        if r > max_merge(n, plan.num_prefix_tokens):
            raise VitcompressError(
                f"plan merges {r} tokens in block {i}, which has only {n} tokens ({plan.num_prefix_tokens} prefix): "
                f"at most {max_merge(n, plan.num_prefix_tokens)}; make the plan for this model"
            )


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


def _build_glads(model: nn.Module, plan: Plan, means: Optional[dict[int, torch.Tensor]] = None) -> dict[int, GLAD]:
    grids = [tuple(plan.grid)]
    dim = vit_geometry(model).embed_dim
    glads: dict[int, GLAD] = {}
    for r in plan.reductions:
        ref = next(model.blocks[r.before_block].parameters())
        try:
            glad = GLAD(plan.num_prefix_tokens, grids, r.scales, mode=plan.glad_mode, dim=dim,
                        device=ref.device, dtype=ref.dtype)
        except VitcompressError as exc:
            raise VitcompressError(f"reduction before block {r.before_block}: {exc}") from exc
        if plan.glad_init == "attention" and r is plan.reductions[0] and means is not None:
            glad.init_from_attention(_means_for(means, r.before_block, model.blocks[r.before_block].attn, plan.num_prefix_tokens + grids[0][0] * grids[0][1]))
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
