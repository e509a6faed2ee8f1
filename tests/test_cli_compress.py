"""`vitcompress compress`, `finetune` and `export` on a tiny local model and the demo digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf
from typer.testing import CliRunner

from vitcompress.cli import app
from vitcompress.export import read_metadata
from vitcompress.plan import Plan, Reduction

from conftest import TINY, tiny_vit

runner = CliRunner()
PLAN = Plan(static_layers=[0, 1], reductions=[Reduction(2, [2, 1])], num_blocks=4, num_prefix_tokens=1, grid=(4, 4))
FAST = ["--batch-size", "16", "--workers", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # --threads 1 sets it for the rest of the process
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A tiny local model, its plan file, and a fresh working folder."""
    folder = tmp_path / "models" / "tiny-vit"
    save_for_hf(tiny_vit(num_classes=10), folder, model_args={**TINY, "num_classes": 10}, safe_serialization=True)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN.to_dict()))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return f"local-dir:{folder}", plan


def test_compress_finetune_export(setup: tuple[str, Path]) -> None:
    model, plan = setup
    args = ["compress", model, "--plan", str(plan), "--data", "demo", "--steps", "2", *FAST]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("teacher top-1", "student top-1 (fine-tuned)", "measured speed-up", "model.safetensors"):
        assert text in result.stdout
    output = Path("vitcompress-out/tiny-vit/model.safetensors")
    assert read_metadata(output)["finetune"]["steps"] == 2

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, [*args, "--force", "--no-finetune", "--no-speed"])
    assert forced.exit_code == 0, forced.output
    assert read_metadata(output)["finetune"] is None

    more = runner.invoke(app, ["finetune", "vitcompress-out/tiny-vit/finetune", "--steps", "3", "-o", "more.safetensors",
                               "--no-speed", "--workers", "0", "--threads", "1", "--json"])
    assert more.exit_code == 0, more.output
    report = json.loads(more.stdout)
    assert report["finetune"]["steps"] == 3 and report["finetune"]["resumed_from"] == 2

    onnx = runner.invoke(app, ["export", "more.safetensors", "--onnx", "more.onnx"])
    assert onnx.exit_code == 0, onnx.output
    assert Path("more.onnx").is_file() and "max |onnx - torch|" in onnx.stdout
    refused = runner.invoke(app, ["export", "more.safetensors", "--onnx", "more.onnx"])
    assert refused.exit_code == 2 and "--force" in refused.output


def test_export_rejects_foreign_file(tmp_path: Path) -> None:
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    result = runner.invoke(app, ["export", str(foreign)])
    assert result.exit_code == 2 and "not a vitcompress model" in result.output
    assert not (tmp_path / "weights.onnx").exists()


def test_epochs_and_steps_are_exclusive(setup: tuple[str, Path]) -> None:
    model, plan = setup
    result = runner.invoke(app, ["compress", model, "--plan", str(plan), "--data", "demo", "--epochs", "1", "--steps", "2"])
    assert result.exit_code == 2 and "not both" in result.output


def test_finetune_without_a_run_says_what_to_do(setup: tuple[str, Path]) -> None:
    result = runner.invoke(app, ["finetune"])
    assert result.exit_code == 2 and "vitcompress compress" in result.output


def test_staged_flow_analyze_then_compress(setup: tuple[str, Path]) -> None:
    model, _ = setup
    analyzed = runner.invoke(app, ["analyze", model, "--data", "demo", "--samples", "16"])
    assert analyzed.exit_code == 0, analyzed.output
    # No model, no analysis named: compress continues from the analysis just written, and says so.
    result = runner.invoke(app, ["compress", "--budget", "1.5x", "--steps", "2", "--no-calibrate", "--no-speed", *FAST])
    assert result.exit_code == 0, result.output
    assert "continuing from the latest analysis: vitcompress-out/tiny-vit/analysis.json" in result.output
    assert Path("vitcompress-out/tiny-vit/plan.json").is_file()
    meta = read_metadata("vitcompress-out/tiny-vit/model.safetensors")
    assert meta["model"]["model_id"] == model and meta["plan"]["budget"] == "1.5x"


