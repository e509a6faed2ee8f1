"""A compression plan and a speed budget, as plain data (JSON).

A plan says, in the original model's block numbering, which blocks get static attention (DGSSA),
where token aggregation stages (GLAD) run, and how many tokens each block merges (token merging,
ToMe). It is stored in the exported checkpoint's metadata so that ``vitcompress.load(path)`` can
rebuild the compressed model with no network. ``predicted`` and ``measured`` record what the
planner expected and what it timed and measured; they are informative only.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from vitcompress._io import read_json, write_json_atomic
from vitcompress.errors import VitcompressError
from vitcompress.names import PLAN_JSON

# Token-merging schedule kinds (``modules.tome.merge_schedule``); "every-k": merge only in every k-th
# block (from block 0), as evenly as integers allow: fewer blocks pay the matching's fixed per-call
# cost (what dominates at batch 1). Here, in the leaf, so that the planner, which imports the module
# (and timm) only lazily, and the module share one tuple.
SCHEDULE_KINDS = ("constant", "decreasing", "every-2", "every-3", "every-4", "every-6")
# What token merging matches tokens on: "tokens", the tokens themselves where they are merged (after
# the block's attention); "keys", the attention keys averaged over heads (the ToMe paper's choice,
# and vitcompress's before plan version 3). On the CIFAR-10 teacher the tokens damage 25-34% less
# at the same schedule, and 0.2-1.0 points more validation top-1 survive the fine-tune (docs/RESULTS.md).
TOME_METRICS = ("tokens", "keys")
DEFAULT_TOME_METRIC = "tokens"

# 2: ``method``, ``merge_r`` (token merging) and ``measured`` added; version-1 plans read as before.
# 3: ``tome_metric`` added; earlier plans (and the models exported with them) merge on the keys.
PLAN_VERSION = 3
METHODS = ("dgssa-glad", "dgssa", "glad", "tome", "auto")
# What the planner searches unless told: every method, keeping what measures best (on the shared
# CIFAR-10 teacher token merging wins at batch 32 and GLAD at batch 1: docs/RESULTS.md).
DEFAULT_METHOD = "auto"
# Training images the planner measures damage on (plan/compress --calibration-images). Its search
# ranks candidates on the first SEARCH_IMAGES (``damage.DamageMeter``'s ``search_images``); deciding
# between neighbouring plans takes all of them where those do not (a plan's KL has a standard error
# of about 10% on 256 images of the CIFAR-10 teacher, 3.6% on 2,048).
DEFAULT_CALIBRATION_IMAGES = 2048
SEARCH_IMAGES = 256
# The method a plan without one was made by (version-1 plans, plans written by hand).
PLAN_METHOD = "dgssa-glad"


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
    # Tokens merged inside each block (after its attention), one entry per block; empty: none.
    merge_r: list[int] = field(default_factory=list)
    tome_metric: str = DEFAULT_TOME_METRIC  # what the merging matches on (TOME_METRICS)
    method: str = PLAN_METHOD
    # GLAD options: attention after a stage weighs each token by the patches it stands for
    # (log size added to the logits), and stages start from the mean attention instead of pooling.
    proportional_attention: bool = False
    glad_init: str = "pool"
    # How each stage's aggregation is parametrised: linear (free matrix), simplex or adaptive
    # (content-adaptive), see ``modules.glad``.
    glad_mode: str = "linear"
    predicted: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def block_kinds(self) -> list[str]:
        """'static' or 'dynamic' for each block."""
        static = set(self.static_layers)
        return ["static" if i in static else "dynamic" for i in range(self.num_blocks)]

    def merges(self) -> list[int]:
        """Tokens merged in each block (0 where none)."""
        return [int(r) for r in self.merge_r] + [0] * (self.num_blocks - len(self.merge_r))

    def tokens_per_block(self) -> list[int]:
        """Token count (prefix included) each block's attention runs on under this plan."""
        patch_tokens = self.grid[0] * self.grid[1]
        stages = {r.before_block: r.keep_tokens for r in self.reductions}
        tokens = []
        for i, merged in enumerate(self.merges()):
            patch_tokens = stages.get(i, patch_tokens)
            tokens.append(self.num_prefix_tokens + patch_tokens)
            patch_tokens -= merged
        return tokens

    def is_empty(self) -> bool:
        return not self.static_layers and not self.reductions and not any(self.merges())

    def describe(self) -> str:
        """One line: what the plan changes."""
        parts = []
        if self.static_layers:
            parts.append(f"static attention in blocks {self.static_layers}")
        if self.reductions:
            parts.append("token aggregation " + ", ".join(f"before block {r.before_block} {r.scales}" for r in self.reductions))
        if any(self.merges()):  # the paper's metric named: the same r merges other tokens on the keys
            parts.append(f"token merging r={self.merges()}" + (" on the keys" if self.tome_metric == "keys" else ""))
        return "; ".join(parts) or "no change"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict) or "static_layers" not in d:
            raise VitcompressError("not a vitcompress plan: expected a JSON object with 'static_layers'")
        version = int(d.get("version", 1))
        if version > PLAN_VERSION:
            raise VitcompressError(
                f"plan format version {d['version']} is newer than this vitcompress understands "
                f"({PLAN_VERSION}): upgrade vitcompress"
            )
        method = str(d.get("method", PLAN_METHOD))
        if method not in METHODS:
            raise VitcompressError(f"plan method {method!r} is not one of {', '.join(METHODS)}")
        return _consistent(cls(
            static_layers=[int(i) for i in d.get("static_layers", [])],
            reductions=[Reduction(int(r["before_block"]), [int(s) for s in r["scales"]]) for r in d.get("reductions", [])],
            num_blocks=int(d.get("num_blocks", 0)),
            num_prefix_tokens=int(d.get("num_prefix_tokens", 1)),
            grid=tuple(int(g) for g in d.get("grid", (14, 14))),  # type: ignore[arg-type]
            budget=d.get("budget"),
            merge_r=[int(r) for r in d.get("merge_r", [])],
            # A plan from before version 3 (and the model exported with it) merged on the keys.
            tome_metric=_choice("tome_metric", d.get("tome_metric", DEFAULT_TOME_METRIC if version >= 3 else "keys"), TOME_METRICS),
            method=method,
            proportional_attention=bool(d.get("proportional_attention", False)),
            glad_init=_choice("glad_init", d.get("glad_init", "pool"), GLAD_INITS),
            glad_mode=_choice("glad_mode", d.get("glad_mode", "linear"), GLAD_MODES),
            predicted=dict(d.get("predicted", {})),
            measured=dict(d.get("measured", {})),
            version=PLAN_VERSION,
        ))


