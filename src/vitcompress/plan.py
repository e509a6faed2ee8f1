"""A compression plan: which blocks get static attention, where tokens are aggregated.

A plan is plain data (JSON). It is stored in the exported checkpoint's metadata so that
`vitcompress.load(path)` can rebuild the compressed model with no network.
Block indices always refer to the original model's `blocks[i]`.

``make_plan`` is the budget planner; see its docstring for how it searches and chooses.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

from vitcompress._io import read_json, write_json_atomic
from vitcompress.errors import VitcompressError

if TYPE_CHECKING:
    from torch import nn

    from vitcompress.cost import LatencyModel, ModelGeometry

PLAN_VERSION = 1


@dataclass
class Reduction:
    """A GLAD stage inserted before block `before_block`.

    `scales` are the side lengths of the square grids of the aggregation pyramid, largest first:
    `[7, 3, 1]` turns the patch tokens into 49 + 9 + 1 = 59 tokens. Prefix tokens are kept.
    """

    before_block: int
    scales: list[int]

    @property
    def keep_tokens(self) -> int:
        """Patch-token count after this stage (prefix tokens not included)."""
        return sum(s * s for s in self.scales)


@dataclass
class Plan:
    static_layers: list[int] = field(default_factory=list)
    reductions: list[Reduction] = field(default_factory=list)
    num_blocks: int = 0
    num_prefix_tokens: int = 1
    grid: tuple[int, int] = (14, 14)
    budget: str | None = None
    # What the planner predicted (FLOPs, latency, speed-up); filled by the planner, informative only.
    predicted: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def block_kinds(self) -> list[str]:
        """'static' or 'dynamic' for each block."""
        static = set(self.static_layers)
        return ["static" if i in static else "dynamic" for i in range(self.num_blocks)]

    def tokens_per_block(self) -> list[int]:
        """Token count (prefix included) that each block runs on under this plan."""
        patch_tokens = self.grid[0] * self.grid[1]
        stages = {r.before_block: r.keep_tokens for r in self.reductions}
        tokens = []
        for i in range(self.num_blocks):
            patch_tokens = stages.get(i, patch_tokens)
            tokens.append(self.num_prefix_tokens + patch_tokens)
        return tokens

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict) or "static_layers" not in d:
            raise VitcompressError("not a vitcompress plan: expected a JSON object with 'static_layers'")
        if int(d.get("version", 1)) > PLAN_VERSION:
            raise VitcompressError(
                f"plan format version {d['version']} is newer than this vitcompress understands "
                f"({PLAN_VERSION}): upgrade vitcompress"
            )
        return cls(
            static_layers=[int(i) for i in d.get("static_layers", [])],
            reductions=[Reduction(int(r["before_block"]), [int(s) for s in r["scales"]]) for r in d.get("reductions", [])],
            num_blocks=int(d.get("num_blocks", 0)),
            num_prefix_tokens=int(d.get("num_prefix_tokens", 1)),
            grid=tuple(int(g) for g in d.get("grid", (14, 14))),  # type: ignore[arg-type]
            budget=d.get("budget"),
            predicted=dict(d.get("predicted", {})),
            version=int(d.get("version", PLAN_VERSION)),
        )


# ---- files -----------------------------------------------------------------------------------
PLAN_JSON = "plan.json"


def save_plan(plan: Plan, path: Union[str, os.PathLike]) -> Path:
    """Write ``plan`` as JSON, atomically; ``path`` is a file or a folder (then ``plan.json`` in it)."""
    target = Path(path)
    if target.is_dir():
        target = target / PLAN_JSON
    write_json_atomic(target, plan.to_dict())
    return target


def load_plan(path: Union[str, os.PathLike]) -> Plan:
    """Read a plan written by ``save_plan`` (a file, or a folder holding ``plan.json``)."""
    source = Path(path)
    if source.is_dir():
        source = source / PLAN_JSON
    if not source.is_file():
        raise VitcompressError(f"no plan at {source}: make one with `vitcompress plan MODEL --budget 2x`")
    data = read_json(source, "make the plan again with `vitcompress plan`")
    try:
        return Plan.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise VitcompressError(f"{source} is not a readable plan ({type(exc).__name__}: {exc}): make it again with `vitcompress plan`") from None


# ---- budgets ---------------------------------------------------------------------------------
BUDGET_FORMS = "a speed-up such as 2x or 1.5x, or a share of the original cost such as 50%"
_BUDGET_RE = re.compile(r"^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*([xX%])\s*$")


def parse_budget(budget: Union[str, float, int]) -> float:
    """The target speed-up of a budget: ``"2x"`` -> 2.0, ``"1.5X"`` -> 1.5, ``"50%"`` (of the
    original cost) -> 2.0; a number is taken as a speed-up. It must be above 1x."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value, text = float(budget), f"{budget:g}x"
    elif isinstance(budget, str):
        match = _BUDGET_RE.match(budget)
        if match is None:
            raise VitcompressError(f"budget {budget!r} is not understood: give {BUDGET_FORMS}")
        number, unit = float(match.group(1)), match.group(2)
        if unit == "%" and not 0 < number < 100:
            raise VitcompressError(f"budget {budget!r}: a share of the original cost must be between 0% and 100% (e.g. 50%)")
        value, text = (100.0 / number if unit == "%" else number), budget.strip()
    else:
        raise VitcompressError(f"budget {budget!r} is not understood: give {BUDGET_FORMS}")
    if not math.isfinite(value) or value <= 1.0:
        raise VitcompressError(f"budget {text} is not a speed-up: ask for more than 1x (e.g. 1.5x, 2x or 50%)")
    return value


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


