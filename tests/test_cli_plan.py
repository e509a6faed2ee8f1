"""`vitcompress plan` on a tiny local model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from timm.models import save_for_hf
from typer.testing import CliRunner

from conftest import TINY, tiny_vit
from vitcompress.analyze import Analysis, LayerAnalysis, recommend
from vitcompress.cli import app
from vitcompress.flops import count_flops
from vitcompress.models import load_model
from vitcompress.plan import load_plan

runner = CliRunner()
ARGS = {**TINY, "img_size": 64}  # 8x8 grid, 4 blocks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    save_for_hf(tiny_vit(**ARGS), folder, model_args=ARGS, safe_serialization=True)
    return folder


def _run(model_dir: Path, out: Path, *args: str):
    return runner.invoke(app, ["plan", f"local-dir:{model_dir}", "--out", str(out), *args])


def test_plan_prints_and_writes_plan_json(model_dir: Path, tmp_path: Path) -> None:
    result = _run(model_dir, tmp_path, "--budget", "1.5x", "--no-calibrate")
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "plan.json")
    assert plan.predicted["budget_met"] and plan.budget == "1.5x" and plan.num_blocks == 4
    model, _ = load_model(f"local-dir:{model_dir}")
    assert plan.predicted["base_flops"] == count_flops(model)
    assert "no analysis" in result.stderr and "plan written to" in result.stderr
    out = result.stdout
    assert "predicted speed-up" in out and "FLOPs/image" in out and "params" in out and "met" in out
    assert all(str(i) in out for i in range(4)) and "tokens" in out
    if plan.reductions:
        assert "GLAD" in out


def test_unreachable_budget_exits_2_unless_allowed(model_dir: Path, tmp_path: Path) -> None:
    result = _run(model_dir, tmp_path, "--budget", "500x", "--no-calibrate")
    assert result.exit_code == 2
    assert "not reachable: best plan reaches" in result.stderr and "--allow-below-budget" in result.stderr
    assert "NOT met" in result.stdout  # the best plan is still shown
    assert not (tmp_path / "plan.json").exists()
    result = _run(model_dir, tmp_path, "--budget", "500x", "--no-calibrate", "--allow-below-budget")
    assert result.exit_code == 0, result.output
    assert load_plan(tmp_path).predicted["budget_met"] is False
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
    result = _run(model_dir, tmp_path, "--budget", "1.3x", "--no-calibrate", "--json")
    assert result.exit_code == 0, result.output
    assert f"planning from the analysis in {tmp_path / 'analysis.json'}" in result.stderr.replace("\n", "")
    printed = json.loads(result.stdout)
    assert printed == load_plan(tmp_path).to_dict()
    assert "analysis of 'tiny'" in printed["predicted"]["selection"] and 0 not in printed["static_layers"]


def test_calibrated_plan(model_dir: Path, tmp_path: Path) -> None:
    # --allow-below-budget: whether timings of a tiny model reach the budget is not what is tested here.
    result = _run(model_dir, tmp_path, "--budget", "1.1x", "--batch-size", "2", "--threads", "1", "--allow-below-budget")
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path)
    assert plan.predicted["calibrated"] and plan.predicted["threads"] == 1 and plan.predicted["batch_size"] == 2
    assert "ms/batch" in result.stdout and "calibrated latency" in result.stdout
    assert plan.predicted["verified"] and f"verified speed-up {plan.predicted['measured_speedup']:.2f}x" in result.stdout
    assert "calibration took" in result.stderr
