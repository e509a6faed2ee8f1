"""The chained pipeline: finding the latest analysis and run, compress end to end.

(Splits and hold-outs are tested in test_data.py, output folder names in test_names.py, the
speed-up measurement in test_timing.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from timm.models import save_for_hf

from vitcompress.analyze import analyze, save_analysis
from vitcompress.data import load_data
from vitcompress.errors import DataError, VitcompressError
from vitcompress.export import load, read_metadata
from vitcompress.finetune import FinetuneConfig, checkpoint_path
from vitcompress.pipeline import (
    _resolve_inputs,
    compress,
    continue_finetune,
    find_latest_analysis,
    find_latest_workdir,
    output_dir_for,
)
from vitcompress.plan import Plan, Reduction
from vitcompress.timing import SpeedComparison

from conftest import TINY, tiny_vit

PLAN = Plan(static_layers=[0, 1], reductions=[Reduction(2, [2, 1])], num_blocks=4, num_prefix_tokens=1, grid=(4, 4))
DATA_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
               "crop_pct": 1.0, "crop_mode": "center"}


@pytest.fixture
def tiny_model_id(tmp_path: Path) -> str:
    """A tiny 10-class ViT in timm's local format (what local-dir: reads)."""
    folder = tmp_path / "models" / "tiny-vit"
    save_for_hf(tiny_vit(num_classes=10), folder, model_args={**TINY, "num_classes": 10}, safe_serialization=True)
    return f"local-dir:{folder}"


def quiet(message: str) -> None:
    pass


def quick(**overrides: object) -> FinetuneConfig:
    base = dict(steps=3, batch_size=16, num_workers=0, progress=False, checkpoint_every=2)
    return FinetuneConfig(**{**base, **overrides})  # type: ignore[arg-type]


# ---- folders ---------------------------------------------------------------------------------
def test_data_source_recorded_by_analyze() -> None:
    from vitcompress.pipeline import _source_of

    assert _source_of("demo [test]") == "demo"
    assert _source_of("/data/my images [train[holdout-rest]]") == "/data/my images"
    assert _source_of("org/dataset") == "org/dataset"


def test_slug_matches_analyze_command_default() -> None:
    from vitcompress.cli.analyze import default_out_dir

    for name in ("deit_small", "local-dir:/a/b/my model/", "hf-hub:org/name"):
        assert output_dir_for(name) == default_out_dir(name)


def _fake_analysis(folder: Path, mtime: float) -> Path:
    folder.mkdir(parents=True)
    path = folder / "analysis.json"
    path.write_text("{}")
    os.utime(path, (mtime, mtime))
    return path


def test_find_latest_analysis(tmp_path: Path) -> None:
    assert find_latest_analysis(tmp_path) is None
    _fake_analysis(tmp_path / "a", 1_000_000)
    newest = _fake_analysis(tmp_path / "b", 2_000_000)
    _fake_analysis(tmp_path / "c", 1_500_000)
    assert find_latest_analysis(tmp_path) == newest


def test_compress_continues_from_latest_analysis(tmp_path: Path, tiny_model_id: str) -> None:
    model = tiny_vit(num_classes=10)
    images = load_data("demo", split="test", data_config=DATA_CONFIG, limit=16)
    result = analyze(model, images, samples=16, model_id=tiny_model_id, data_source="demo [test]", progress=False)
    older = save_analysis(result, tmp_path / "older")["json"]
    os.utime(older, (1_000_000, 1_000_000))
    newest = save_analysis(result, tmp_path / "newest")["json"]
    messages: list[str] = []
    inputs = _resolve_inputs(None, None, None, None, tmp_path, messages.append)
    assert inputs.analysis_path == newest
    assert inputs.model_id == tiny_model_id and inputs.data == "demo"
    assert any(str(newest) in m for m in messages)  # it says which analysis it continues from


def test_no_analysis_means_demo(tmp_path: Path) -> None:
    messages: list[str] = []
    inputs = _resolve_inputs(None, None, None, None, tmp_path, messages.append)
    assert inputs.model_id == "demo" and inputs.data == "demo" and inputs.analysis_path is None
    assert any("demo" in m for m in messages)


def test_a_named_model_needs_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data"):
        _resolve_inputs("deit_small", None, None, None, tmp_path, quiet)


