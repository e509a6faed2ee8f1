"""Plans and budgets as plain data: parsing budgets, token counts, descriptions, JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitcompress.errors import VitcompressError
from vitcompress.plan_types import (
    PLAN_METHOD,
    METHODS,
    PLAN_VERSION,
    Budget,
    Plan,
    Reduction,
    load_plan,
    parse_budget,
    save_plan,
)


# ---- budgets -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [("2x", 2.0), ("1.5X", 1.5), (" 2.5 x ", 2.5), ("50%", 2.0), ("80%", 1.25), (".5%", 200.0), ("1e1x", 10.0), (3, 3.0), (1.5, 1.5)],
)
def test_parse_budget_accepts_speedups_and_cost_shares(text, expected: float) -> None:
    assert parse_budget(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "fast", "2", "x2", "2xx", "1x", "0.5x", "100%", "0%", "150%", "-2x", "nanx", "infx", True, None, 1, 0.9])
def test_parse_budget_refuses_the_rest_saying_what_works(text) -> None:
    with pytest.raises(VitcompressError, match=r"2x|1x|%"):
        parse_budget(text)


def test_budget_keeps_the_users_text() -> None:
    assert Budget.parse(" 50% ") == Budget(2.0, "50%")
    assert Budget.parse(2) == Budget(2.0, "2x") and Budget.parse(2.5).text == "2.5x"
    budget = Budget.parse("1.5x")
    assert Budget.parse(budget) is budget


# ---- token counts and descriptions -------------------------------------------------------
def _grid_plan(**kwargs) -> Plan:
    return Plan(num_blocks=4, num_prefix_tokens=1, grid=(4, 4), **kwargs)


def test_tokens_per_block_follows_reductions_and_merges() -> None:
    assert _grid_plan().tokens_per_block() == [17, 17, 17, 17]
    assert _grid_plan(reductions=[Reduction(2, [2, 1])]).tokens_per_block() == [17, 17, 6, 6]
    assert _grid_plan(reductions=[Reduction(1, [3, 1]), Reduction(3, [2])]).tokens_per_block() == [17, 11, 11, 5]
    # A block's attention runs on its tokens; its merge shrinks what the next block gets.
    merging = _grid_plan(merge_r=[3, 2, 0, 1])
    assert merging.tokens_per_block() == [17, 14, 12, 12]
    assert merging.merges() == [3, 2, 0, 1]
    assert _grid_plan(merge_r=[2, 2]).merges() == [2, 2, 0, 0]  # short lists: no merge in the rest
    assert _grid_plan().merges() == [0, 0, 0, 0]
    two_prefix = Plan(num_blocks=3, num_prefix_tokens=2, grid=(2, 3), merge_r=[2, 1, 0])
    assert two_prefix.tokens_per_block() == [8, 6, 5]


def test_is_empty_and_block_kinds() -> None:
    assert _grid_plan().is_empty() and _grid_plan(merge_r=[0, 0, 0, 0]).is_empty()
    assert not _grid_plan(merge_r=[0, 1, 0, 0]).is_empty()
    assert not _grid_plan(static_layers=[0]).is_empty() and not _grid_plan(reductions=[Reduction(1, [2])]).is_empty()
    assert _grid_plan(static_layers=[0, 2]).block_kinds() == ["static", "dynamic", "static", "dynamic"]


def test_describe_says_what_the_plan_changes() -> None:
    assert _grid_plan().describe() == "no change"
    assert _grid_plan(static_layers=[0, 1]).describe() == "static attention in blocks [0, 1]"
    assert _grid_plan(reductions=[Reduction(2, [2, 1])]).describe() == "token aggregation before block 2 [2, 1]"
    both = _grid_plan(static_layers=[0], reductions=[Reduction(1, [3, 1]), Reduction(3, [1])])
    assert both.describe() == "static attention in blocks [0]; token aggregation before block 1 [3, 1], before block 3 [1]"
    assert _grid_plan(merge_r=[2, 1]).describe() == "token merging r=[2, 1, 0, 0]"
    assert _grid_plan(static_layers=[0], merge_r=[0, 2, 2, 2]).describe() == "static attention in blocks [0]; token merging r=[0, 2, 2, 2]"


# ---- JSON --------------------------------------------------------------------------------
def _full_plan() -> Plan:
    return Plan(
        static_layers=[0, 1], reductions=[Reduction(2, [3, 1])], num_blocks=4, num_prefix_tokens=1, grid=(4, 4),
        budget="2x", method="auto", predicted={"flops": 123, "speedup": 2.1, "tokens_per_block": [17, 17, 11, 11]},
        measured={"budget_met": True, "speedup": 2.05, "damage": {"kl": 0.01, "agreement": 0.97, "images": 32}},
    )


@pytest.mark.parametrize("plan", [_full_plan(), _grid_plan(merge_r=[3, 2, 1, 0], method="tome", budget="50%"), _grid_plan()])
def test_plan_round_trips_through_json(plan: Plan, tmp_path: Path) -> None:
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan
    assert load_plan(tmp_path) == plan  # a folder holding plan.json
    assert save_plan(plan, tmp_path) == path
    data = json.loads(path.read_text())
    assert data["version"] == PLAN_VERSION and data["merge_r"] == plan.merge_r and data["method"] == plan.method
    assert data["grid"] == list(plan.grid) and data["measured"] == plan.measured
    assert Plan.from_dict(plan.to_dict()) == plan
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no temporary file left


def test_a_version_1_plan_reads_as_before(tmp_path: Path) -> None:
    v1 = {
        "static_layers": [0, 1], "reductions": [{"before_block": 3, "scales": [4, 2, 1]}], "num_blocks": 6,
        "num_prefix_tokens": 1, "grid": [8, 8], "budget": "2x",
        "predicted": {"speedup": 2.2, "budget_met": True, "calibrated": False}, "version": 1,
    }
    (tmp_path / "plan.json").write_text(json.dumps(v1))
    plan = load_plan(tmp_path)
    assert plan.static_layers == [0, 1] and plan.reductions == [Reduction(3, [4, 2, 1])] and plan.grid == (8, 8)
    assert plan.merge_r == [] and plan.merges() == [0] * 6 and plan.method == PLAN_METHOD
    assert plan.measured == {} and plan.predicted["speedup"] == 2.2 and plan.version == PLAN_VERSION
    assert plan.tokens_per_block() == [65, 65, 65, 22, 22, 22]
    minimal = Plan.from_dict({"static_layers": [2]})  # the oldest plans hold little more
    assert minimal.version == PLAN_VERSION and minimal.grid == (14, 14) and minimal.merge_r == []


def test_a_version_2_merging_plan_keeps_merging_on_the_keys() -> None:
    v2 = {"static_layers": [], "num_blocks": 4, "grid": [8, 8], "merge_r": [4, 0, 4, 0], "method": "tome", "version": 2}
    assert Plan.from_dict(v2).tome_metric == "keys"  # what it (and a model exported with it) was made with
    assert Plan.from_dict(v2).describe() == "token merging r=[4, 0, 4, 0] on the keys"  # said where it differs
    assert Plan.from_dict({**v2, "version": PLAN_VERSION}).describe() == "token merging r=[4, 0, 4, 0]"
    assert Plan().tome_metric == "tokens" and Plan.from_dict(Plan(merge_r=[4]).to_dict()).tome_metric == "tokens"
    assert Plan.from_dict({**v2, "version": PLAN_VERSION}).tome_metric == "tokens"  # a version-3 plan: the default
    with pytest.raises(VitcompressError, match="plan tome_metric 'values' is not one of tokens, keys"):
        Plan.from_dict({**v2, "tome_metric": "values"})


def test_newer_or_foreign_plans_are_refused() -> None:
    with pytest.raises(VitcompressError, match="newer than this vitcompress"):
        Plan.from_dict({"static_layers": [], "version": PLAN_VERSION + 1})
    with pytest.raises(VitcompressError, match="plan method 'magic'"):
        Plan.from_dict({"static_layers": [], "method": "magic"})
    for method in METHODS:
        assert Plan.from_dict({"static_layers": [], "method": method}).method == method


def test_load_plan_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(VitcompressError, match="no plan at"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VitcompressError, match="not valid JSON"):
        load_plan(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"layers": []}')
    with pytest.raises(VitcompressError, match="not a vitcompress plan"):
        load_plan(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text('{"static_layers": [], "reductions": [{"scales": [2, 1]}]}')
    with pytest.raises(VitcompressError, match="not a readable plan"):
        load_plan(tmp_path / "broken.json")
    (tmp_path / "merges.json").write_text('{"static_layers": [], "merge_r": ["many"]}')
    with pytest.raises(VitcompressError, match="not a readable plan"):
        load_plan(tmp_path / "merges.json")
