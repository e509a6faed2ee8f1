"""`vitcompress plan` on the demo model (measured damage on its digits) and on a tiny local model."""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf
from typer.testing import CliRunner

from conftest import TINY, tiny_vit
from vitcompress.analyze import Analysis, LayerAnalysis, recommend
from vitcompress.cli import app
from vitcompress.flops import count_flops
from vitcompress.models import load_model
from vitcompress.plan import load_plan

PLAN = importlib.import_module("vitcompress.plan")
runner = CliRunner()
ARGS = {**TINY, "img_size": 64}  # 8x8 grid, 4 blocks
CALIB = ("--calibration-images", "32")


@pytest.fixture(autouse=True)
def _short_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI times each candidate ~1.5 s; a tenth of that is plenty to test what it prints.
    monkeypatch.setattr(PLAN, "Deployment", functools.partial(PLAN.Deployment, seconds=0.05))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    save_for_hf(tiny_vit(**ARGS), folder, model_args=ARGS, safe_serialization=True)
    return folder


def _demo(out: Path, *args: str):
    return runner.invoke(app, ["plan", "--out", str(out), *args])


def _run(model_dir: Path, out: Path, *args: str):
    return runner.invoke(app, ["plan", f"local-dir:{model_dir}", "--out", str(out), *args])


def test_demo_plan_from_flops_with_measured_damage(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--budget", "2x", "--no-calibrate", *CALIB)
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "plan.json")
    assert plan.budget == "2x" and plan.num_blocks == 8 and plan.method == "auto"  # the default method
    p, m = plan.predicted, plan.measured
    assert m["budget_met"] and p["flop_speedup"] >= 2.0 and m["speedup"] is None and m["timed"] == []
    assert p["damage_source"] == "measured parts (KL on calibration images)" and m["damage"]["images"] == 32
    model, _ = load_model("demo")
    assert p["base_flops"] == count_flops(model)
    err = result.stderr
    assert "using the built-in demo model" in err and "calibration images: 32 of demo (split 'train')" in err and "plan written to" in err
    out = result.stdout
    assert "plan for demo: budget 2x (auto)" in out and "FLOPs/image" in out and "params" in out
    assert "predicted from FLOPs (not timed)" in out and "met" in out and "measured on the whole plan" in out
    assert all(column in out for column in ("block", "kind", "tokens", "merge", "damage (KL)"))
    if plan.reductions:
        assert "GLAD" in out


def test_demo_plan_timed(tmp_path: Path) -> None:
    # --allow-below-budget: whether timings of the demo at batch 4 reach 2x is not what is tested here.
    result = _demo(tmp_path, "--budget", "2x", *CALIB, "--batch-size", "4", "--threads", "1", "--allow-below-budget")
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path)
    m = plan.measured
    assert m["speedup"] > 0 and m["deployment"] == {"device": "cpu", "batch_size": 4, "threads": 1}
    assert m["timed"] and plan.describe() in [t["plan"] for t in m["timed"]]
    assert plan.predicted["speedup_source"] == "latency table corrected by timed candidates"
    out = result.stdout.replace("\n", " ")
    assert f"{m['speedup']:.2f}x measured (quartiles" in out and "batch 4, 1 thread, cpu" in out
    assert f"{len(m['timed'])} candidate(s) timed" in out
    assert "timed " in result.stderr and "x measured" in result.stderr  # the planner's progress notes
    assert ("writing it anyway" in result.stderr) == (not m["budget_met"])