# ---- end to end ------------------------------------------------------------------------------
def test_compress_end_to_end(tmp_path: Path, tiny_model_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(PLAN.to_dict()))
    result = compress(tiny_model_id, plan=plan_file, data="demo", config=quick(), log=quiet)

    out_dir = Path("vitcompress-out/tiny-vit")
    assert result.output == out_dir / "model.safetensors" and result.output.is_file()
    assert result.plan.to_dict() == PLAN.to_dict()
    assert result.finetune is not None and result.finetune.steps == 3
    for value in (result.teacher_top1, result.student_top1_before, result.student_top1):
        assert value is not None and 0.0 <= value <= 1.0
    meta = read_metadata(result.output)
    assert meta["plan"] == PLAN.to_dict() and meta["model"]["model_id"] == tiny_model_id
    assert meta["teacher_top1"] == result.teacher_top1 and meta["student_top1"] == result.student_top1
    assert meta["speedup"]["speedup"] == result.speedup["speedup"] > 0
    # the one measurement: timing.compare_speed's SpeedComparison, as a dict
    assert set(meta["speedup"]) == {f.name for f in dataclasses.fields(SpeedComparison)}
    assert meta["speedup"]["speedup_q25"] <= meta["speedup"]["speedup"] <= meta["speedup"]["speedup_q75"]
    assert meta["finetune"]["steps"] == 3

    loaded = load(result.output)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - result.model(x)).abs().max().item() < 1e-5
    run = json.loads((out_dir / "finetune" / "run.json").read_text())
    assert run["model"] == tiny_model_id and run["plan"] == PLAN.to_dict()
    assert checkpoint_path(out_dir / "finetune").is_file()

    # The output is not replaced without force, and the refusal comes before any work.
    with pytest.raises(VitcompressError, match="--force"):
        compress(tiny_model_id, plan=plan_file, data="demo", config=quick(), log=quiet)

    # `vitcompress finetune` continues the newest run from its checkpoint.
    assert find_latest_workdir() == out_dir / "finetune"
    more = continue_finetune(overrides={"steps": 5}, output="more.safetensors", measure_speed=False, log=quiet)
    assert more.finetune is not None and more.finetune.resumed_from == 3 and more.finetune.steps == 5
    assert more.teacher_top1 == result.teacher_top1  # measured once, kept in run.json
    assert read_metadata("more.safetensors")["finetune"]["steps"] == 5


def test_no_finetune_exports_the_converted_model(tmp_path: Path, tiny_model_id: str) -> None:
    result = compress(tiny_model_id, plan=PLAN, data="demo", finetune=False, measure_speed=False,
                      output=tmp_path / "m.safetensors", out_root=tmp_path / "out", config=quick(), log=quiet)
    assert result.finetune is None and result.speedup is None
    assert result.student_top1 == result.student_top1_before
    assert not (tmp_path / "out" / "tiny-vit" / "finetune").exists()
    assert read_metadata(tmp_path / "m.safetensors")["finetune"] is None


def test_compress_resume_reuses_the_runs_plan(tmp_path: Path, tiny_model_id: str) -> None:
    out_root = tmp_path / "out"
    first = compress(tiny_model_id, plan=PLAN, data="demo", config=quick(), out_root=out_root,
                     measure_speed=False, log=quiet)
    other_plan = Plan(static_layers=[0], reductions=[], num_blocks=4, num_prefix_tokens=1, grid=(4, 4))
    log = Recorder()
    resumed = compress(tiny_model_id, plan=other_plan, data="demo", config=quick(steps=4, resume=True, progress=True),
                       out_root=out_root, output=tmp_path / "resumed.safetensors", measure_speed=False, log=log)
    assert resumed.plan.to_dict() == first.plan.to_dict()  # the checkpoint's architecture, not the new plan
    assert resumed.finetune is not None and resumed.finetune.resumed_from == 3 and resumed.finetune.steps == 4
    assert any("--resume" in m for m in log.messages)
    # the log's progress method follows the fine-tuning: from the resumed step to the last
    assert [(done, total) for done, total, _ in log.steps] == [(3, 4), (4, 4)]
    assert log.steps[-1][2].startswith("epoch ")


class Recorder:
    """A log with a progress method, as the CLI's ``note`` is."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.steps: list[tuple[int, int, str]] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)

    def progress(self, done: int, total: int, text: str) -> None:
        self.steps.append((done, total, text))


def test_corrupt_run_file_is_a_one_line_error(tmp_path: Path) -> None:
    from vitcompress.errors import VitcompressError
    from vitcompress.pipeline import continue_finetune

    (tmp_path / "run.json").write_text("{truncated")
    with pytest.raises(VitcompressError, match=r"run.json is not valid JSON .*vitcompress compress"):
        continue_finetune(tmp_path, log=lambda _: None)


def test_probe_steps_fine_tune_each_familys_best_plan_and_keep_the_least_damaged(tmp_path: Path, tiny_model_id: str) -> None:
    from vitcompress.pipeline import PlanOptions

    planning = PlanOptions(method="auto", calibration_images=32, probe_steps=2)
    messages: list[str] = []
    result = compress(tiny_model_id, "1.5x", data="demo", calibrate=False, measure_speed=False, planning=planning,
                      config=quick(steps=2), out_root=tmp_path / "out", samples=16, log=messages.append)
    probe = result.plan.measured["probe"]
    kls = [r["kl"] for r in probe["results"]]
    assert len(kls) >= 2 and probe["steps"] == 2 and probe["images"] > 0
    assert probe["chosen"] == result.plan.describe() == probe["results"][kls.index(min(kls))]["plan"]
    assert "shortlist" not in result.plan.measured  # consumed by the probe
    saved = json.loads((tmp_path / "out" / "tiny-vit" / "plan.json").read_text())
    assert saved["measured"]["probe"] == probe
    assert any(m.startswith("probing ") for m in messages)