# ---- search ----------------------------------------------------------------------------------
CostFn = Callable[[int, str, int], float]  # (block index, kind, tokens) -> cost
GladCostFn = Callable[[tuple[int, ...], tuple[tuple[int, int], ...]], float]


@dataclass(frozen=True)
class _Scored:
    cost: float
    damage: float
    static_count: int
    stages: Stages
    exact: bool = True  # False: the cost uses fitted (untimed) latencies


class _Search:
    """Evaluates every candidate (static-layer count x reduction layout) in O(1) with prefix sums."""

    def __init__(self, geom: "ModelGeometry", scores: Sequence[LayerScore], options: Sequence[Stages]) -> None:
        self.geom, self.scores, self.options = geom, list(scores), list(options)
        depth = geom.depth
        # Static layers are taken in order of least damage (then depth); only blocks before the
        # first reduction qualify, because static attention is initialised on the original tokens.
        self.order = sorted(range(depth), key=lambda i: (static_damage(self.scores[i]), i))
        self.eligible = {limit: [i for i in self.order if i < limit] for limit in range(depth + 1)}
        self._static_damage = {
            limit: _cumsum(static_damage(self.scores[i]) for i in self.eligible[limit]) for limit in range(depth + 1)
        }
        self._reduce_damage: dict[int, list[float]] = {}

    def static_layers(self, count: int, stages: Stages) -> list[int]:
        return sorted(self.eligible[self._limit(stages)][:count])

    def _limit(self, stages: Stages) -> int:
        return stages[0][0] if stages else self.geom.depth

    def _reduce_prefix(self, keep: int) -> list[float]:
        if keep not in self._reduce_damage:
            kept = keep / self.geom.num_patches
            self._reduce_damage[keep] = _cumsum(reduce_damage(s, kept) for s in self.scores)
        return self._reduce_damage[keep]

    def score_all(
        self, block_cost: CostFn, glad_cost: GladCostFn, fixed: float, exact: Callable[[Stages], bool] = lambda _: True
    ) -> list[_Scored]:
        geom, depth, full = self.geom, self.geom.depth, self.geom.num_tokens
        dyn_prefix: dict[int, list[float]] = {}

        def dyn(n: int, lo: int, hi: int) -> float:
            if n not in dyn_prefix:
                dyn_prefix[n] = _cumsum(block_cost(i, "dynamic", n) for i in range(depth))
            return dyn_prefix[n][hi] - dyn_prefix[n][lo]

        savings = {
            limit: _cumsum(block_cost(i, "dynamic", full) - block_cost(i, "static", full) for i in self.eligible[limit])
            for limit in range(depth + 1)
        }
        scored = []
        for stages in self.options:
            limit = self._limit(stages)
            cost, damage = fixed + dyn(full, 0, limit), 0.0
            in_grids: tuple[tuple[int, int], ...] = (geom.grid,)
            for k, (p, scales) in enumerate(stages):
                end = stages[k + 1][0] if k + 1 < len(stages) else depth
                keep = sum(s * s for s in scales)
                cost += glad_cost(scales, in_grids) + dyn(geom.num_prefix_tokens + keep, p, end)
                reduce_prefix = self._reduce_prefix(keep)
                damage += reduce_prefix[end] - reduce_prefix[p]
                in_grids = tuple((s, s) for s in scales)
            is_exact = exact(stages)
            for count in range(len(self.eligible[limit]) + 1):
                if count == 0 and not stages:
                    continue  # the unchanged model is not a plan
                scored.append(_Scored(
                    cost - savings[limit][count], damage + self._static_damage[limit][count], count, stages, is_exact))
        return scored


