"""Cost of a timm ViT under a compression plan: FLOPs and parameters, analytic.

FLOPs follow the convention of ``torch.utils.flop_counter`` (and ``vitcompress.flops``): 2 x the
multiply-adds of matrix products and convolutions, attention products included; element-wise work
(norms, softmax, GELU, residual adds, biases) is not counted. Per image, for a block whose
attention runs on N tokens and that merges r of them (C = embed dim, A = heads x head dim,
La = the attention's linear layers' MACs per token, Lm = the MLP's):

* dynamic block: ``N * La + 2 * N^2 * A + (N - r) * Lm``;
* static (DGSSA) block: ``N * (La - 2 * A * C) + N^2 * A + N * Lm``: no q/k projections, no q k^T;
  the softmax of its fixed logits is computed once, so it costs nothing per image;
* token merging adds its bipartite matching, ``|A| * |B| * d`` (the cosine similarity of the keys
  averaged over heads, d = head dim, between the two halves A and B of the patch tokens);
* GLAD stage: ``M * N_in * C`` (a learned [M, N_in] matrix applied to the patch tokens); an
  adaptive stage adds its keys and scores, ``N_in * C * d_k + M * N_in * d_k``;
* fixed parts: the patch-embedding convolution and the classifier head(s).

Latency is predicted from a measured table, not from FLOPs: on CPU a block's time is far from
linear in its token count (the CIFAR-10 teacher's block at batch 32, 1 thread, Intel Xeon: 4.28 ms
on 48 tokens, 4.89 ms on 47; 6.27 ms on 62, 7.16 ms on 63; ``benchmarks/token_count_latency.py``).
``block_halves`` splits a block into its attention and MLP residual branches, which the planner
times at every token count its candidates use (``LatencyTable``); ``table_speedup`` adds a plan's
blocks up from it. GLAD stages, token merging's matching and the fixed parts are left out: the
planner corrects for them with the measured/table ratio of timed candidates of the same kind, and
times every plan it may choose whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import Tensor, nn

from vitcompress.errors import UnsupportedModelError, VitcompressError
from vitcompress.geometry import vit_geometry
from vitcompress.modules.glad import ADAPTIVE_DIM
from vitcompress.plan_types import Plan

DYNAMIC, STATIC = "dynamic", "static"
Grid = tuple[int, int]


# ---- geometry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockGeometry:
    """Sizes of one block that its cost depends on."""

    embed_dim: int
    num_heads: int
    attn_dim: int  # heads x head dim
    attn_linear_macs: int  # per token: qkv + proj (+ gate)
    mlp_macs: int  # per token: every Linear of the MLP
    qk_params: int  # parameters DGSSA drops: q/k rows of qkv (+ bias) and q_norm/k_norm

    def macs(self, tokens: int, static: bool = False, merge: int = 0, num_prefix_tokens: int = 1,
             metric: str = "tokens") -> int:
        """Multiply-adds per image of this block when its attention runs on ``tokens`` tokens and
        it then merges ``merge`` of them, matching on ``metric`` (its MLP runs on ``tokens - merge``)."""
        n, a, c = int(tokens), self.attn_dim, self.embed_dim
        if static:
            attention = n * (self.attn_linear_macs - 2 * a * c) + n * n * a
        else:
            attention = n * self.attn_linear_macs + 2 * n * n * a
        metric_dim = a // self.num_heads if metric == "keys" else c  # keys averaged over heads, or the tokens
        matching = merge_macs(n, num_prefix_tokens, metric_dim) if merge > 0 else 0
        return attention + matching + (n - merge) * self.mlp_macs

    def static_params_delta(self, tokens: int) -> int:
        """Parameter change when this block's attention becomes static on ``tokens`` tokens."""
        return self.num_heads * tokens * tokens - self.qk_params


@dataclass(frozen=True)
class ModelGeometry:
    """What the cost of a timm ViT depends on, read from the model."""

    blocks: tuple[BlockGeometry, ...]
    embed_dim: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    fixed_macs: int  # per image: patch embedding + classifier head(s)
    params: int

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


def model_geometry(model: nn.Module) -> ModelGeometry:
    """Read the sizes of a stock timm VisionTransformer (raises UnsupportedModelError otherwise)."""
    vit = vit_geometry(model)
    grid, num_prefix_tokens = vit.grid, vit.num_prefix_tokens
    geoms = tuple(_block_geometry(i, blk) for i, blk in enumerate(model.blocks))
    return ModelGeometry(
        blocks=geoms,
        embed_dim=geoms[0].embed_dim,
        num_prefix_tokens=num_prefix_tokens,
        grid=grid,
        fixed_macs=_fixed_macs(model, grid),
        params=sum(p.numel() for p in model.parameters()),
    )


