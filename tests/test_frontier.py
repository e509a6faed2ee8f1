"""benchmarks/frontier.py --quick end to end, shortened: every row the instrument promises is there."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_quick_frontier_writes_rows_for_every_method_and_mode(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import frontier
    finally:
        sys.path.remove(str(BENCHMARKS))
    report = frontier.main(["--quick", "--steps", "2", "--calibration-images", "16", "--val-images", "64",
                            "--repeats", "1", "--plan-seconds", "0.05", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "frontier.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(report["rows"]))
    methods = {r["method"] for r in rows}
    assert {"auto", "dgssa-glad", "tome"} <= methods
    for method in ("auto", "dgssa-glad", "tome"):
        for steps in (0, 2):
            for batch in (1, 32):
                match = [r for r in rows if r["method"] == method and r["finetune_steps"] == steps
                         and r["batch_size"] == batch and r["variant"] == "mean-init"]
                assert match, (method, steps, batch)
                assert all(r["speedup"] > 0 and 0 <= r["top1"] <= 1 and r["threads"] == 1 for r in match)
    variants = {r["variant"] for r in rows}
    assert {"static-mean-init", "static-uniform-init"} <= variants
    assert (tmp_path / "frontier.png").stat().st_size > 0
    table = (tmp_path / "frontier.md").read_text()
    assert "| 2x | tome |" in table and "| 2x | dgssa-glad |" in table and "| 2x | auto |" in table
    # The baseline is token merging as published: matching on the keys (auto's merging: the tokens).
    tome = [r for r in rows if r["method"] == "tome"]
    assert tome and all(r["plan"]["tome_metric"] == "keys" for r in tome)
    assert all(r["plan"]["tome_metric"] == "tokens" for r in rows if r["method"] == "auto")
    header = (tmp_path / "frontier.csv").read_text().splitlines()[0].split(",")
    assert header == frontier.COLUMNS


def test_plans_finetuned_takes_recipe_changes_typed_as_the_config_fields() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import plans_finetuned

    args = plans_finetuned.parse_args(["--plan", "x={}", "--out", "unused", "--lr", "5e-4", "--set", "ce_weight=0",
                                       "--set", "warmup_steps=0", "--set", "feat_at=last-block", "--set", "amp=false"])
    recipe = plans_finetuned.recipe_overrides(args)
    assert recipe == {"lr": 5e-4, "ce_weight": 0.0, "warmup_steps": 0, "feat_at": "last-block", "amp": False}
    assert [type(recipe[k]) for k in ("ce_weight", "warmup_steps")] == [float, int]
    with pytest.raises(SystemExit, match="FIELD one of"):
        plans_finetuned.recipe_overrides(plans_finetuned.parse_args(["--plan", "x={}", "--out", "u", "--set", "lr"]))
    with pytest.raises(SystemExit, match="true or false"):
        plans_finetuned.recipe_overrides(plans_finetuned.parse_args(["--plan", "x={}", "--out", "u", "--set", "amp=yes please"]))


def test_the_head_to_head_interpolates_ours_at_token_mergings_speeds_and_says_where_it_cannot() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import frontier

    assert frontier.interpolate([(2.0, 0.6), (1.0, 0.8)], 1.5) == pytest.approx(0.7)
    assert frontier.interpolate([(1.0, 0.8), (2.0, 0.6)], 2.5) is None
    plan = lambda r: {"static_layers": [], "merge_r": r, "num_blocks": 2, "grid": [4, 4], "method": "auto"}  # noqa: E731
    row = lambda m, x, s, t, r: {"method": m, "variant": "mean-init", "finetune_steps": 5, "batch_size": 32,  # noqa: E731
                                 "target_speedup": x, "speedup": s, "top1": t, "val_top1": t + 0.01, "plan": plan(r)}
    report = {"settings": {"steps": 5}, "rows": [row("auto", 1.5, 1.0, 0.8, [1, 0]), row("auto", 2, 2.0, 0.6, [2, 0]),
                                                 row("tome", 1.5, 1.5, 0.65, [1, 1]), row("tome", 3, 3.0, 0.5, [3, 0])]}
    table = frontier.head_to_head(report)
    at_tome, at_targets = table.split("Both interpolated at each target")
    assert "| 1.50x | 65.00% / 66.00% | 70.00% / 71.00% | +5.00 / +5.00 pt |" in at_tome
    assert "| 3.00x | 50.00% / 51.00% | not covered | - |" in at_tome
    # at the targets both curves are interpolated: token merging at 2x lies between its 1.5x and 3x points
    assert "| 1.50x | 65.00% / 66.00% | 70.00% / 71.00% | +5.00 / +5.00 pt |" in at_targets
    assert "| 2.00x | 60.00% / 61.00% | 60.00% / 61.00% | +0.00 / +0.00 pt |" in at_targets
    assert "| 3.00x | 50.00% / 51.00% | not covered | - |" in at_targets
