"""A compression plan: which blocks get static attention, where tokens are aggregated.

A plan is plain data (JSON). It is stored in the exported checkpoint's metadata so that
`vitcompress.load(path)` can rebuild the compressed model with no network.
Block indices always refer to the original model's `blocks[i]`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vitcompress.errors import VitcompressError

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