def _block_geometry(i: int, block: nn.Module) -> BlockGeometry:
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear) or not hasattr(attn, "num_heads") or mlp is None:
        raise UnsupportedModelError(
            f"block {i} has no standard timm Attention (fused qkv Linear) and MLP: "
            f"only timm's standard ViT blocks can be planned (is the model already converted?)"
        )
    a, c = int(attn.num_heads) * int(attn.head_dim), qkv.in_features
    bias = 2 * a if qkv.bias is not None else 0
    norms = sum(p.numel() for name in ("q_norm", "k_norm") for p in getattr(attn, name).parameters())
    return BlockGeometry(
        embed_dim=c,
        num_heads=int(attn.num_heads),
        attn_dim=a,
        attn_linear_macs=_linear_macs(attn),
        mlp_macs=_linear_macs(mlp),
        qk_params=2 * a * c + bias + norms,
    )


def _linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of every Linear inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _fixed_macs(model: nn.Module, grid: tuple[int, int]) -> int:
    """Patch-embedding convolution(s) at every grid position, plus heads applied once per image."""
    total = 0
    for m in model.patch_embed.modules():
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total += grid[0] * grid[1] * m.out_channels * k
        elif isinstance(m, nn.Linear):
            total += grid[0] * grid[1] * m.in_features * m.out_features
    # Outside the blocks and the patch embedding, a supported ViT's Linear layers are its head(s)
    # ('token' or 'avg' pooling), each applied to one pooled vector per image.
    inner = {id(m) for part in (model.blocks, model.patch_embed) for m in part.modules()}
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m) not in inner:
            total += m.in_features * m.out_features
    return total


def merge_macs(tokens: int, num_prefix_tokens: int, metric_dim: int) -> int:
    """Multiply-adds of token merging's bipartite matching: the similarity of every token of set
    A with every token of set B (the tokens after the prefix, alternating), on the matching metric
    of ``metric_dim`` features (``modules.tome``: the tokens, so the embedding width, or the keys
    averaged over heads, so the head dim)."""
    m = tokens - num_prefix_tokens
    return ((m + 1) // 2) * (m // 2) * metric_dim


# ---- plan layout -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """What each block of a plan runs: (kind, tokens, merged tokens) per block and the GLAD stages."""

    blocks: tuple[tuple[str, int, int], ...]
    glads: tuple[tuple[int, tuple[int, ...], tuple[Grid, ...]], ...]  # (before_block, scales, input grids)
    glad_mode: str = "linear"
    tome_metric: str = "tokens"


def plan_layout(geom: ModelGeometry, plan: Plan) -> Layout:
    """The per-block kinds and token counts of ``plan`` on a model of geometry ``geom``."""
    if plan.num_blocks != geom.depth or tuple(plan.grid) != geom.grid or plan.num_prefix_tokens != geom.num_prefix_tokens:
        raise VitcompressError(
            f"the plan was made for {plan.num_blocks} blocks, grid {tuple(plan.grid)} and {plan.num_prefix_tokens} "
            f"prefix tokens, not this model's {geom.depth}, {geom.grid} and {geom.num_prefix_tokens}: "
            f"make the plan for this model (vitcompress plan)"
        )
    tokens = plan.tokens_per_block()
    static = set(plan.static_layers)
    glads, in_grids = [], (geom.grid,)
    for r in sorted(plan.reductions, key=lambda r: r.before_block):
        glads.append((r.before_block, tuple(r.scales), in_grids))
        in_grids = tuple((s, s) for s in r.scales)
    merges = plan.merges()
    kinds = tuple((STATIC if i in static else DYNAMIC, tokens[i], merges[i]) for i in range(geom.depth))
    return Layout(kinds, tuple(glads), plan.glad_mode, plan.tome_metric)


def layout_macs(geom: ModelGeometry, layout: Layout) -> int:
    """Multiply-adds per image of the whole model under ``layout``."""
    total = geom.fixed_macs
    for g, (kind, n, merge) in zip(geom.blocks, layout.blocks):
        total += g.macs(n, static=kind == STATIC, merge=merge, num_prefix_tokens=geom.num_prefix_tokens,
                        metric=layout.tome_metric)
    for _, scales, in_grids in layout.glads:
        total += glad_macs_per_channel(scales, in_grids) * geom.embed_dim
        if layout.glad_mode == "adaptive":
            n_in = sum(h * w for h, w in in_grids)
            total += (n_in * geom.embed_dim + glad_macs_per_channel(scales, in_grids)) * ADAPTIVE_DIM
    return total


def glad_macs_per_channel(scales: Sequence[int], in_grids: Sequence[Grid]) -> int:
    """M x N_in: output tokens times input patch tokens of a GLAD stage."""
    return sum(s * s for s in scales) * sum(h * w for h, w in in_grids)


def plan_flops(geom: ModelGeometry, plan: Plan) -> int:
    """FLOPs per image (2 x multiply-adds) of the model converted with ``plan``."""
    return 2 * layout_macs(geom, plan_layout(geom, plan))


def base_flops(geom: ModelGeometry) -> int:
    """FLOPs per image of the unconverted model."""
    return 2 * (geom.fixed_macs + sum(g.macs(geom.num_tokens) for g in geom.blocks))


def flop_speedup(geom: ModelGeometry, plan: Plan) -> float:
    """FLOPs of the original model over FLOPs of the converted one."""
    return base_flops(geom) / plan_flops(geom, plan)


def plan_params(geom: ModelGeometry, plan: Plan) -> int:
    """Parameters of the model converted with ``plan``: q/k dropped, static logits and GLAD weights added."""
    layout = plan_layout(geom, plan)
    total = geom.params
    for g, (kind, n, _) in zip(geom.blocks, layout.blocks):
        if kind == STATIC:
            total += g.static_params_delta(n)
    for _, scales, in_grids in layout.glads:
        total += glad_macs_per_channel(scales, in_grids)  # its weight has one entry per (output, input) pair
        if layout.glad_mode == "adaptive":  # queries [M, d_k] and keys [d_k, C]
            total += (sum(s * s for s in scales) + geom.embed_dim) * ADAPTIVE_DIM
    return total


__all__ = [
    "DYNAMIC", "STATIC", "BlockGeometry", "Layout", "ModelGeometry", "base_flops", "flop_speedup",
    "glad_macs_per_channel", "layout_macs", "merge_macs", "model_geometry", "plan_flops", "plan_layout", "plan_params",
]  # fmt: skip


# ---- latency from a measured table -----------------------------------------------------------
class ResidualBranch(nn.Module):
    """One pre-norm residual branch of a timm block, ``x + drop_path(ls(inner(norm(x))))``: the
    attention half (norm1, attn, ls1, drop_path1) or the MLP half (norm2, mlp, ls2, drop_path2)."""

    def __init__(self, norm: nn.Module, inner: nn.Module, scale: nn.Module, drop_path: nn.Module) -> None:
        super().__init__()
        self.norm, self.inner, self.scale, self.drop_path = norm, inner, scale, drop_path

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.scale(self.inner(self.norm(x))))