def test_fresh_folder_runs_on_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compress", "--budget", "2x", "--no-finetune", "--no-calibrate", "--no-speed",
                                 "--samples", "16", "--threads", "1", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "running on the built-in demo" in result.output
    meta = read_metadata("vitcompress-out/demo/model.safetensors")
    assert meta["model"]["model_id"] == "demo" and meta["plan"]["budget"] == "2x"
    assert 0.0 <= meta["teacher_top1"] <= 1.0 and 0.0 <= meta["student_top1"] <= 1.0


def test_bad_budget_fails_before_any_work(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compress", "--budget", "abc"])
    assert result.exit_code == 2 and "budget 'abc' is not understood" in result.output
    assert not (tmp_path / "vitcompress-out").exists()  # nothing analysed or written


def test_an_unreachable_budget_fails_before_fine_tuning_unless_allowed(setup: tuple[str, Path]) -> None:
    model, _ = setup
    args = ["compress", model, "--budget", "1000x", "--data", "demo", "--steps", "2", "--no-calibrate", "--no-speed",
            "--calibration-images", "16", *FAST]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "budget 1000x not reachable: best plan reaches" in result.stderr and "--allow-below-budget" in result.stderr
    assert not Path("vitcompress-out/tiny-vit/finetune").exists()  # failed before fine-tuning
    assert not Path("vitcompress-out/tiny-vit/model.safetensors").exists()
    assert not Path("vitcompress-out/tiny-vit/plan.json").exists()
    result = runner.invoke(app, [*args, "--allow-below-budget"])
    assert result.exit_code == 0, result.output
    assert "going on with it (--allow-below-budget)" in result.stderr
    assert read_metadata("vitcompress-out/tiny-vit/model.safetensors")["plan"]["budget"] == "1000x"


def test_compress_with_token_merging_exports_a_model_that_loads(setup: tuple[str, Path]) -> None:
    from vitcompress.export import load
    from vitcompress.modules.tome import tome_schedule

    model, _ = setup
    result = runner.invoke(app, ["compress", model, "--tome-r", "2", "--data", "demo", "--steps", "2",
                                 "--calibration-images", "16", *FAST])
    assert result.exit_code == 0, result.output
    assert "token merging (r per block)" in result.stdout
    output = Path("vitcompress-out/tiny-vit/model.safetensors")
    meta = read_metadata(output)
    assert meta["plan"]["method"] == "tome" and meta["plan"]["merge_r"] == [2, 2, 2, 2]
    assert tome_schedule(load(output)) == [2, 2, 2, 2]


def test_compress_plans_with_the_method_asked_for(setup: tuple[str, Path]) -> None:
    model, _ = setup
    result = runner.invoke(app, ["compress", model, "--method", "tome", "--budget", "1.2x", "--data", "demo",
                                 "--no-finetune", "--no-calibrate", "--calibration-images", "16", *FAST])
    assert result.exit_code == 0, result.output
    plan = json.loads(Path("vitcompress-out/tiny-vit/plan.json").read_text())
    assert plan["method"] == "tome" and any(plan["merge_r"]) and not plan["reductions"] and not plan["static_layers"]
    assert plan["measured"]["speedup"] is None  # --no-calibrate: predicted from FLOPs, and the plan says so
    assert plan["predicted"]["speedup_source"] == "flops (not timed)"


@pytest.mark.parametrize("flag, reuse", [((), True), (("--retime",), False)], ids=["default", "retime"])
def test_compress_plans_reusing_stored_timings_unless_retime(setup: tuple[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                             flag: tuple, reuse: bool) -> None:
    import importlib

    from vitcompress.errors import VitcompressError

    plan_module = importlib.import_module("vitcompress.plan")  # the package's name `plan` is a function

    seen = {}

    def planned(*args, **kwargs):
        seen.update(kwargs)
        raise VitcompressError("stopped after planning")

    monkeypatch.setattr(plan_module, "make_plan", planned)
    model, _ = setup
    result = runner.invoke(app, ["compress", model, "--budget", "1.2x", "--data", "demo", "--no-finetune",
                                 "--calibration-images", "16", *flag, *FAST])
    assert result.exit_code != 0 and "stopped after planning" in result.stderr
    assert seen["reuse_timings"] is reuse
