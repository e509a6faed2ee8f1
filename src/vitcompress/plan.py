"""The planner: what to compress so that the measured speed-up meets a budget at the least
measured damage.

``make_plan`` searches one space for every method (``--method``):

* ``dgssa``: static attention (DGSSA) in a set of blocks;
* ``glad``: one or two token-aggregation stages (GLAD: block position and pyramid scales);
* ``dgssa-glad`` (the default): static blocks before the first aggregation stage, plus the stages;
* ``tome``: token merging, r tokens merged per block (constant, decreasing, or every 2nd/3rd block);
* ``auto``: all of the above, keeping whatever measures best.

Damage is measured, in one unit (``vitcompress.damage``: KL of the class distributions against the
original on calibration images from the training split). Every single change (one static layer,
one GLAD stage) is measured once from cached block inputs; a candidate's damage is first estimated
as the sum of its parts, and the few candidates that could be chosen are then measured whole.
Speed is measured the one way (``vitcompress.timing``), on the stated deployment (device, batch
size, threads): a candidate's speed-up is predicted from a latency table (one block's attention
and MLP halves timed at every token count the candidates use, ``cost.table_speedup``: on CPU a
block's time is far from linear in its tokens), corrected by the measured/table ratio of the
nearest timed candidate of the same kind, and every plan that could be chosen is timed whole
before it is. The plan kept is the least damaging candidate whose measured
speed-up meets the budget (within ``MEASURED_TOLERANCE``, the noise of a short timing).
Every timing is stored in this machine's timing cache (``vitcompress.timing_cache``) and reused by
the next call for the same model and deployment, which then takes every decision the first took:
damage is deterministic, so the same call gives the same plan (``reuse_timings=False``,
``--retime``: time afresh).

Without calibration images damage falls back to a proxy read from the analysis (attention
similarity and rank); without timing (``measure_speed=False``) speed falls back to FLOPs. The plan
says which.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from vitcompress.cost import (
    LatencyTable,
    ModelGeometry,
    base_flops,
    block_halves,
    flop_speedup,
    layout_token_counts,
    model_geometry,
    plan_flops,
    plan_layout,
    plan_params,
    table_speedup,
)
from vitcompress.damage import Damage, DamageMeter, Difference
from vitcompress.errors import UnsupportedModelError, VitcompressError
from vitcompress.geometry import check_supported, input_size
from vitcompress.plan_types import (  # re-exported: the plan types live in plan_types
    BUDGET_FORMS,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_METHOD,
    DEFAULT_TOME_METRIC,
    METHODS,
    PLAN_VERSION,
    SCHEDULE_KINDS,
    TOME_METRICS,
    Budget,
    Plan,
    Reduction,
    load_plan,
    parse_budget,
    save_plan,
)
from vitcompress.timing import SpeedComparison, TimingWorker, compare_speed
from vitcompress.timing_cache import TimingCache, cache_root, timing_context

Log = Callable[[str], None]

# ---- what the analysis says about each layer --------------------------------------------------
# Added to the damage of a static layer the analysis does not recommend for static attention, so
# that such a layer is made static only when no plan without it meets the budget.
NOT_RECOMMENDED_PENALTY = 1.0


def prior_similarity(index: int, depth: int) -> float:
    """Similarity assumed without an analysis: falls linearly from ~1 (first block) to 0.5 (last),
    the trend that motivates static attention in early layers (arXiv:2310.07664)."""
    return 1.0 - 0.5 * (index + 1) / depth


def prior_rank(index: int, depth: int) -> float:
    """Normalised rank assumed without an analysis: falls linearly from 1 (first block) to 0.5
    (last), the trend that motivates token aggregation in late layers."""
    return 1.0 - 0.5 * index / max(depth - 1, 1)


@dataclass(frozen=True)
class LayerScore:
    """Per-layer figures the damage proxy uses."""

    similarity: float  # cross-image attention similarity in [0, 1]
    rank: float  # normalised attention rank (rank90 / N) in [0, 1]
    static_recommended: bool


def layer_scores(analysis: Any, depth: int, num_tokens: int) -> tuple[list[LayerScore], str]:
    """Scores of each block from an ``Analysis`` (or neutral ones without it), and a note on the source."""
    if analysis is None:
        priors = [LayerScore(prior_similarity(i, depth), prior_rank(i, depth), True) for i in range(depth)]
        return priors, "no analysis: static layers in depth order; similarity and rank assumed to fall with depth"
    layers = {int(layer.index): layer for layer in getattr(analysis, "layers", [])}
    if int(getattr(analysis, "num_tokens", num_tokens)) != num_tokens or (layers and max(layers) >= depth):
        raise VitcompressError(
            f"the analysis was made for a model with {getattr(analysis, 'num_tokens', '?')} tokens and "
            f"{len(layers)} blocks, not this one ({num_tokens} tokens, {depth} blocks): "
            f"run `vitcompress analyze` on this model"
        )
    scores = []
    for i in range(depth):
        layer = layers.get(i)
        if layer is None:  # not analysed: the prior, and not recommended for static attention
            scores.append(LayerScore(prior_similarity(i, depth), prior_rank(i, depth), False))
        else:
            scores.append(LayerScore(float(layer.similarity_mean), float(layer.rank90_norm), layer.recommendation == "static"))
    model_id = getattr(analysis, "model_id", "?")
    return scores, f"analysis of '{model_id}' ({getattr(analysis, 'samples', '?')} images): layers ordered by similarity"


def static_damage(score: LayerScore) -> float:
    """Damage proxy of making a layer static: the attention variation across images it loses."""
    return (1.0 - score.similarity) + (0.0 if score.static_recommended else NOT_RECOMMENDED_PENALTY)


def reduce_damage(score: LayerScore, kept_fraction: float) -> float:
    """Damage proxy of running a block on a kept fraction f of the patch tokens, given its
    normalised attention rank r: the rank share dropped with the tokens, ``r * (1 - f)``, plus the
    share of the rank that cannot fit in the kept tokens at all, ``max(0, 1 - f / r)``."""
    r, f = max(score.rank, 1e-6), kept_fraction
    return r * (1.0 - f) + max(0.0, 1.0 - f / r)


def plan_damage(plan: Plan, scores: Sequence[LayerScore]) -> float:
    """The planner's damage proxy of ``plan``: sum over static layers of ``static_damage`` plus
    sum over blocks running on reduced tokens of ``reduce_damage``. Lower means closer to the
    original model; it orders plans, it is not an accuracy estimate."""
    patches = plan.grid[0] * plan.grid[1]
    total = sum(static_damage(scores[i]) for i in plan.static_layers)
    for i, tokens in enumerate(plan.tokens_per_block()):
        kept = (tokens - plan.num_prefix_tokens) / patches
        if kept < 1.0:
            total += reduce_damage(scores[i], kept)
    return total


# ---- candidate token reductions -------------------------------------------------------------
_TOP_FRACTIONS = (0.85, 0.75, 0.65, 0.5, 0.4, 0.33, 0.25, 0.2, 0.15)


def scale_menu(side: int, max_tokens: int) -> list[tuple[int, ...]]:
    """Pyramid scales a GLAD stage may use on a grid of shorter side ``side``, keeping fewer than
    ``max_tokens`` tokens, most tokens first: for each top scale t (a few fractions of the side),
    ``[t, 1]`` and the halving pyramid ``[t, t//2, ..., 1]`` (14x14 -> [12, 6, 3, 1], ..., [7, 3, 1],
    [7, 1], ..., [2, 1])."""
    tops = sorted({max(2, round(side * f)) for f in _TOP_FRACTIONS}, reverse=True)
    menu: list[tuple[int, ...]] = []
    for top in (t for t in tops if t < side):
        halving = [top]
        while halving[-1] > 1:
            halving.append(halving[-1] // 2)
        for scales in ((top, 1), tuple(halving)):
            if sum(s * s for s in scales) < max_tokens and scales not in menu:
                menu.append(scales)
    return sorted(menu, key=lambda sc: (-sum(s * s for s in sc), sc))


Stages = tuple[tuple[int, tuple[int, ...]], ...]  # ((before_block, scales), ...)


def _stage_options(geom: "ModelGeometry", max_stages: int) -> list[Stages]:
    """Every reduction layout the planner considers: none, one stage, or two stages."""
    depth, patches = geom.depth, geom.num_patches
    options: list[Stages] = [()]
    if max_stages < 1:
        return options
    for p1 in range(1, depth):
        for sc1 in scale_menu(min(geom.grid), patches):
            options.append(((p1, sc1),))
            if max_stages < 2:
                continue
            second = scale_menu(sc1[0], sum(s * s for s in sc1))
            options.extend(((p1, sc1), (p2, sc2)) for p2 in range(p1 + 1, depth) for sc2 in second)
    return options




# ---- candidates ------------------------------------------------------------------------------
FAMILIES = {
    "dgssa": ("dgssa",),
    "glad": ("glad",),
    "dgssa-glad": ("dgssa", "glad", "dgssa-glad"),
    "tome": ("tome",),
    "auto": ("dgssa", "glad", "dgssa-glad", "tome"),
}
# Every-second/third-block schedules: on the CIFAR-10 teacher at 2.5x in FLOPs, merging in every
# third block measured 2.16x at batch 32 and 1.04x at batch 1 against 1.99x and 0.81x for the
# decreasing schedule (fewer blocks pay the matching's per-call cost), at similar damage. Every
# fourth/sixth block: at 2.4x in FLOPs (2026-12-03, AMD VM) 1.03x and 1.10x at batch 1 (every third
# 1.04x): more token-merging plans that a batch-1 floor keeps. The planner searches every kind.
TOME_SCHEDULES = SCHEDULE_KINDS

Part = tuple  # ("static", block) | ("glad", before_block, scales) | ("tome", schedule kind): the whole plan


@dataclass
class Candidate:
    """One plan the planner considers, with what it knows of it so far."""

    plan: Plan
    family: str  # dgssa, glad, dgssa-glad or tome
    flop_speedup: float
    parts: tuple[Part, ...]  # the single changes its damage estimate adds up
    estimate: Optional[float] = None  # damage: sum of the parts' (or the proxy)
    damage: Optional[Damage] = None  # damage measured on the whole plan
    speed: Optional[SpeedComparison] = None  # speed-up measured on the whole plan
    search_speedup: Optional[float] = None  # the search's short timing, when ``speed`` was re-timed longer
    batch1: Optional[SpeedComparison] = None  # the speed-up measured at batch 1 (the single-image check)
    table_speedup: Optional[float] = None  # predicted from the latency table (None: no table)

    @property
    def base_speedup(self) -> float:
        """What timings correct into a prediction: the table's speed-up, else the FLOPs'."""
        return self.table_speedup if self.table_speedup is not None else self.flop_speedup

    @property
    def speed_class(self) -> tuple:
        """Plans whose measured/FLOP speed ratio is alike: the family, and for token merging the
        schedule kind (merging in every third block pays the matching's per-call cost a third as
        often, so its ratio is higher than an every-block schedule's at the same FLOPs)."""
        return (self.family, self.parts[0][1]) if self.family == "tome" else (self.family,)

    @property
    def key(self) -> tuple:
        p = self.plan
        return (tuple(p.static_layers), tuple((r.before_block, tuple(r.scales)) for r in p.reductions), tuple(p.merges()))


def _plan(geom: ModelGeometry, method: str, static: Sequence[int] = (), stages: Stages = (), merges: Sequence[int] = (),
          tome_metric: str = DEFAULT_TOME_METRIC) -> Plan:
    return Plan(
        static_layers=sorted(int(i) for i in static),
        reductions=[Reduction(int(p), [int(s) for s in scales]) for p, scales in stages],
        num_blocks=geom.depth, num_prefix_tokens=geom.num_prefix_tokens, grid=geom.grid,
        merge_r=[int(r) for r in merges] if any(merges) else [], method=method, tome_metric=tome_metric,
    )


def _candidates(geom: ModelGeometry, method: str, static_order: Sequence[int], max_stages: int,
                tome_metric: str = DEFAULT_TOME_METRIC) -> list[Candidate]:
    """Every plan of ``method``'s families. Static layers are taken in ``static_order`` (least
    damaging first) among the blocks before the first aggregation stage (static attention starts
    from the mean attention measured on the original tokens)."""
    families = FAMILIES[method]
    out: list[Candidate] = []
    if any(f != "tome" for f in families):
        for stages in _stage_options(geom, max_stages if "glad" in families or "dgssa-glad" in families else 0):
            limit = stages[0][0] if stages else geom.depth
            eligible = [i for i in static_order if i < limit]
            for count in range(len(eligible) + 1):
                family = _family(count, stages)
                if family is None or family not in families:
                    continue
                static = eligible[:count]
                parts = tuple(("static", i) for i in sorted(static)) + tuple(("glad", p, sc) for p, sc in stages)
                out.append(_candidate(geom, _plan(geom, method, static, stages), family, parts))
    if "tome" in families:
        out.extend(_candidate(geom, _plan(geom, method, merges=m, tome_metric=tome_metric), "tome", (("tome", kind),))
                   for kind, m in _tome_schedules(geom))
    return out


def _family(static_count: int, stages: Stages) -> Optional[str]:
    if static_count and stages:
        return "dgssa-glad"
    return "dgssa" if static_count else ("glad" if stages else None)


def _candidate(geom: ModelGeometry, plan: Plan, family: str, parts: tuple[Part, ...]) -> Candidate:
    return Candidate(plan, family, flop_speedup(geom, plan), parts)


def _tome_schedules(geom: ModelGeometry) -> Iterator[tuple[str, list[int]]]:
    """Token-merging schedules (kind, r per block) of every ``TOME_SCHEDULES`` kind, for every total number of
    tokens merged (not only multiples of the depth: a budget then gets the schedule that just meets
    it, not one up to a block's worth of merges faster and more damaging)."""
    from vitcompress.modules.tome import merge_schedule

    seen: set[tuple[int, ...]] = set()
    for kind in TOME_SCHEDULES:
        for total in range(1, geom.depth * geom.num_patches):
            schedule = tuple(merge_schedule(geom.depth, total, geom.num_tokens, geom.num_prefix_tokens, kind=kind))
            if schedule not in seen:  # clipped totals can repeat a schedule
                seen.add(schedule)
                yield kind, list(schedule)


# ---- damage ----------------------------------------------------------------------------------
class _Damages:
    """Damage estimates and measurements, memoised: measured parts when there are calibration
    images, else the analysis proxy.

    Token merging has no single-change parts: an unmeasured schedule's estimate is a lower bound,
    the largest damage measured on a schedule of the same kind that merges less (damage grows with
    r), 0 before any. The search then measures whole only the schedules that could win (the least
    merging one that meets the budget, per kind) instead of every one."""

    def __init__(self, geom: ModelGeometry, meter: Optional[DamageMeter], scores: Sequence[LayerScore]) -> None:
        self.geom, self.meter, self.scores = geom, meter, list(scores)
        self.parts: dict[Part, Damage] = {}
        self.merging: dict[str, list[Candidate]] = {}  # measured token-merging candidates per schedule kind

    def part(self, part: Part, method: str) -> Damage:
        if part not in self.parts:
            kind = part[0]
            plan = _plan(self.geom, method, static=[part[1]]) if kind == "static" else _plan(self.geom, method, stages=((part[1], part[2]),))
            self.parts[part] = self.meter.from_block(plan, part[1])  # type: ignore[union-attr]
        return self.parts[part]

    def estimate(self, c: Candidate) -> float:
        if self.meter is not None and c.parts[0][0] == "tome":
            if c.damage is not None:
                return c.damage.kl
            same = self.merging.get(c.parts[0][1], [])
            return max((t.damage.kl for t in same if t.flop_speedup <= c.flop_speedup), default=0.0)  # type: ignore[union-attr]
        if c.estimate is None:
            if self.meter is None:
                c.estimate = plan_damage(c.plan, self.scores)
            else:
                c.estimate = sum(self.part(p, c.plan.method).kl for p in c.parts)
        return c.estimate

    def whole(self, c: Candidate) -> Damage:
        """``c``'s whole damage on the search sample (the first ``search_images`` calibration images)."""
        if c.damage is None:
            c.damage = self.meter.whole(c.plan, self.meter.search_count)  # type: ignore[union-attr]
            if c.parts[0][0] == "tome":
                self.merging.setdefault(c.parts[0][1], []).append(c)
        return c.damage

    def compare(self, a: Candidate, b: Candidate) -> Difference:
        """Damage of ``a`` minus ``b``, paired per image (on every calibration image where the search
        sample does not decide); without a meter, from the two damages and their standard errors."""
        da, db = self.whole(a), self.whole(b)  # (recorded on the candidates either way)
        if self.meter is not None:
            return self.meter.compare(a.plan, b.plan)
        return Difference(da.kl - db.kl, math.hypot(da.kl_se, db.kl_se), min(da.images, db.images))

    def best_known(self, c: Candidate) -> float:
        """The measured whole damage when there is one, else the estimate."""
        return c.damage.kl if c.damage is not None else self.estimate(c)


# ---- speed -----------------------------------------------------------------------------------
@dataclass
class Deployment:
    """Where the compressed model will run, which the planner times for."""

    device: str = "cpu"
    batch_size: int = 32
    threads: Optional[int] = None
    seconds: float = 3.0  # per timed candidate: as long as the timing stored in the exported file
    # The chosen plan must not be measurably slower than this speed-up at batch 1 (None: not
    # checked): the upper quartile of its batch-1 timing must reach it. A plan chosen for a large
    # batch can be slower than the original on single images: token merging's per-block index
    # operations cost the same at any batch (the CIFAR-10 teacher's 2x token-merging plan measured
    # 2.13x at batch 32 and 0.93x at batch 1; GLAD's 2.10x and 1.24x). Not the median: the same
    # every-third-block schedule measured 0.96x, 1.01x and 1.02x at batch 1 in three runs (quartiles
    # about 5% either side), and a median floor then chose GLAD in one run and merging in two.
    batch1_floor: Optional[float] = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "batch_size": self.batch_size, "threads": self.threads or torch.get_num_threads()}