def block_halves(block: nn.Module) -> dict[str, nn.Module]:
    """``{"attention": ..., "mlp": ...}`` of a standard timm ``Block`` (pre-norm residual branches)."""
    missing = [a for a in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2") if not hasattr(block, a)]
    if missing:
        raise UnsupportedModelError(f"the block has no {', '.join(missing)}: not a standard timm ViT block")
    b = block
    return {"attention": ResidualBranch(b.norm1, b.attn, b.ls1, b.drop_path1),
            "mlp": ResidualBranch(b.norm2, b.mlp, b.ls2, b.drop_path2)}


@dataclass(frozen=True)
class LatencyTable:
    """Measured seconds per call of one block's attention and MLP halves, per token count."""

    attention: Mapping[int, float]
    mlp: Mapping[int, float]


def layout_token_counts(layouts: Sequence[Layout]) -> list[int]:
    """Every token count a block's attention or MLP runs on in ``layouts`` (what a table needs)."""
    return sorted({n for layout in layouts for _, tokens, merge in layout.blocks for n in (tokens, tokens - merge)})


def layout_seconds(geom: ModelGeometry, layout: Layout, table: LatencyTable) -> float:
    """The blocks' time under ``layout`` from ``table`` (measured on a dynamic block): a static
    block's attention scaled by its share of the dynamic attention's multiply-adds."""
    total = 0.0
    for g, (kind, n, merge) in zip(geom.blocks, layout.blocks):
        attention = table.attention[n]
        if kind == STATIC:
            attention *= _attention_macs(g, n, True) / _attention_macs(g, n, False)
        total += attention + table.mlp[n - merge]
    return total


def _attention_macs(g: BlockGeometry, n: int, static: bool) -> int:
    return g.macs(n, static=static) - n * g.mlp_macs


def table_speedup(geom: ModelGeometry, plan: Plan, table: LatencyTable) -> float:
    """The original blocks' time over ``plan``'s, both from ``table``."""
    base = geom.depth * (table.attention[geom.num_tokens] + table.mlp[geom.num_tokens])
    return base / layout_seconds(geom, plan_layout(geom, plan), table)