_REMAKE = "make the plan again with `vitcompress plan`"


def _consistent(plan: Plan) -> Plan:
    """Refuse a plan that contradicts itself (checked against a model later, by convert)."""
    depth = plan.num_blocks
    if depth < 0 or plan.num_prefix_tokens < 0 or len(plan.grid) != 2 or any(g < 1 for g in plan.grid):
        raise VitcompressError(f"plan: num_blocks {depth}, num_prefix_tokens {plan.num_prefix_tokens} and grid "
                               f"{list(plan.grid)} do not describe a ViT: {_REMAKE}")
    blocks = [("static_layers", i) for i in plan.static_layers] + [("reduction before_block", r.before_block) for r in plan.reductions]
    for what, i in blocks:
        if i < 0 or 0 < depth <= i:
            raise VitcompressError(f"plan {what} {i} names a block the model does not have (the plan's model has "
                                   f"{depth} blocks, 0..{depth - 1}): {_REMAKE}")
    for r in plan.reductions:
        if not r.scales or any(s < 1 for s in r.scales):
            raise VitcompressError(f"plan: the GLAD stage before block {r.before_block} has pyramid scales {r.scales}; "
                                   f"it needs at least one scale of 1 or more, e.g. [7, 3, 1]: {_REMAKE}")
    if any(r < 0 for r in plan.merge_r) or 0 < depth < len(plan.merge_r):
        raise VitcompressError(f"plan merge_r {plan.merge_r}: give one count >= 0 per block (at most {depth}): {_REMAKE}")
    return plan


GLAD_INITS = ("pool", "attention")
GLAD_MODES = ("linear", "simplex", "adaptive")  # the same names as modules.glad.MODES (a leaf: no import)


def _choice(what: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise VitcompressError(f"plan {what} {value!r} is not one of {', '.join(allowed)}: {_REMAKE}")
    return str(value)


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


@dataclass(frozen=True)
class Budget:
    """A parsed speed budget: the target ``speedup`` (> 1) and the ``text`` the user gave."""

    speedup: float
    text: str

    @classmethod
    def parse(cls, budget: Union[str, float, int, "Budget"]) -> "Budget":
        """``"2x"`` -> 2.0, ``"1.5X"`` -> 1.5, ``"50%"`` (of the original cost) -> 2.0; a number is
        taken as a speed-up. It must be above 1x."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            value, text = float(budget), f"{budget:g}x"
        elif isinstance(budget, str):
            match = _BUDGET_RE.match(budget)
            if match is None:
                raise VitcompressError(f"budget {budget!r} is not understood: give {BUDGET_FORMS}{_budget_hint(budget)}")
            number, unit = float(match.group(1)), match.group(2)
            if unit == "%" and not 0 < number < 100:
                raise VitcompressError(f"budget {budget!r}: a share of the original cost must be between 0% and 100% (e.g. 50%)")
            value, text = (100.0 / number if unit == "%" else number), budget.strip()
        else:
            raise VitcompressError(f"budget {budget!r} is not understood: give {BUDGET_FORMS}")
        if not math.isfinite(value) or value <= 1.0:
            raise VitcompressError(f"budget {text} is not a speed-up: ask for more than 1x (e.g. 1.5x, 2x or 50%)")
        return cls(value, text)


def _budget_hint(text: str) -> str:
    """What the user probably meant: ``2`` or ``x2`` -> ``2x``; a negative number is no speed-up."""
    number = re.fullmatch(r"\s*[xX]?\s*(-?(?:\d+(?:\.\d*)?|\.\d+))\s*[xX]?\s*", text)
    if number is None:
        return ""
    value = float(number.group(1))
    if value <= 1:
        return " (a speed-up must be more than 1x)"
    return f" (did you mean {number.group(1)}x?)"


def parse_budget(budget: Union[str, float, int, Budget]) -> float:
    """The target speed-up of a budget (see ``Budget.parse``)."""
    return Budget.parse(budget).speedup


__all__ = [
    "DEFAULT_CALIBRATION_IMAGES",
    "SEARCH_IMAGES",
    "BUDGET_FORMS", "Budget", "DEFAULT_METHOD", "GLAD_INITS", "GLAD_MODES", "PLAN_METHOD", "METHODS", "PLAN_VERSION", "Plan", "Reduction", "SCHEDULE_KINDS", "TOME_METRICS", "DEFAULT_TOME_METRIC",
    "load_plan", "parse_budget", "save_plan",
]  # fmt: skip