def _device(name: str) -> torch.device:
    """The deployment's device, refused at once (not after the damage measurements) if absent."""
    from vitcompress.bench import resolve_device

    return resolve_device(name)


class _Speeds:
    """Measured speed-ups of whole candidates, and predictions for the untimed ones."""

    def __init__(self, model: nn.Module, deployment: Optional[Deployment], means: Optional[Mapping[int, torch.Tensor]],
                 say: Optional[Log] = None, reuse_timings: bool = True) -> None:
        self.deployment, self.means = deployment, means
        self.timed: list[Candidate] = []
        self.table: Optional[LatencyTable] = None
        self.cache: Optional[TimingCache] = None
        # Timed in a fresh process: this one measures damage on thousands of images first, after
        # which merged models timed up to 15% slower than in `bench` (timing.TimingWorker).
        self.worker = TimingWorker(on_fallback=say, in_process=lambda *args, **kwargs: compare_speed(*args, **kwargs))
        if deployment is not None:
            # A copy on the deployment's device: moving the caller's model (``.to`` is in place)
            # would also move the one the damage is measured with, away from its images.
            device = _device(deployment.device)
            on = next(model.parameters()).device
            self.model = (model if on == device else copy.deepcopy(model).to(device)).eval()
            self.size = input_size(model)
            context = timing_context(self.model, self.size, deployment.device, deployment.threads)
            self.cache = TimingCache(cache_root(), context, reuse=reuse_timings, say=say)
            if len(self.cache) and say is not None:
                say(f"reusing the timings this machine stored for this model ({len(self.cache)} in {self.cache.path}; "
                    f"--retime measures afresh)")

    def use_table(self, geom: ModelGeometry, candidates: Sequence[Candidate], say: Log) -> None:
        """Measure the latency table for ``candidates`` and set their ``table_speedup`` (nothing
        without a deployment, or when the table cannot be measured)."""
        if self.deployment is None:
            return
        counts = layout_token_counts([plan_layout(geom, c.plan) for c in candidates]) + [geom.num_tokens]
        say(f"timing one block on {len(set(counts))} token counts (the latency table)")
        self.table = _latency_table(self, geom, counts)
        if self.table is not None:
            for c in candidates:
                c.table_speedup = table_speedup(geom, c.plan, self.table)

    def predict(self, c: Candidate) -> float:
        if c.speed is not None:
            return c.speed.speedup
        return _corrected(c, self.timed)

    def measure(self, plan: Plan, batch_size: Optional[int] = None, seconds: Optional[float] = None) -> SpeedComparison:
        """``plan`` converted and timed against the original on the deployment (at its batch size
        and for its seconds unless told otherwise)."""
        from vitcompress.convert import convert

        d = self.deployment
        assert d is not None and self.cache is not None
        request = {"what": "plan", "batch_size": batch_size or d.batch_size, "seconds": seconds or d.seconds,
                   "plan": _structure(plan)}
        stored = _decoded(self.cache.get(request), lambda d: SpeedComparison(**d))
        if stored is not None:
            return stored
        student = convert(self.model, plan, self.means).eval()
        speed = self.worker.compare(self.model, student, self.size, batch_size=request["batch_size"], threads=d.threads,
                                    device=d.device, seconds=request["seconds"])
        if timing_spread(speed) <= NOISY_SPREAD:  # a busy machine's timing is not kept for the next run
            self.cache.put(request, speed.to_dict())
        return speed

    def time(self, c: Candidate) -> SpeedComparison:
        c.speed = self.measure(c.plan)
        self.timed.append(c)
        return c.speed