def test_token_merging_as_json(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--budget", "2x", "--method", "tome", "--no-calibrate", *CALIB, "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == load_plan(tmp_path).to_dict()
    assert printed["method"] == "tome" and any(printed["merge_r"]) and not printed["static_layers"] and not printed["reductions"]
    measured = printed["measured"]
    assert {"budget_met", "speedup", "deployment", "damage", "part_damage", "timed", "near_tie"} <= set(measured)
    assert measured["budget_met"] and measured["damage"]["images"] == 32 and measured["deployment"] is None
    assert printed["predicted"]["merge_r"] == printed["merge_r"]


def test_token_merging_table_shows_the_merges(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--budget", "1.5x", "--method", "tome", "--no-calibrate", "--calibration-images", "0")
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path)
    assert "--calibration-images 0: damage from the analysis proxy" in result.stderr
    assert plan.predicted["damage_source"].startswith("proxy") and plan.measured["damage"] is None
    assert "(tome)" in result.stdout and str(max(plan.merges())) in result.stdout


def test_unknown_method_is_one_line_exit_2(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--method", "fast", "--no-calibrate")
    assert result.exit_code == 2
    assert "--method 'fast' is not one of dgssa-glad, dgssa, glad, tome, auto" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "plan.json").exists()


def test_unknown_device_is_one_line_exit_2(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--device", "nonsense", "--calibration-images", "0")
    assert result.exit_code == 2
    assert "--device nonsense: unknown device; use cpu or cuda" in result.stderr
    assert "error:" in result.stderr and "Traceback" not in result.output


def test_unreachable_budget_exits_2_unless_allowed(tmp_path: Path) -> None:
    args = ("--budget", "500x", "--no-calibrate", "--calibration-images", "0")
    result = _demo(tmp_path, *args)
    assert result.exit_code == 2
    assert "not reachable: best plan reaches" in result.stderr and "--allow-below-budget" in result.stderr
    assert "NOT met" in result.stdout  # the best plan is still shown
    assert not (tmp_path / "plan.json").exists()
    result = _demo(tmp_path, *args, "--allow-below-budget")
    assert result.exit_code == 0, result.output
    assert load_plan(tmp_path).measured["budget_met"] is False
    assert "writing it anyway" in result.stderr


def test_bad_budget_is_one_line_exit_2(model_dir: Path, tmp_path: Path) -> None:
    result = _run(model_dir, tmp_path, "--budget", "fast")
    assert result.exit_code == 2
    assert "budget 'fast' is not understood" in result.stderr and "2x" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _analysis(similarity: list[float], rank90_norm: list[float], num_tokens: int = 65) -> Analysis:
    layers = [
        LayerAnalysis(index=i, num_tokens=num_tokens, similarity=[s, s], kl_to_mean=[0.0, 0.0], rank90=[r * num_tokens] * 2,
                      rank99=[r * num_tokens] * 2, effective_rank=[r * num_tokens] * 2, recommendation=recommend(s, r))
        for i, (s, r) in enumerate(zip(similarity, rank90_norm))
    ]
    return Analysis(model_id="tiny", data_source="test", samples=8, num_tokens=num_tokens, num_prefix_tokens=1,
                    grid=(8, 8), num_heads=2, layers=layers)


def test_analysis_in_the_out_folder_is_used(model_dir: Path, tmp_path: Path) -> None:
    analysis = _analysis([0.2, 0.95, 0.9, 0.5], [0.9, 0.6, 0.5, 0.2])
    (tmp_path / "analysis.json").write_text(json.dumps(analysis.to_dict()))
    uniform = {f"blocks.{i}": torch.full((2, 65, 65), 1 / 65) for i in range(4)}  # the means analyze writes beside it
    save_file(uniform, str(tmp_path / "attention_means.safetensors"))
    result = _run(model_dir, tmp_path, "--budget", "1.05x", "--method", "dgssa", "--no-calibrate", "--json")
    assert result.exit_code == 0, result.output
    err = result.stderr.replace("\n", "")
    assert f"planning from the analysis in {tmp_path / 'analysis.json'}" in err
    assert "no --data: damage from the analysis proxy" in err  # a local model has no data of its own
    printed = json.loads(result.stdout)
    assert printed == load_plan(tmp_path).to_dict()
    assert "analysis of 'tiny'" in printed["predicted"]["selection"] and printed["predicted"]["damage_source"].startswith("proxy")
    assert printed["static_layers"] and 0 not in printed["static_layers"]  # the dynamic block 0 stays dynamic


def _merging_is_slow_at_batch_1(monkeypatch: pytest.MonkeyPatch, merged: float = 0.5, spread: float = 0.0) -> None:
    """Every candidate measures 3x at the deployment's batch; at batch 1 token merging ``merged``
    (quartiles ``merged -+ spread``), the rest 1.5x."""
    from vitcompress.modules.tome import is_patched
    from vitcompress.timing import SpeedComparison

    def fake(baseline, model, input_size, *, batch_size=32, threads=None, device=None, seconds=3.0, **kwargs):
        s = (merged if is_patched(model) else 1.5) if batch_size == 1 else 3.0
        d = spread if batch_size == 1 and is_patched(model) else 0.0
        return SpeedComparison(speedup=s, speedup_q25=s - d, speedup_q75=s + d, baseline_ms=10.0, model_ms=10.0 / s,
                               batch_size=batch_size, rounds=10, threads=1, device="cpu")

    monkeypatch.setattr(PLAN, "compare_speed", fake)


def test_a_plan_slower_at_batch_1_is_set_aside_unless_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _merging_is_slow_at_batch_1(monkeypatch)
    kept = _demo(tmp_path / "kept", "--budget", "2x", *CALIB, "--batch-size", "4", "--allow-slower-at-batch-1")
    assert kept.exit_code == 0, kept.output
    first = load_plan(tmp_path / "kept")
    assert any(first.merges()) and first.measured["batch1"]["speedup"] == 0.5  # the least damaging: merging
    assert "slower than the original" in kept.stdout and "set aside" not in kept.stdout
    result = _demo(tmp_path / "floor", "--budget", "2x", *CALIB, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "floor")
    assert not any(plan.merges()) and plan.measured["batch1"]["speedup"] == 1.5
    assert plan.measured["slower_at_batch1"][0]["plan"] == first.describe()
    out = result.stdout.replace("\n", " ")
    assert f"set aside: {first.describe()} (3.00x at batch 4, 0.50x at batch 1" in out
    assert "at batch 1: 1.50x measured" in out
    assert "0.50x at batch 1, upper quartile 0.50x: slower than the original" in out
    assert "may measure it either side" not in out  # 0.50x: clearly slower


def test_a_plan_within_its_batch_1_spread_of_the_original_is_kept_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _merging_is_slow_at_batch_1(monkeypatch, merged=0.97, spread=0.05)
    result = _demo(tmp_path, "--budget", "2x", *CALIB, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path)
    assert any(plan.merges()) and plan.measured["slower_at_batch1"] == [] and plan.measured["batch1_within_spread"]
    out = result.stdout.replace("\n", " ")
    assert "at batch 1: 0.97x measured (quartiles 0.92-1.02): within the timing's spread of the original" in out
    assert "a fresh timing, --retime, may measure it either side of 1.00x" in out and "set aside" not in out


def test_plan_again_reuses_this_machines_timings_unless_retime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _merging_is_slow_at_batch_1(monkeypatch, merged=1.2)
    args = ("--budget", "2x", *CALIB, "--batch-size", "4")
    first = _demo(tmp_path / "one", *args)
    assert first.exit_code == 0, first.output
    timings = load_plan(tmp_path / "one").measured["timings"]
    assert timings["reused"] == 0 and timings["measured"] == timings["stored"] > 0 and "reused from" not in first.stdout
    second = _demo(tmp_path / "two", *args)
    assert second.exit_code == 0, second.output
    again = load_plan(tmp_path / "two")
    assert again.describe() == load_plan(tmp_path / "one").describe()
    assert again.measured["timings"]["reused"] == timings["measured"] and again.measured["timings"]["measured"] == 0
    assert "reusing the timings this machine stored for this model" in second.stderr
    out = second.stdout.replace("\n", " ")
    assert f"timings: {timings['measured']} reused from this machine's timing cache, 0 measured" in out and "--retime" in out
    fresh = _demo(tmp_path / "three", *args, "--retime")
    assert fresh.exit_code == 0, fresh.output
    assert load_plan(tmp_path / "three").measured["timings"]["reused"] == 0 and "reusing the timings" not in fresh.stderr
