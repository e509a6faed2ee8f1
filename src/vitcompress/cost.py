"""Cost model of a timm ViT under a compression plan: FLOPs, parameters and latency.

FLOPs and parameters are analytic, read from the model's own layer sizes. FLOPs follow the
convention of ``torch.utils.flop_counter`` (and ``vitcompress.flops``): 2 x the multiply-adds of
matrix products and convolutions, attention products included; element-wise work (norms,
softmax, GELU, residual adds, biases) is not counted. Per image, for a block on N tokens
(C = embed dim, A = heads x head dim, L = the block's linear layers' MACs per token):

* dynamic block: ``N * L + 2 * N^2 * A`` (q k^T and attention x v);
* static (DGSSA) block: ``N * (L - 2 * A * C) + N^2 * A``: no q/k projections, no q k^T; the
  softmax of its fixed logits is computed once and cached, so it costs nothing per image;
* GLAD stage: ``M * N_in * C`` (a learned [M, N_in] matrix applied to the patch tokens);
* fixed parts: the patch-embedding convolution and the classifier head(s).

Latency: FLOPs mispredict CPU time (small matrices run at a lower rate; the static block's
``attention @ v`` broadcasts one matrix over the batch), so ``LatencyModel`` times a real block of
the model, a static-attention version of it, the GLAD stages and everything outside the blocks,
on the target device with the target thread count and batch size, and predicts a plan's latency
as the sum of its parts. Every case is timed interleaved with a reference (the stock block on the
full token count) and kept as a ratio to it, so a busy machine shifts all cases alike. Token counts
that were not timed come from a least-squares fit ``a + b*N + c*N^2``; ``LatencyModel.ensure``
times a plan's own cases, so the planner's final prediction rests on measurements only.
Composing isolated parts can still miss what only the whole model shows (on a tiny model, per-call
overheads and cache effects between blocks), so ``LatencyModel.measure_plan`` times the converted
model against the original (``measure_speedup``); the planner uses it to verify its choice.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from vitcompress.errors import UnsupportedModelError, VitcompressError
from vitcompress.plan import Plan

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

    def macs(self, tokens: int, static: bool = False) -> int:
        """Multiply-adds per image of this block on ``tokens`` tokens."""
        n, a = int(tokens), self.attn_dim
        if static:
            return n * (self.attn_linear_macs - 2 * a * self.embed_dim + self.mlp_macs) + n * n * a
        return n * (self.attn_linear_macs + self.mlp_macs) + 2 * n * n * a

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
    from vitcompress.convert import vit_geometry

    _, grid, num_prefix_tokens = vit_geometry(model)
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


# ---- plan layout -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """What each block of a plan runs: (kind, tokens) per block and the GLAD stages."""

    blocks: tuple[tuple[str, int], ...]
    glads: tuple[tuple[int, tuple[int, ...], tuple[Grid, ...]], ...]  # (before_block, scales, input grids)


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
    kinds = tuple((STATIC if i in static else DYNAMIC, tokens[i]) for i in range(geom.depth))
    return Layout(kinds, tuple(glads))


def layout_macs(geom: ModelGeometry, layout: Layout) -> int:
    """Multiply-adds per image of the whole model under ``layout``."""
    total = geom.fixed_macs
    for g, (kind, n) in zip(geom.blocks, layout.blocks):
        total += g.macs(n, static=kind == STATIC)
    for _, scales, in_grids in layout.glads:
        total += glad_macs_per_channel(scales, in_grids) * geom.embed_dim
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


def plan_params(geom: ModelGeometry, plan: Plan) -> int:
    """Parameters of the model converted with ``plan``: q/k dropped, static logits and GLAD weights added."""
    layout = plan_layout(geom, plan)
    total = geom.params
    for g, (kind, n) in zip(geom.blocks, layout.blocks):
        if kind == STATIC:
            total += g.static_params_delta(n)
    for _, scales, in_grids in layout.glads:
        total += glad_macs_per_channel(scales, in_grids)  # its weight has one entry per (output, input) pair
    return total


# ---- latency ---------------------------------------------------------------------------------
@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[int]:
    """Run with ``threads`` CPU threads (None: unchanged); yields the count in effect."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise VitcompressError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def time_interleaved(
    fns: Sequence[Callable[[], Any]], device: torch.device, rounds: int = 3, round_seconds: float = 0.1
) -> list[list[float]]:
    """Seconds per call of each of ``fns``, timed in interleaved rounds: ``[round][fn]``.

    Each function is called once to warm up; then every round times every function in turn (a fast
    one repeated to last about ``round_seconds``, so the timer's resolution does not matter).
    Interleaving makes a change in machine load during the measurement hit every function alike,
    so ratios between them stay right even on a busy machine.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reps = []
    for fn in fns:
        start = time.perf_counter()
        fn()
        sync()
        reps.append(max(1, int(round_seconds / max(time.perf_counter() - start, 1e-6))))
    table = []
    for _ in range(rounds):
        row = []
        for fn, k in zip(fns, reps):
            start = time.perf_counter()
            for _ in range(k):
                fn()
            sync()
            row.append((time.perf_counter() - start) / k)
        table.append(row)
    return table


def measure_speedup(
    original: nn.Module,
    converted: nn.Module,
    *,
    batch_size: int,
    device: torch.device,
    threads: Optional[int] = None,
    rounds: int = 3,
    round_seconds: float = 0.1,
) -> tuple[float, list[float]]:
    """Measured speed-up of ``converted`` over ``original`` (both ready on ``device``, in eval mode):
    the median over ``rounds`` interleaved rounds (``time_interleaved``) of the per-round ratio
    original time / converted time, on one fixed random batch of ``batch_size`` images. Returns
    (median, per-round ratios)."""
    h, w = _image_size(original)
    ref = next(original.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, int(original.patch_embed.proj.in_channels), h, w), generator=gen)
    x = x.to(device=device, dtype=ref.dtype)
    with torch_threads(threads), torch.inference_mode():
        table = time_interleaved([lambda: original(x), lambda: converted(x)], device, rounds, round_seconds)
    ratios = [row[0] / row[1] for row in table]
    return statistics.median(ratios), ratios


def fit_quadratic(points: Sequence[tuple[int, float]]) -> list[float]:
    """Least-squares ``[a, b, c]`` of ``t = a + b*N + c*N^2`` minimising the relative error."""
    if not points:
        raise VitcompressError("no timings to fit")
    rows = torch.tensor([[1.0, n, float(n) ** 2] for n, _ in points], dtype=torch.float64)
    t = torch.tensor([v for _, v in points], dtype=torch.float64)
    w = 1.0 / t.clamp_min(1e-12)  # relative error: small blocks matter as much as big ones
    cols = min(3, len(points))  # fewer points than unknowns: a lower-degree fit
    sol = torch.linalg.lstsq(rows[:, :cols] * w[:, None], t * w).solution
    return [float(v) for v in sol] + [0.0] * (3 - cols)


Case = tuple  # ("block", kind, tokens) | ("glad", scales, in_grids) | ("fixed",)


@dataclass
class LatencyModel:
    """Measured latencies of a model's parts on one device, thread count and batch size.

    Build it with ``LatencyModel.calibrate(model, ...)``. Times are seconds per batch. Every
    measurement is made interleaved with the reference case (a dynamic block on the full token
    count) and stored as its ratio to it times the reference's own time, so cases timed at
    different moments on a busy machine stay comparable. ``block_s``/``glad_s`` return a measured
    value when that case was timed, else an estimate from the others; ``ensure(layout)`` times
    whatever a plan uses that was not timed yet.
    """

    device: str
    threads: int
    batch_size: int
    num_tokens: int
    reference_s: float = 0.0
    fixed_s: float = 0.0
    block_times: dict[tuple[str, int], float] = field(default_factory=dict)
    glad_times: dict[tuple[tuple[int, ...], tuple[Grid, ...]], float] = field(default_factory=dict)
    seconds_spent: float = 0.0
    rounds: int = 5
    _timer: Optional["_PartTimer"] = field(default=None, repr=False)

    @classmethod
    def calibrate(
        cls,
        model: nn.Module,
        *,
        batch_size: int = 32,
        device: Optional[str | torch.device] = None,
        threads: Optional[int] = None,
        token_counts: Sequence[int] = (),
        glads: Sequence[tuple[tuple[int, ...], tuple[Grid, ...]]] = (),
        rounds: int = 5,
    ) -> "LatencyModel":
        """Time, interleaved: a dynamic and a static block on the full token count, everything
        outside the blocks, dynamic blocks on ``token_counts`` tokens, and the GLAD stages
        ``glads`` ((scales, input grids) pairs)."""
        timer = _PartTimer(model, batch_size, device, threads)
        lat = cls(device=str(timer.device), threads=timer.threads, batch_size=batch_size,
                  num_tokens=timer.num_tokens, rounds=rounds, _timer=timer)
        full = timer.num_tokens
        cases: list[Case] = [("fixed",), ("block", STATIC, full)]
        cases += [("block", DYNAMIC, int(n)) for n in token_counts if int(n) != full]
        cases += [("glad", *_glad_key(sc, grids)) for sc, grids in glads]
        lat._measure(cases)
        return lat

    # -- measuring
    def _ref(self) -> Case:
        return ("block", DYNAMIC, self.num_tokens)

    def _known(self, case: Case) -> bool:
        if case[0] == "fixed":
            return self.fixed_s > 0
        if case[0] == "block":
            return (case[1], case[2]) in self.block_times
        return (case[1], case[2]) in self.glad_times

    def _measure(self, cases: Sequence[Case]) -> None:
        """Time ``cases`` (those not timed yet) interleaved with the reference."""
        todo = list(dict.fromkeys(c for c in cases if not self._known(c) and c != self._ref()))
        if not todo and self.reference_s > 0:
            return
        if self._timer is None:
            raise VitcompressError("this latency model has no model attached: calibrate again to time new cases")
        start = time.perf_counter()
        group = [self._ref()] + todo
        table = self._timer.run(group, self.rounds)
        if self.reference_s <= 0:
            self.reference_s = statistics.median(row[0] for row in table)
            self.block_times[(DYNAMIC, self.num_tokens)] = self.reference_s
        for j, case in enumerate(group[1:], start=1):
            value = self.reference_s * statistics.median(row[j] / row[0] for row in table)
            if case[0] == "fixed":
                self.fixed_s = value
            elif case[0] == "block":
                self.block_times[(case[1], case[2])] = value
            else:
                self.glad_times[(case[1], case[2])] = value
        self.seconds_spent += time.perf_counter() - start

    @staticmethod
    def _cases(layout: Layout) -> list[Case]:
        return [("block", kind, n) for kind, n in layout.blocks] + [
            ("glad", *_glad_key(scales, grids)) for _, scales, grids in layout.glads
        ]

    def timed_block(self, kind: str, tokens: int) -> bool:
        return (kind, int(tokens)) in self.block_times

    def timed_glad(self, scales: Sequence[int], in_grids: Sequence[Grid]) -> bool:
        return _glad_key(scales, in_grids) in self.glad_times

    def measured(self, layout: Layout) -> bool:
        """True when every block kind/token count and GLAD stage of ``layout`` has been timed."""
        return all(self._known(c) for c in self._cases(layout))

    def ensure(self, layout: Layout) -> None:
        """Time every block kind/token count and GLAD stage of ``layout`` not timed yet."""
        self._measure(self._cases(layout))

    def measure_plan(
        self, model: nn.Module, plan: Plan, rounds: int = 3, round_seconds: float = 0.25
    ) -> tuple[float, list[float]]:
        """Convert ``model`` with ``plan`` and time it against the original on this model's
        device, threads and batch size (``measure_speedup``): (measured speed-up, per-round ratios).
        Whole models are timed, so what timing the parts in isolation misses (small models in
        particular: per-call overheads, cache effects between blocks) is included."""
        from vitcompress.convert import convert

        if self._timer is None:
            raise VitcompressError("this latency model has no model attached: calibrate again to verify a plan")
        timer = self._timer
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # static layers start from uniform attention: same cost
            converted = convert(model, plan).eval().to(timer.device)
        result = measure_speedup(timer.original(), converted, batch_size=self.batch_size, device=timer.device,
                                 threads=timer.threads_request, rounds=rounds,
                                 round_seconds=round_seconds)
        self.seconds_spent += time.perf_counter() - start
        return result

    # -- predicting
    def block_s(self, kind: str, tokens: int) -> float:
        """Seconds per batch of one block of ``kind`` on ``tokens`` tokens (measured, else fitted)."""
        key = (kind, int(tokens))
        if key in self.block_times:
            return self.block_times[key]
        if kind == STATIC:
            # Static blocks are usually timed on the full token count only: scale the dynamic fit.
            ratio = self.block_times[(STATIC, self.num_tokens)] / self.reference_s
            return ratio * self.block_s(DYNAMIC, tokens)
        a, b, c = fit_quadratic([(n, t) for (k, n), t in self.block_times.items() if k == DYNAMIC])
        return max(a + b * tokens + c * tokens * tokens, 0.0)

    def glad_s(self, scales: Sequence[int], in_grids: Sequence[Grid]) -> float:
        """Seconds per batch of a GLAD stage (measured, else proportional to its multiply-adds)."""
        key = _glad_key(scales, in_grids)
        if key in self.glad_times:
            return self.glad_times[key]
        if not self.glad_times:
            return 0.0
        # Untimed stage: the timed stage with the most work, scaled by multiply-adds.
        ref_key, ref_t = max(self.glad_times.items(), key=lambda kv: glad_macs_per_channel(*kv[0]))
        return ref_t * glad_macs_per_channel(*key) / max(glad_macs_per_channel(*ref_key), 1)

    def layout_s(self, layout: Layout) -> tuple[float, list[float], list[float]]:
        """(total seconds per batch, seconds per block, seconds per GLAD stage) of ``layout``."""
        blocks = [self.block_s(kind, n) for kind, n in layout.blocks]
        glads = [self.glad_s(scales, in_grids) for _, scales, in_grids in layout.glads]
        return self.fixed_s + sum(blocks) + sum(glads), blocks, glads

    def to_dict(self) -> dict[str, Any]:
        """The timings as JSON-ready data (milliseconds per batch)."""
        return {
            "device": self.device,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "fixed_ms": self.fixed_s * 1e3,
            "blocks_ms": [{"kind": k, "tokens": n, "ms": t * 1e3} for (k, n), t in sorted(self.block_times.items())],
            "glads_ms": [
                {"scales": list(s), "in_grids": [list(g) for g in grids], "ms": t * 1e3}
                for (s, grids), t in sorted(self.glad_times.items())
            ],
            "seconds_spent": self.seconds_spent,
        }


def _glad_key(scales: Sequence[int], in_grids: Sequence[Grid]) -> tuple[tuple[int, ...], tuple[Grid, ...]]:
    return tuple(int(s) for s in scales), tuple((int(h), int(w)) for h, w in in_grids)


class _PartTimer:
    """Builds and times parts of one model in isolation: a copy of one block, its static-attention
    version, GLAD stages, and everything outside the blocks."""

    def __init__(self, model: nn.Module, batch_size: int, device: Optional[str | torch.device], threads: Optional[int]) -> None:
        if batch_size < 1:
            raise VitcompressError(f"batch size must be at least 1, got {batch_size}")
        ref = next(model.parameters())
        self.device = torch.device(device) if device is not None else ref.device
        self.dtype = ref.dtype
        self.threads_request = threads
        with torch_threads(threads) as n:
            self.threads = n
        self.batch_size = int(batch_size)
        self.model = model
        self.num_prefix = int(model.num_prefix_tokens)
        self.grid = (int(model.patch_embed.grid_size[0]), int(model.patch_embed.grid_size[1]))
        self.num_tokens = self.num_prefix + self.grid[0] * self.grid[1]
        self.embed_dim = int(model.embed_dim)
        # A middle block stands for all of them (a ViT's blocks have the same sizes).
        self.block = copy.deepcopy(model.blocks[len(model.blocks) // 2]).eval().to(self.device)
        self._modules: dict[Case, nn.Module] = {}
        self._original: Optional[nn.Module] = None

    def original(self) -> nn.Module:
        """The whole unconverted model on the timing device, in eval mode (a copy, made once)."""
        if self._original is None:
            self._original = copy.deepcopy(self.model).eval().to(self.device)
        return self._original

    def run(self, cases: Sequence[Case], rounds: int) -> list[list[float]]:
        fns = [self._call(case) for case in cases]
        with torch_threads(self.threads_request), torch.inference_mode():
            return time_interleaved(fns, self.device, rounds)

    def _call(self, case: Case) -> Callable[[], Any]:
        module, x = self._module(case), self._input(case)
        return lambda: module(x)

    def _module(self, case: Case) -> nn.Module:
        if case not in self._modules:
            self._modules[case] = self._build(case)
        return self._modules[case]

    def _build(self, case: Case) -> nn.Module:
        from vitcompress.modules import DGSSA, GLAD

        if case[0] == "fixed":
            # The model with an empty Sequential for its blocks (the memo stops deepcopy there).
            return copy.deepcopy(self.model, memo={id(self.model.blocks): nn.Sequential()}).eval().to(self.device)
        if case[0] == "glad":
            return GLAD(self.num_prefix, case[2], case[1], device=self.device, dtype=self.dtype)
        if case[1] == DYNAMIC:
            return self.block
        block = copy.deepcopy(self.block)
        block.attn = DGSSA(block.attn, case[2]).eval()
        return block

    def _input(self, case: Case) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)  # fixed inputs: reproducible timings
        if case[0] == "fixed":
            h, w = _image_size(self.model)
            shape: tuple[int, ...] = (self.batch_size, int(self.model.patch_embed.proj.in_channels), h, w)
        elif case[0] == "glad":
            shape = (self.batch_size, self.num_prefix + sum(h * w for h, w in case[2]), self.embed_dim)
        else:
            shape = (self.batch_size, case[2], self.embed_dim)
        return torch.randn(shape, generator=gen).to(device=self.device, dtype=self.dtype)


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(model.patch_embed, "img_size", None)
    if size is None:
        raise UnsupportedModelError("the patch embedding has no fixed img_size: create the model with a fixed img_size")
    return int(size[0]), int(size[1])


__all__ = [
    "DYNAMIC",
    "STATIC",
    "BlockGeometry",
    "Layout",
    "LatencyModel",
    "ModelGeometry",
    "base_flops",
    "fit_quadratic",
    "glad_macs_per_channel",
    "layout_macs",
    "measure_speedup",
    "model_geometry",
    "plan_flops",
    "plan_layout",
    "plan_params",
    "time_interleaved",
    "torch_threads",
]