# The latency table's timing budget, in deployment timings (``Deployment.seconds``) of a candidate.
TABLE_TIMINGS = 2


def _latency_table(speeds: _Speeds, geom: ModelGeometry, token_counts: Sequence[int]) -> Optional[LatencyTable]:
    """The deployment's latency table of the model's first block (all blocks of a supported ViT
    have the same shape), timed like a candidate (in the timing process); None for a block that
    is not split into timm's two residual branches (predictions then start from FLOPs)."""
    d = speeds.deployment
    assert d is not None and speeds.cache is not None
    try:
        halves = block_halves(speeds.model.blocks[0])
    except UnsupportedModelError:
        return None
    request = {"what": "latency table", "batch_size": d.batch_size, "seconds": TABLE_TIMINGS * d.seconds,
               "token_counts": sorted(set(int(n) for n in token_counts))}
    stored = _decoded(speeds.cache.get(request),  # JSON object keys are strings
                      lambda d: LatencyTable(**{half: {int(n): float(t) for n, t in times.items()} for half, times in d.items()}))
    if stored is not None:
        return stored
    seconds = speeds.worker.time_token_counts(halves, geom.embed_dim, token_counts, batch_size=d.batch_size,
                                              threads=d.threads, device=d.device, seconds=request["seconds"])
    speeds.cache.put(request, {"attention": seconds["attention"], "mlp": seconds["mlp"]})
    return LatencyTable(attention=seconds["attention"], mlp=seconds["mlp"])


