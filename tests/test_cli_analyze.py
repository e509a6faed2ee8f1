"""`vitcompress analyze` end to end on a tiny local model and generated image folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf
from typer.testing import CliRunner

from vitcompress.analyze import load_analysis
from vitcompress.cli import app
from vitcompress.cli.analyze import default_out_dir

runner = CliRunner()
ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=3)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **ARGS)
    folder = tmp_path / "tiny-vit"
    save_for_hf(model, folder, model_args=ARGS, safe_serialization=True)
    return folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not a png")
    return root


def test_analyze_table_and_files(tiny_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    result = runner.invoke(
        app,
        ["analyze", f"local-dir:{tiny_dir}", "--data", str(image_folder), "--samples", "8",
         "--batch-size", "3", "--workers", "0", "--out", str(out_dir), "--static-threshold", "0.5"],
    )
    assert result.exit_code == 0, result.output
    assert "Attention across layers" in result.stdout and "N = 17 tokens" in result.stdout
    assert "static-attention candidate if sim >= 0.5" in result.stdout
    assert "wrote" in result.stderr and "analysis.png" in result.stderr
    assert {p.name for p in out_dir.iterdir()} == {"analysis.json", "attention_means.safetensors", "analysis.png"}
    analysis = load_analysis(out_dir)
    # 8 of the 11 files are drawn; the unreadable one may be among them and is skipped, not fatal.
    skipped = 1 if "skipped 1 unreadable image" in result.stderr else 0
    assert analysis.samples == 8 - skipped and analysis.thresholds.static_similarity == 0.5
    assert sorted(analysis.attention_means) == [0, 1, 2] and analysis.attention_means[0].shape == (2, 17, 17)
    rows = [line for line in result.stdout.splitlines() if "candidate" in line or "keep" in line]
    assert len(rows) >= 3


def test_analyze_json_on_stdout(tiny_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["analyze", f"local-dir:{tiny_dir}", "--data", str(image_folder), "--samples", "4",
         "--workers", "0", "--out", str(tmp_path / "o"), "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # nothing but JSON on stdout
    assert report["schema"] == "vitcompress.analysis" and report["num_tokens"] == 17
    assert report["similarity_metric"] == "cosine_to_mean" and len(report["layers"]) == 3
    assert Path(report["files"]["json"]).is_file()
    assert "analyzing" in result.stderr


def test_analyze_errors_are_one_line(tiny_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["analyze", f"local-dir:{tiny_dir}", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "no such file or folder" in result.stderr and "Traceback" not in result.output


def test_default_out_dir_is_a_safe_folder_name() -> None:
    assert default_out_dir("deit_small") == Path("vitcompress-out/deit_small")
    assert default_out_dir("local-dir:/work/models/cifar10-vit12-d96/") == Path("vitcompress-out/cifar10-vit12-d96")
    assert default_out_dir("hf-hub:timm/deit_small_patch16_224.fb_in1k") == Path("vitcompress-out/timm_deit_small_patch16_224.fb_in1k")


def test_threshold_defaults_are_the_librarys() -> None:
    """The CLI spells the defaults itself (its --help imports no torch); they must be analyze's."""
    from vitcompress.analyze import Thresholds
    from vitcompress.cli.analyze import DEFAULT_REDUCE_RANK90, DEFAULT_STATIC_SIMILARITY

    assert (DEFAULT_STATIC_SIMILARITY, DEFAULT_REDUCE_RANK90) == (Thresholds().static_similarity, Thresholds().reduce_rank90)
