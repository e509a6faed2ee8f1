"""Every file name in one place, and the one output-folder rule."""

from __future__ import annotations

from pathlib import Path

from vitcompress import names
from vitcompress.names import OUTPUT_ROOT, model_slug, output_dir_for


def test_model_slug() -> None:
    assert model_slug("deit_small") == "deit_small"
    assert model_slug("local-dir:/work/models/cifar10-vit12-d96/") == "cifar10-vit12-d96"
    assert model_slug("hf-hub:timm/vit_base_patch16_224.augreg_in21k") == "timm_vit_base_patch16_224.augreg_in21k"
    assert model_slug("  ") == "model" and model_slug("a b/c") == "a_b_c"


def test_output_dir_for() -> None:
    assert output_dir_for("demo", "out") == Path("out/demo")
    assert output_dir_for("deit_small") == OUTPUT_ROOT / "deit_small" == Path("vitcompress-out/deit_small")


def test_file_names_are_distinct_plain_names() -> None:
    files = [names.ANALYSIS_JSON, names.MEANS_FILE, names.PLOT_FILE, names.PLAN_JSON, names.MODEL_FILE,
             names.RUN_FILE, names.CHECKPOINT_FILE, names.WORKDIR_NAME]
    assert len(set(files)) == len(files)
    assert all("/" not in f and f == f.strip() for f in files)