def _decoded(stored: Any, decode: Callable[[Any], Any]) -> Any:
    """A stored timing decoded, or None (not stored, or an entry edited out of shape: timed again)."""
    if stored is None:
        return None
    try:
        return decode(stored)
    except (TypeError, ValueError, AttributeError):
        return None


def _structure(plan: Plan) -> dict[str, Any]:
    """What of a plan its speed depends on: all but its budget, method and records."""
    return {k: v for k, v in plan.to_dict().items() if k not in ("budget", "method", "predicted", "measured")}


# ---- the planner -----------------------------------------------------------------------------
# A measured speed-up comes from a short timing with a few percent of noise: a plan that measures
# within this fraction of the budget counts as meeting it, so the verdict does not flip run to run.
MEASURED_TOLERANCE = 0.03
MAX_TIMED = 12  # whole candidates timed at most (each speed class gets one exploratory timing)
MAX_WHOLE = 24  # whole candidates' damage measured at most


def make_plan(
    model: nn.Module,
    analysis: Any = None,
    budget: Union[str, float, Budget] = "2x",
    *,
    method: str = DEFAULT_METHOD,
    calibration: Union[torch.Tensor, DamageMeter, None] = None,
    attention_means: Optional[Mapping[int, torch.Tensor]] = None,
    deployment: Optional[Deployment] = None,
    measure_speed: bool = True,
    max_stages: int = 2,
    shortlist: bool = False,
    tome_metric: str = DEFAULT_TOME_METRIC,
    reuse_timings: bool = True,
    log: Optional[Log] = None,
) -> Plan:
    """Choose a plan for ``model`` (a stock timm ViT) that meets ``budget`` at the least damage.

    Args:
        analysis: an ``Analysis`` of this model (used for the proxy without calibration images,
            and recorded), or None.
        method: one of ``METHODS`` (see the module docstring).
        calibration: images [N, C, H, W] from the training split to measure damage on, or a
            ``DamageMeter`` built on them (reused across calls: each change is measured once);
            None: the analysis proxy.
        attention_means: ``{block: [H, N, N]}`` mean attention (static layers start from it, as in
            ``convert``); without it static layers start uniform, and their measured damage says so.
        deployment: device, batch size and threads to time on (default: CPU, batch 32, torch's threads).
        measure_speed: time candidates (default) or predict from FLOPs alone.
        shortlist: also search each other family of ``method`` on its own and record the best
            plan of each that meets the budget in ``plan.measured["shortlist"]`` (plan dicts,
            least damaging first): what a probe fine-tune chooses among, where training-free
            damage may mislead (``pipeline``'s ``probe_steps``).
        tome_metric: what token-merging plans match tokens on (``TOME_METRICS``): ``"tokens"``
            (the default, less damaging) or ``"keys"`` (token merging as its authors publish it,
            the baseline ``benchmarks/frontier.py`` compares with).
        reuse_timings: reuse the timings this machine stored for this model and deployment
            (``vitcompress.timing_cache``: the same call then gives the same plan); False measures
            every timing afresh. What is measured is stored either way.
    """
    check_supported(model)
    target = Budget.parse(budget)
    if method not in METHODS:
        raise VitcompressError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if tome_metric not in TOME_METRICS:
        raise VitcompressError(f"tome_metric {tome_metric!r} is not one of {', '.join(TOME_METRICS)}")
    say = log or (lambda message: None)
    model = model.eval()
    geom = model_geometry(model)
    scores, selection = layer_scores(analysis, geom.depth, geom.num_tokens)
    deployment = deployment or Deployment()
    speeds = _Speeds(model, deployment if measure_speed else None, attention_means, say, reuse_timings)
    with speeds.worker:  # the timing process ends with the search, also on an error
        meter = calibration if isinstance(calibration, DamageMeter) else None
        if calibration is not None and meter is None:
            meter = DamageMeter(model, calibration, attention_means)
        if meter is not None:
            say(f"measuring damage on {meter.count} calibration images (the search ranks on the first {meter.search_count})")
        damages = _Damages(geom, meter, scores)
        static_order = _static_order(geom, damages, scores, method)
        candidates = _candidates(geom, method, static_order, max_stages, tome_metric)
        if not candidates:
            raise VitcompressError(f"method {method} has no candidate plans for this model")
        say(f"{len(candidates)} candidate plans ({method}); timing on {deployment.device}, batch {deployment.batch_size}"
            if measure_speed else f"{len(candidates)} candidate plans ({method}); speed from FLOPs (not timed)")
        speeds.use_table(geom, candidates, say)
        chosen = _choose(candidates, damages, speeds, target.speedup, measure_speed, meter is not None, say)
        timing = deployment if measure_speed else None
        slower: list[Candidate] = []
        if timing is not None and not chosen.plan.is_empty():
            chosen, slower = _batch1_floor(chosen, candidates, damages, speeds, target.speedup, meter is not None, say)
        aside = frozenset(c.speed_class for c in slower)
        plan = _record(geom, chosen, candidates, damages, speeds, target, timing, selection, meter, aside)
        noisy = noisy_timing_message(plan)
        if noisy:
            say(f"warning: {noisy}")
        if timing is not None and not plan.is_empty():
            plan.measured["batch1"] = (chosen.batch1 or chosen.speed).to_dict()  # type: ignore[union-attr]
            plan.measured["slower_at_batch1"] = [_set_aside(c) for c in slower]
            plan.measured["batch1_within_spread"] = within_floor_spread(chosen.batch1 or chosen.speed, timing.batch1_floor)  # type: ignore[arg-type]
        if shortlist:
            # The probe chooses among these: what the batch-1 floor set aside (or would) stays out.
            pool = [c for c in candidates if c.speed_class not in aside]
            others = _family_bests(chosen, pool, damages, speeds, target.speedup, measure_speed, meter is not None, say)
            if timing is not None and timing.batch1_floor is not None:
                others = [c for c in others if _fast_at_batch1(c, speeds)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                listed = [_record(geom, c, candidates, damages, speeds, target, timing, selection, meter) for c in others]
            plan.measured["shortlist"] = [p.to_dict() for p in listed]
        return plan


def _choose(candidates: list[Candidate], damages: _Damages, speeds: _Speeds, target: float, timed: bool,
            measured: bool, say: Log) -> Candidate:
    """The search, then (when timing) the chosen plan's longer timing and the polish around it."""
    return _settle(_search(candidates, damages, speeds, target, timed, measured, say), candidates, damages, speeds,
                   target, timed, measured, say)


def _settle(chosen: Candidate, candidates: list[Candidate], damages: _Damages, speeds: _Speeds, target: float,
            timed: bool, measured: bool, say: Log) -> Candidate:
    if timed:
        chosen = _confirm(chosen, candidates, damages, speeds, target, measured, say)
    if timed and measured and chosen.search_speedup is not None:
        chosen = _polish(chosen, candidates, damages, speeds, target, say)
    return chosen


def _batch1_floor(chosen: Candidate, candidates: list[Candidate], damages: _Damages, speeds: _Speeds, target: float,
                  measured: bool, say: Log) -> tuple[Candidate, list[Candidate]]:
    """The chosen plan timed at batch 1 too (unless that is the deployment). While it measures
    below the deployment's ``batch1_floor`` there (its upper quartile too: measurably slower), its
    speed class (family, and token merging's schedule kind, which fixes how many blocks pay the
    per-call matching cost) is set aside and the search runs again on the rest; a plan it finds is
    timed at batch 1 before its longer timing and polish, so each class set aside costs a search
    and one batch-1 timing. Returns the plan kept and those set aside; when no other plan meets the
    budget and the floor, the first choice stays and the note says so."""
    d = speeds.deployment
    assert d is not None
    if d.batch_size == 1:
        return chosen, []
    first, slower, excluded = chosen, [], set()
    for _ in range(len({c.speed_class for c in candidates})):  # each turn sets one class aside
        if _fast_at_batch1(chosen, speeds):
            return chosen, slower
        slower.append(chosen)
        excluded.add(chosen.speed_class)
        say(f"at batch 1, {chosen.plan.describe()} measures {chosen.batch1.speedup:.2f}x (upper quartile "  # type: ignore[union-attr]
            f"{chosen.batch1.speedup_q75:.2f}x), below {d.batch1_floor:.2f}x: searching the other kinds of plan")  # type: ignore[union-attr]
        pool = [c for c in candidates if c.speed_class not in excluded]
        if not pool:
            break
        found = _search(pool, damages, speeds, target, True, measured, say)
        if found.speed is None or not _candidate_meets(found, found.speed.speedup, target):
            break
        chosen = found if not _fast_at_batch1(found, speeds) else _settle(found, pool, damages, speeds, target, True,
                                                                           measured, say)
    say(f"note: no plan that meets the budget measures {d.batch1_floor:.2f}x at batch 1; keeping "
        f"{first.plan.describe()} ({first.batch1.speedup:.2f}x there: to serve single images, plan with "  # type: ignore[union-attr]
        f"--batch-size 1)")
    return first, [c for c in slower if c is not first]


def _set_aside(c: Candidate) -> dict[str, Any]:
    """What ``plan.json`` records of a plan set aside for its batch-1 speed."""
    single = c.batch1
    assert c.speed is not None and single is not None
    return {"plan": c.plan.describe(), "speedup": c.speed.speedup, "batch1_speedup": single.speedup,
            "batch1_speedup_q75": single.speedup_q75}


def within_floor_spread(single: SpeedComparison, floor: Optional[float]) -> bool:
    """A batch-1 timing whose median is below ``floor`` but whose upper quartile reaches it: not
    measurably slower, so the plan is kept, and says that a fresh timing (``--retime``) may measure it either side."""
    return floor is not None and single.speedup < floor <= single.speedup_q75


def _fast_at_batch1(c: Candidate, speeds: _Speeds) -> bool:
    """Whether ``c`` is not measurably slower than the deployment's ``batch1_floor`` at batch 1
    (the upper quartile of its timing reaches it; timed once and kept, also without a floor: the
    plan records it)."""
    d = speeds.deployment
    assert d is not None
    c.batch1 = c.batch1 or (c.speed if d.batch_size == 1 else speeds.measure(c.plan, batch_size=1))
    return d.batch1_floor is None or c.batch1.speedup_q75 >= d.batch1_floor  # type: ignore[union-attr]


def _family_bests(
    chosen: Candidate, candidates: list[Candidate], damages: _Damages, speeds: _Speeds, target: float, timed: bool,
    measured: bool, say: Log,
) -> list[Candidate]:
    """The best candidate of every family other than ``chosen``'s that meets the budget, least damaging first."""
    bests = []
    for family in sorted({c.family for c in candidates} - {chosen.family}):
        pool = [c for c in candidates if c.family == family]
        best = _search(pool, damages, speeds, target, timed, measured, say)
        speed = best.speed.speedup if best.speed is not None else speeds.predict(best)
        if _candidate_meets(best, speed, target):
            bests.append(best)
    return sorted(bests, key=lambda c: (damages.best_known(c), c.key))


def _static_order(geom: ModelGeometry, damages: _Damages, scores: Sequence[LayerScore], method: str) -> list[int]:
    """Blocks in the order static attention would be given to them: least damaging first."""
    if "dgssa" not in FAMILIES[method]:
        return []
    if damages.meter is not None:
        return sorted(range(geom.depth), key=lambda i: (damages.part(("static", i), method).kl, i))
    return sorted(range(geom.depth), key=lambda i: (static_damage(scores[i]), i))


def _search(
    candidates: list[Candidate], damages: _Damages, speeds: _Speeds, target: float, timed: bool, measured: bool, say: Log,
) -> Candidate:
    """Measure the candidate that currently looks best until the best is measured both ways."""
    for _ in range(MAX_TIMED + MAX_WHOLE + 1):
        feasible = [c for c in candidates if _candidate_meets(c, speeds.predict(c), target)]
        if not feasible:
            break
        best = min(feasible, key=lambda c: (round(damages.best_known(c), 9), c.flop_speedup, c.key))
        if measured and best.damage is None and len(_measured(candidates)) < MAX_WHOLE:
            damages.whole(best)
            continue
        if timed and best.speed is None:
            if sum(c.speed is not None for c in candidates) >= MAX_TIMED:
                break  # out of timings: only a timed plan may be chosen
            _time(best, speeds, say)
            continue
        return best
    return _fallback(candidates, damages, speeds, target, say)


def _time(c: Candidate, speeds: _Speeds, say: Log) -> SpeedComparison:
    s = speeds.time(c)
    say(f"timed {c.plan.describe()}: {s.speedup:.2f}x measured ({c.flop_speedup:.2f}x in FLOPs)")
    return s


# The speed-up a plan reports comes from a timing this many times longer than a search timing:
# the search only ranks candidates, but the reported figure is what the user compares with
# ``bench``, and 10 rounds of a 0.3 s call spread by about 4% on a busy 2-core machine.
REPORT_TIMING_FACTOR = 4
REPORT_RETRIES = 4  # chosen plans whose longer timing fell short, replaced by the search's next choice


def _retime(c: Candidate, speeds: _Speeds, say: Log) -> None:
    """Time the chosen plan again, longer, for the figure it reports (the search's short timing is
    kept for the record as ``search_speedup``)."""
    assert speeds.deployment is not None and c.speed is not None
    short = c.speed.speedup
    c.speed = speeds.measure(c.plan, seconds=REPORT_TIMING_FACTOR * speeds.deployment.seconds)
    c.search_speedup = short
    say(f"chosen plan timed again, {c.speed.rounds} rounds: {c.speed.speedup:.2f}x (search timing {short:.2f}x)")


# Plans of the chosen one's family this close to it in FLOPs: as fast within what timings of one
# plan differ by between processes (the CIFAR-10 teacher's r=[11, 9, 9, 7, 7, 6, 4, 4, 3, 2, 1, 0]
# measured 2.34x and 2.41x in two runs of `plan`; a 3% neighbourhood then left them at different plans).
NEIGHBOURHOOD = 0.05
# Whole damages whose paired difference is within ``damage.SIGNIFICANT`` standard errors are a tie
# (on the CIFAR-10 teacher's 1.5x plans two neighbouring schedules measured 0.01163 and 0.01169, and
# a timing, not the damage, then decided between them run to run). A fixed 5% margin used to decide
# instead, but on the search's 256 images a plan's KL has a standard error of about 10%: at 2.5x it
# ranked merging in every fourth block (0.0915) level with every third (0.0904), which the
# 5,000-image validation slice puts 11% apart (0.1102 / 0.0993) and the fine-tune 1 point apart.


def _polish(chosen: Candidate, candidates: Sequence[Candidate], damages: _Damages, speeds: _Speeds, target: float,
            say: Log) -> Candidate:
    """Measure the damage of every plan of ``chosen``'s family within ``NEIGHBOURHOOD`` of it in
    FLOPs and move to the least damaging one, or, when none is measurably less damaging (paired,
    ``_Damages.compare``), to the fastest in FLOPs of those as damaging within measurement, if its
    long timing meets the budget too (repeated from there). The search measures only the plans its
    timings lead it to, and a few percent of timing noise in the first timings moves which ones
    those are; from either of two such stopping points this ends at the same plan unless a timing
    decides (a near-tie, which the plan records).

    Ties are taken against the last plan moved to for being less damaging (the ``anchor``: the
    search's own plan at first), within its neighbourhood: each tie is within measurement, but a
    chain of them is not. On the CIFAR-10 teacher at 2.5x, six ties, each up to 5% faster in FLOPs
    than the one before (and two less damaging moves), walked from a 3.0x-FLOP plan timed 2.62x to a
    3.6x one timed 3.01x."""
    tried, anchor = {id(chosen)}, chosen

    def around(c: Candidate) -> list[Candidate]:
        return [n for n in candidates if n.family == c.family and id(n) not in tried
                and c.flop_speedup / (1 + NEIGHBOURHOOD) <= n.flop_speedup <= c.flop_speedup * (1 + NEIGHBOURHOOD)]

    for _ in range(MAX_TIMED):
        near = around(chosen)
        saved = {id(c): damages.compare(chosen, c) for c in near}  # > 0: c damages less
        better = [c for c in near if saved[id(c)].b_less_damaging]
        tied = [c for c in around(anchor) if c.flop_speedup > chosen.flop_speedup
                and not damages.compare(anchor, c).decided and not damages.compare(chosen, c).decided]
        if better:
            best = max(better, key=lambda c: (round(saved[id(c)].kl, 9), c.key))
            d = saved[id(best)]
            why = f"less damaging (KL {d.kl:.4f} less, standard error {d.se:.4f}, on {d.images} images)"
        elif tied:
            best, why = max(tied, key=lambda c: (c.flop_speedup, c.key)), "as damaging within measurement and faster in FLOPs"
        else:
            return chosen
        tried.add(id(best))
        if best.speed is None:
            _time(best, speeds, say)
        if best.search_speedup is None:
            if not _candidate_meets(best, best.speed.speedup, target):  # type: ignore[union-attr]
                continue  # its search timing already falls short (beyond the tolerance): no long timing
            _retime(best, speeds, say)
        if _candidate_meets(best, best.speed.speedup, target):  # type: ignore[union-attr]
            say(f"{why}, and meets the budget: {best.plan.describe()}")
            anchor = best if better else anchor
            chosen = best
    return chosen


def _confirm(chosen: Candidate, candidates: list[Candidate], damages: _Damages, speeds: _Speeds, target: float,
             measured: bool, say: Log) -> Candidate:
    """Time the chosen plan again, longer; while that falls short of the budget, search again, now
    asking a search timing to reach the budget itself rather than come within the tolerance (the
    plans just inside it are the ones that fall short when timed long; on a busy machine the
    search otherwise kept choosing them). After ``REPORT_RETRIES``, or at once when the budget is
    out of reach of every plan (``_out_of_reach``: each search would time a slower plan), the
    last choice stands with its long timing, and the plan says whether it meets the budget."""
    for attempt in range(REPORT_RETRIES + 1):
        if chosen.speed is None:
            return chosen  # the fallback's untimed fastest plan: nothing to confirm
        if chosen.search_speedup is None:
            _retime(chosen, speeds, say)
        if _candidate_meets(chosen, chosen.speed.speedup, target) or attempt == REPORT_RETRIES:
            return chosen
        stricter = target / (1 - MEASURED_TOLERANCE)
        if _out_of_reach(candidates, speeds, stricter):
            return chosen  # a search would only time slower plans
        say("the longer timing falls short of the budget: searching again with it")
        chosen = _search(candidates, damages, speeds, stricter, True, measured, say)
    return chosen


def _out_of_reach(candidates: Sequence[Candidate], speeds: _Speeds, target: float) -> bool:
    """Whether no candidate would reach ``target`` even at the best measured/FLOP ratio of any
    timing so far (optimistic on purpose: one short timing must not rule out a search)."""
    ratio = max(t.speed.speedup / t.base_speedup for t in speeds.timed)  # type: ignore[union-attr]
    return max(c.base_speedup for c in candidates) * ratio < target


def _measured(candidates: Sequence[Candidate]) -> list[Candidate]:
    return [c for c in candidates if c.damage is not None]


# Out of search timings with nothing timed meeting the budget: the least damaging plans predicted
# to clear it by this margin are timed, up to this many, before the fastest plan is taken. Without
# them, a 2.5x `plan` of the CIFAR-10 teacher none of whose twelve timings reached it (the closest
# 2.31-2.41x) took the fastest plan, 6.8x in FLOPs with KL 1.24 (31% agreement) where a 2.6x one was at hand.
FALLBACK_TIMINGS = 4
FALLBACK_MARGIN = 1.1


def _fallback(candidates: list[Candidate], damages: _Damages, speeds: _Speeds, target: float, say: Log) -> Candidate:
    """Out of measurements or nothing meets the budget: the least damaging timed plan that meets
    it (after timing up to ``FALLBACK_TIMINGS`` of the least damaging plans predicted to clear it),
    else the fastest plan. When timing, the plan predicted fastest is timed too, so that the
    plan returned (and the speed-up it reports) is a measured one."""
    pool_ids = {id(c) for c in candidates}

    def timed() -> list[Candidate]:  # a family searched alone: its own timings only
        return [c for c in speeds.timed if id(c) in pool_ids]

    def met() -> list[Candidate]:
        return [c for c in timed() if _candidate_meets(c, c.speed.speedup, target)]  # type: ignore[union-attr]

    for _ in range(FALLBACK_TIMINGS if speeds.deployment is not None else 0):
        if met():
            break
        hopeful = [c for c in candidates if c.speed is None and speeds.predict(c) >= target * FALLBACK_MARGIN]
        if not hopeful:
            break
        _time(min(hopeful, key=lambda c: (damages.best_known(c), c.key)), speeds, say)
    if not met() and speeds.deployment is not None:
        fastest = max(candidates, key=lambda c: (speeds.predict(c), -damages.best_known(c), c.key))
        if fastest.speed is None:
            _time(fastest, speeds, say)
    if met():
        return min(met(), key=lambda c: (damages.best_known(c), c.key))
    pool = timed() or candidates
    return max(pool, key=lambda c: (speeds.predict(c), -damages.best_known(c)))


def _meets(speedup: float, target: float, measured: bool, strict: bool = False) -> bool:
    """A search timing within the tolerance counts (short timings are noisy); the longer timing a
    chosen plan reports (``strict``) must reach the budget itself: what the user asked for."""
    tolerance = MEASURED_TOLERANCE if measured and not strict else 1e-9
    return speedup >= target * (1 - tolerance)


def _candidate_meets(c: Candidate, speedup: float, target: float) -> bool:
    """``_meets`` for ``c``'s kind of figure: predicted, a search timing, or the longer one it reports."""
    return _meets(speedup, target, c.speed is not None, strict=c.search_speedup is not None)


def _record(
    geom: ModelGeometry, c: Candidate, candidates: Sequence[Candidate], damages: _Damages, speeds: _Speeds,
    target: Budget, deployment: Optional[Deployment], selection: str, meter: Optional[DamageMeter],
    aside: frozenset = frozenset(),
) -> Plan:
    """``c`` as a ``Plan`` with what was predicted and measured; ``aside``: the speed classes the
    batch-1 floor set aside (``_near_ties``)."""
    plan = c.plan
    plan.budget = target.text
    if meter is not None and c.damage is None:  # out of whole measurements: measure the one kept
        damages.whole(c)
    layout = plan_layout(geom, plan)
    plan.predicted = {
        "base_flops": base_flops(geom), "flops": plan_flops(geom, plan), "flop_speedup": c.flop_speedup,
        "base_params": geom.params, "params": plan_params(geom, plan),
        "tokens_per_block": [n for _, n, _ in layout.blocks], "block_kinds": [k for k, _, _ in layout.blocks],
        "merge_r": plan.merges(),
        "block_flops": [2 * g.macs(n, static=k == "static", merge=m, num_prefix_tokens=geom.num_prefix_tokens,
                                   metric=layout.tome_metric)
                        for g, (k, n, m) in zip(geom.blocks, layout.blocks)],
        "speedup": speeds.predict(c) if c.speed is None else _prediction_before(c, speeds),
        "table_speedup": c.table_speedup,
        "speedup_source": _speedup_source(speeds, deployment),
        "damage_estimate": damages.estimate(c),
        "damage_source": "measured parts (KL on calibration images)" if meter is not None else f"proxy: {selection}",
        "candidates": len(candidates), "target_speedup": target.speedup, "selection": selection,
    }
    met_speed = c.speed.speedup if c.speed is not None else plan.predicted["speedup"]
    plan.measured = {
        "budget_met": _candidate_meets(c, met_speed, target.speedup),
        "speedup": c.speed.speedup if c.speed else None,
        "speed": c.speed.to_dict() if c.speed else None,
        "search_speedup": c.search_speedup,
        "deployment": deployment.to_dict() if deployment is not None else None,
        "damage": c.damage.to_dict() if c.damage else None,
        "part_damage": [{"change": _part_text(p), "kl": damages.parts[p].kl} for p in c.parts if p in damages.parts],
        "timings": _cache_record(speeds.cache),
        "timed": [{"plan": t.plan.describe(), "family": t.family, "flop_speedup": t.flop_speedup,
                   "table_speedup": t.table_speedup, "speedup": t.speed.speedup, "kl": t.damage.kl if t.damage else None} for t in speeds.timed],  # type: ignore[union-attr]
    }
    ties = _near_ties(c, speeds, damages, target.speedup, aside)
    plan.measured["near_ties"] = [{"plan": t.plan.describe(), "speedup": t.speed.speedup, "speedup_q75": t.speed.speedup_q75,  # type: ignore[union-attr]
                                   "kl": t.damage.kl, "kl_less": d.kl, "kl_less_se": d.se, "images": d.images}  # type: ignore[union-attr]
                                  for t, d in ties]
    plan.measured["near_tie"] = bool(ties) or bool(c.speed is not None and c.speed.speedup_q25 < target.speedup)
    plan.measured["timing_spread"] = timing_spread(c.speed) if c.speed is not None else None
    if not plan.measured["budget_met"]:
        warnings.warn(unreachable_message(plan), stacklevel=3)
    return plan


def _cache_record(cache: Optional[TimingCache]) -> Optional[dict[str, Any]]:
    """How many timings came from the machine's timing cache and how many were measured into it."""
    if cache is None:
        return None
    return {"reused": cache.hits, "measured": cache.misses, "stored": cache.stored, "reuse": cache.reuse,
            "cache": str(cache.path)}


def _speedup_source(speeds: _Speeds, deployment: Optional[Deployment]) -> str:
    if deployment is None:
        return "flops (not timed)"
    return f"{'latency table' if speeds.table is not None else 'flops'} corrected by timed candidates"


# Quartile spread of the chosen plan's long timing, as a fraction of its median, above which the
# machine was busy: quiet, the CIFAR-10 teacher's 2x plan spread 5% (1.97-2.07x on 2.02x); with three
# processes on 2 cores a 2.5x plan spread 66% (3.38-6.50x) and the search chose a 6.8x-FLOP plan.
NOISY_SPREAD = 0.2


def timing_spread(speed: SpeedComparison) -> float:
    """(upper - lower quartile) / median of a timing's speed-up."""
    return (speed.speedup_q75 - speed.speedup_q25) / speed.speedup


def noisy_timing_message(plan: Plan) -> Optional[str]:
    """A warning when the chosen plan's timing spread says the machine was busy, else None."""
    spread = plan.measured.get("timing_spread")
    if spread is None or spread <= NOISY_SPREAD:
        return None
    return (f"the timings spread by {100 * spread:.0f}% (quartiles of the chosen plan's speed-up): the machine "
            f"was busy, so the search may have chosen on noise; plan again when nothing else runs")


def _near_ties(c: Candidate, speeds: _Speeds, damages: _Damages, target: float,
               aside: frozenset = frozenset()) -> list[tuple[Candidate, Difference]]:
    """Timed plans measurably less damaging than ``c`` (the paired comparison the polish decides
    on) that fell short of the budget by less than their own timing's spread: a timing, not the
    damage, decided against them (another run may not); each with how much less damaging it is.
    Plans of a speed class in ``aside`` (set aside as measurably slower at batch 1) are none: a
    rerun that timed them faster would set them aside too."""
    if c.damage is None:
        return []
    short = [t for t in speeds.timed if t is not c and t.damage is not None and t.damage.kl < c.damage.kl
             and t.speed_class not in aside
             and not _candidate_meets(t, t.speed.speedup, target) and t.speed.speedup_q75 >= target]  # type: ignore[union-attr]
    paired = [(t, damages.compare(c, t)) for t in short]
    return [(t, d) for t, d in paired if d.b_less_damaging]


def _prediction_before(c: Candidate, speeds: _Speeds) -> float:
    """What the planner predicted for ``c`` from the candidates timed before it."""
    return _corrected(c, speeds.timed[: next(i for i, t in enumerate(speeds.timed) if t is c)])


def _corrected(c: Candidate, timed: Sequence[Candidate]) -> float:
    """``c``'s table (else FLOP) speed-up, ``Candidate.base_speedup``, times the measured/base
    ratio of the nearest timed candidate of its speed class (``Candidate.speed_class``). A class
    not timed yet keeps its base speed-up unless another class's ratio is higher: another class's
    (often lower) ratio would rule its plans out before any of them is timed."""
    def ratio(pool: Sequence[Candidate]) -> float:
        nearest = min(pool, key=lambda t: (abs(t.base_speedup - c.base_speedup), t.key))
        return nearest.speed.speedup / nearest.base_speedup  # type: ignore[union-attr]

    same = [t for t in timed if t.speed_class == c.speed_class]
    if same:
        return c.base_speedup * ratio(same)
    return c.base_speedup * max(1.0, ratio(timed)) if timed else c.base_speedup


def _part_text(part: Part) -> str:
    if part[0] == "static":
        return f"static attention in block {part[1]}"
    if part[0] == "glad":
        return f"GLAD {list(part[2])} before block {part[1]}"
    return "whole plan"


def tome_plan(model: nn.Module, r: int, kind: str = "constant") -> Plan:
    """The token-merging plan that merges ``r`` tokens per block (``kind``: one of ``SCHEDULE_KINDS``)."""
    from vitcompress.modules.tome import r_schedule

    check_supported(model)
    geom = model_geometry(model)
    merges = r_schedule(geom.depth, int(r), geom.num_tokens, geom.num_prefix_tokens, kind=kind)
    return _plan(geom, "tome", merges=merges)


def plan_speedup(plan: Plan) -> float:
    """The speed-up a plan is judged on: measured when it was timed, else predicted."""
    measured = plan.measured.get("speedup")
    return float(measured if measured is not None else plan.predicted.get("speedup", 0.0))


def budget_met(plan: Plan) -> bool:
    return bool(plan.measured.get("budget_met", plan.predicted.get("budget_met", True)))


def unreachable_message(plan: Plan) -> str:
    """The one line saying a plan does not meet its budget."""
    return (f"budget {plan.budget} not reachable: best plan reaches {plan_speedup(plan):.2f}x "
            f"(target {plan.predicted.get('target_speedup', 0):.2f}x)")


__all__ = [
    "BUDGET_FORMS", "Budget", "Candidate", "DEFAULT_CALIBRATION_IMAGES", "DEFAULT_METHOD", "Deployment", "METHODS", "PLAN_VERSION", "Plan",
    "Reduction", "budget_met", "load_plan", "make_plan", "parse_budget", "plan_damage", "plan_speedup", "save_plan",
    "scale_menu", "tome_plan", "unreachable_message",
]  # fmt: skip