def _cumsum(values: Iterator[float] | Sequence[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _choose(scored: Sequence[_Scored], base_cost: float, target: float) -> tuple[_Scored, bool]:
    """The least damaging candidate that meets ``target``; ties: the least aggressive (highest
    cost), then fewer static layers, then later reductions. Else the fastest (then least damaging).

    A candidate whose cost rests on fitted latencies must beat the target by ``FIT_MARGIN``: fits
    are a few percent off, and a candidate that only just meets the budget on a fit would, once
    timed, often miss it, sending the calibration from one such candidate to the next.
    """
    def meets(c: _Scored) -> bool:
        return base_cost / c.cost >= target * (1 - 1e-9) * (1.0 if c.exact else 1.0 + FIT_MARGIN)

    feasible = [c for c in scored if meets(c)]
    if feasible:
        best = min(feasible, key=lambda c: (round(c.damage, 9), -c.cost, c.static_count, [-p for p, _ in c.stages]))
        return best, True
    return min(scored, key=lambda c: (c.cost, round(c.damage, 9), c.static_count)), False


# ---- the planner -----------------------------------------------------------------------------
MAX_CALIBRATION_ROUNDS = 6
FIT_MARGIN = 0.05
PROBE_TOKEN_COUNTS = 4
MAX_REPLANS = 2  # re-searches after a verification that falls short of the budget
VERIFY_ROUNDS = 3  # interleaved rounds when timing a converted model against the original


def make_plan(
    model: "nn.Module",
    analysis: Any = None,
    budget: Union[str, float] = "2x",
    calibrate: bool = True,
    batch_size: int = 32,
    device: Optional[str] = None,
    threads: Optional[int] = None,
    *,
    max_stages: int = 2,
    verify: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> Plan:
    """Choose static layers and token reductions so that the predicted speed-up meets ``budget``.

    Candidates: ``s`` static (DGSSA) layers, taken in order of least damage among the blocks
    before the first reduction (with an analysis: highest similarity first, and layers the
    analysis does not recommend for static attention last; without one: depth order), times
    0, 1 or 2 GLAD stages (any block position, pyramid scales from ``scale_menu``). Each candidate's
    cost is predicted by ``vitcompress.cost``: latency on ``device`` with ``threads`` threads at
    ``batch_size`` when ``calibrate`` (parts of the model are timed, a few seconds), else FLOPs.
    Among candidates whose predicted speed-up meets the budget the planner takes the one with the
    least damage (``plan_damage``), then the least aggressive. If none does, it returns the fastest
    candidate with ``predicted["budget_met"] = False`` and a warning. With calibration, the token
    counts the chosen plan uses are then timed exactly and the choice is repeated until it only
    uses timed cases, so its predicted latency comes from measurements, not from the fit.

    Verification (``calibrate`` and ``verify``, the default): the chosen plan is applied
    (``convert``) and the converted model is timed against the original, interleaved, on the same
    device, threads and batch size (``VERIFY_ROUNDS`` rounds, median of the per-round ratios).
    Timing parts in isolation and adding them up can overpredict, most on small models (per-call
    overheads). If the measured speed-up falls short of the budget, the latency model's predicted
    speed-ups are corrected by one factor, measured / predicted of the plan just timed (every
    candidate's predicted speed-up is multiplied by it, i.e. the search runs against
    ``budget / factor``), and the search runs again, at most ``MAX_REPLANS`` times (stopping early
    when it picks a plan already timed). Of the plans timed, the least damaging one whose measured
    speed-up meets the budget is kept, else the one measured fastest.
    ``predicted["speedup"]``, the figure the plan is judged on (``budget_met``), is then the
    measured speed-up (also in ``measured_speedup``, with ``verified: True`` and
    ``speedup_source: "measured"``); ``latency_speedup`` keeps the latency model's own prediction,
    ``speedup_correction`` their ratio and ``verification`` every plan timed. Without
    verification ``speedup`` is the latency prediction (``calibrate``) or the FLOP speed-up, with
    ``verified: False`` and ``measured_speedup: None``.

    ``analysis``: an ``Analysis`` of this model (``vitcompress.analyze``), or None.
    ``plan.predicted`` records FLOPs, parameters, speed-ups, per-block tokens/kinds/costs and how
    the prediction was made.
    """
    from vitcompress.cost import LatencyModel, model_geometry
    from vitcompress.models import check_supported

    check_supported(model)
    target = parse_budget(budget)
    budget_text = budget if isinstance(budget, str) else f"{budget:g}x"
    say = log or (lambda message: None)
    geom = model_geometry(model)
    scores, selection = layer_scores(analysis, geom.depth, geom.num_tokens)
    search = _Search(geom, scores, _stage_options(geom, max_stages))
    lat: Optional[LatencyModel] = None
    if calibrate:
        probes = _probe_token_counts(search.options, geom.num_prefix_tokens)
        say(f"timing the model's parts on {device or _model_device(model)} (batch {batch_size}) to calibrate the cost model")
        lat = LatencyModel.calibrate(
            model, batch_size=batch_size, device=device, threads=threads, token_counts=probes,
            glads=_probe_glads(search.options, geom.grid),
        )
        choice = _calibrated_choice(search, geom, lat, target)
        say(f"calibration took {lat.seconds_spent:.1f} s ({lat.threads} threads)")
    else:
        choice, _ = _choose_with(search, geom, None, target)
    trials: list[dict[str, Any]] = []
    if lat is not None and verify:
        choice, trials = _verify(model, search, geom, lat, target, choice, say)
    plan = _to_plan(search, geom, choice)
    plan.budget = budget_text
    plan.predicted = predict(model, plan, latency=lat, scores=scores, geometry=geom)
    if trials:
        measured = next(t["measured_speedup"] for t in trials if t["chosen"])
        plan.predicted.update({
            "speedup": measured,
            "measured_speedup": measured,
            "verified": True,
            "speedup_source": "measured",
            "speedup_correction": measured / plan.predicted["latency_speedup"],
            "verification": trials,
        })
    else:
        plan.predicted.update({
            "measured_speedup": None,
            "verified": False,
            "speedup_source": "latency" if lat is not None else "flops",
        })
    plan.predicted.update({
        "target_speedup": target,
        "budget_met": _meets(plan.predicted["speedup"], target, measured=bool(trials)),
        "selection": selection,
        "candidates": len(search.options),
        "batch_size": batch_size,
        "device": lat.device if lat else str(device or _model_device(model)),
        "threads": lat.threads if lat else (threads or _torch_threads()),
    })
    if not plan.predicted["budget_met"]:
        warnings.warn(unreachable_message(plan), stacklevel=2)
    return plan


def _calibrated_choice(search: _Search, geom: "ModelGeometry", lat: "LatencyModel", target: float) -> _Scored:
    """Choose with the latency model, timing the choice's own cases until it rests on timed ones."""
    from vitcompress.cost import plan_layout

    for _ in range(MAX_CALIBRATION_ROUNDS):
        choice, _ = _choose_with(search, geom, lat, target)
        if choice.exact:
            return choice
        lat.ensure(plan_layout(geom, _to_plan(search, geom, choice)))  # time its own cases, choose again
    # not settled: choose among the candidates whose every case has been timed
    choice, _ = _choose_with(search, geom, lat, target, timed_only=True)
    return choice


def _latency_speedup(lat: "LatencyModel", geom: "ModelGeometry", plan: Plan) -> float:
    """The latency model's predicted speed-up of ``plan`` (its cases timed first)."""
    from vitcompress.cost import plan_layout

    layout = plan_layout(geom, plan)
    lat.ensure(layout)
    base_s = lat.fixed_s + geom.depth * lat.block_s("dynamic", geom.num_tokens)
    return base_s / lat.layout_s(layout)[0]


# A verified speed-up comes from a short timing with a few percent of noise: a plan that measures
# within this fraction of the budget counts as meeting it, so the verdict does not flip run to run.
MEASURED_TOLERANCE = 0.03


def _meets(speedup: float, target: float, measured: bool) -> bool:
    return speedup >= target * ((1 - MEASURED_TOLERANCE) if measured else (1 - 1e-9))


def _verify(
    model: "nn.Module", search: _Search, geom: "ModelGeometry", lat: "LatencyModel", target: float,
    choice: _Scored, say: Callable[[str], None],
) -> tuple[_Scored, list[dict[str, Any]]]:
    """Time the converted model of ``choice`` against the original; while it falls short of
    ``target``, correct the predicted speed-ups by measured / predicted and search again (at most
    ``MAX_REPLANS`` times). Returns the plan kept (see ``make_plan``) and a record of every plan timed."""
    tried: list[tuple[_Scored, float, float, float]] = []  # (candidate, predicted, measured, correction used)
    correction = 1.0
    for attempt in range(MAX_REPLANS + 1):
        plan = _to_plan(search, geom, choice)
        predicted = _latency_speedup(lat, geom, plan)
        measured, _ = lat.measure_plan(model, plan, rounds=VERIFY_ROUNDS)
        tried.append((choice, predicted, measured, correction))
        say(f"verification: the converted model runs {measured:.2f}x faster than the original "
            f"(latency model predicted {predicted:.2f}x)")
        if _meets(measured, target, measured=True) or attempt == MAX_REPLANS:
            break
        correction = measured / predicted
        say(f"below the {target:.2f}x budget: predicted speed-ups scaled by {correction:.2f}, planning again")
        choice = _calibrated_choice(search, geom, lat, target / correction)
        if any(choice.stages == c.stages and choice.static_count == c.static_count for c, *_ in tried):
            break  # the corrected search picks a plan already timed
    met = [t for t in tried if _meets(t[2], target, measured=True)]
    if met:
        kept = min(met, key=lambda t: (round(t[0].damage, 9), -t[0].cost, t[0].static_count))
    else:
        kept = max(tried, key=lambda t: t[2])
    records = []
    for c, predicted, measured, used in tried:
        p = _to_plan(search, geom, c)
        records.append({
            "static_layers": p.static_layers,
            "reductions": [{"before_block": r.before_block, "scales": r.scales} for r in p.reductions],
            "latency_speedup": predicted,
            "measured_speedup": measured,
            "correction": used,
            "chosen": c is kept[0],
        })
    return kept[0], records


def unreachable_message(plan: Plan) -> str:
    """The one line saying a plan does not meet its budget."""
    p = plan.predicted
    return f"budget {plan.budget} not reachable: best plan reaches {p.get('speedup', 0):.2f}x (target {p.get('target_speedup', 0):.2f}x)"


def _choose_with(
    search: _Search, geom: "ModelGeometry", lat: Optional["LatencyModel"], target: float, timed_only: bool = False
) -> tuple[_Scored, bool]:
    from vitcompress.cost import STATIC, glad_macs_per_channel

    if lat is None:
        def block_cost(i: int, kind: str, n: int) -> float:
            return float(geom.blocks[i].macs(n, static=kind == STATIC))

        def glad_cost(scales: tuple[int, ...], in_grids: tuple[tuple[int, int], ...]) -> float:
            return float(glad_macs_per_channel(scales, in_grids) * geom.embed_dim)

        fixed = float(geom.fixed_macs)
    else:
        memo: dict[tuple[str, int], float] = {}

        def block_cost(i: int, kind: str, n: int) -> float:  # the same for every block of a ViT
            if (kind, n) not in memo:
                memo[(kind, n)] = lat.block_s(kind, n)
            return memo[(kind, n)]

        glad_cost, fixed = lat.glad_s, lat.fixed_s
    base = fixed + sum(block_cost(i, "dynamic", geom.num_tokens) for i in range(geom.depth))
    exact = _timed_check(geom, lat) if lat is not None else (lambda _: True)
    scored = search.score_all(block_cost, glad_cost, fixed, exact)
    if timed_only:
        scored = [c for c in scored if c.exact]
    return _choose(scored, base, target)


def _timed_check(geom: "ModelGeometry", lat: "LatencyModel") -> Callable[[Stages], bool]:
    """Whether every case of a reduction layout has been timed (full-length blocks always are)."""

    def check(stages: Stages) -> bool:
        in_grids: tuple[tuple[int, int], ...] = (geom.grid,)
        for _, scales in stages:
            tokens = geom.num_prefix_tokens + sum(s * s for s in scales)
            if not (lat.timed_block("dynamic", tokens) and lat.timed_glad(scales, in_grids)):
                return False
            in_grids = tuple((s, s) for s in scales)
        return True

    return check


def _to_plan(search: _Search, geom: "ModelGeometry", choice: _Scored) -> Plan:
    return Plan(
        static_layers=search.static_layers(choice.static_count, choice.stages),
        reductions=[Reduction(p, list(scales)) for p, scales in choice.stages],
        num_blocks=geom.depth,
        num_prefix_tokens=geom.num_prefix_tokens,
        grid=geom.grid,
    )


def _probe_token_counts(options: Sequence[Stages], num_prefix: int) -> list[int]:
    """A few token counts spread over those the candidates use, timed to fit latency(N)."""
    counts = sorted({num_prefix + sum(s * s for s in scales) for stages in options for _, scales in stages})
    if len(counts) <= PROBE_TOKEN_COUNTS:
        return counts
    picks = [counts[round(k * (len(counts) - 1) / (PROBE_TOKEN_COUNTS - 1))] for k in range(PROBE_TOKEN_COUNTS)]
    return sorted(set(picks))


def _probe_glads(options: Sequence[Stages], grid: tuple[int, int]) -> list[tuple[tuple[int, ...], tuple[tuple[int, int], ...]]]:
    """The first-stage GLAD with the most work, timed so that untimed stages scale from it."""
    firsts = {stages[0][1] for stages in options if stages}
    if not firsts:
        return []
    return [(max(firsts, key=lambda sc: (sum(s * s for s in sc), sc)), (grid,))]


def _model_device(model: "nn.Module") -> str:
    return str(next(model.parameters()).device)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def predict(
    model: "nn.Module",
    plan: Plan,
    *,
    latency: Optional["LatencyModel"] = None,
    scores: Optional[Sequence[LayerScore]] = None,
    geometry: Optional["ModelGeometry"] = None,
) -> dict[str, Any]:
    """What ``plan`` costs on ``model``: FLOPs and parameters (analytic), latency (if a calibrated
    ``latency`` model is given; the plan's own cases are timed first), per block and in total.

    ``speedup`` is the latency speed-up when calibrated, else the FLOP speed-up.
    """
    from vitcompress.cost import STATIC, base_flops, glad_macs_per_channel, model_geometry, plan_flops, plan_layout, plan_params

    geom = geometry or model_geometry(model)
    layout = plan_layout(geom, plan)
    base, flops = base_flops(geom), plan_flops(geom, plan)
    out: dict[str, Any] = {
        "base_flops": base,
        "flops": flops,
        "flop_speedup": base / flops,
        "base_params": geom.params,
        "params": plan_params(geom, plan),
        "tokens_per_block": [n for _, n in layout.blocks],
        "block_kinds": [kind for kind, _ in layout.blocks],
        "block_flops": [2 * g.macs(n, static=kind == STATIC) for g, (kind, n) in zip(geom.blocks, layout.blocks)],
        "glad_flops": [2 * glad_macs_per_channel(sc, grids) * geom.embed_dim for _, sc, grids in layout.glads],
        "fixed_flops": 2 * geom.fixed_macs,
        "calibrated": latency is not None,
    }
    if scores is not None:
        out["damage"] = plan_damage(plan, scores)
    if latency is None:
        out["speedup"] = out["flop_speedup"]
        out["latency_speedup"] = None
        return out
    latency.ensure(layout)
    total, blocks, glads = latency.layout_s(layout)
    base_s = latency.fixed_s + sum(latency.block_s("dynamic", geom.num_tokens) for _ in range(geom.depth))
    out.update({
        "base_latency_ms": base_s * 1e3,
        "latency_ms": total * 1e3,
        "latency_speedup": base_s / total,
        "speedup": base_s / total,
        "block_ms": [t * 1e3 for t in blocks],
        "glad_ms": [t * 1e3 for t in glads],
        "fixed_ms": latency.fixed_s * 1e3,
        "calibration": latency.to_dict(),
    })
    return out
