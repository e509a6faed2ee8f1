"""Probe fine-tunes: damage after a few steps, on images the probe does not train on."""

from __future__ import annotations

import pytest

from conftest import tiny_vit
from vitcompress.data import load_data
from vitcompress.errors import VitcompressError
from vitcompress.finetune import FinetuneConfig
from vitcompress.pipeline import calibration_images
from vitcompress.plan_types import Plan, Reduction
from vitcompress.probe import ProbeResult, best_probed, probe_config, probe_plans


def test_probing_measures_each_plan_before_and_after_its_short_fine_tune() -> None:
    teacher = tiny_vit(num_classes=10)
    config = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    train = load_data("demo", split="train", data_config=config, limit=64)
    held = load_data("demo", split="test", data_config=config, limit=24)
    held_images = calibration_images(held, 24)
    plans = [Plan(reductions=[Reduction(1, [2, 1])], num_blocks=4, grid=(4, 4)),
             Plan(static_layers=[0], num_blocks=4, grid=(4, 4))]
    config = probe_config(FinetuneConfig(batch_size=16, num_workers=0, lr=1e-3), 3)
    results = probe_plans(teacher, plans, train, held_images, config)
    assert [r.plan for r in results] == plans
    for r in results:
        assert r.kl_free > 0 and r.kl >= 0 and r.kl != r.kl_free and 0 <= r.agreement <= 1
    assert best_probed(results).kl == min(r.kl for r in results)
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher is left trainable for the next plan


def test_probe_config_keeps_the_recipe_without_checkpoints() -> None:
    full = FinetuneConfig(epochs=3, lr=1e-3, workdir="w", resume=True, checkpoint_every=50, guidance="map")
    probe = probe_config(full, 40)
    assert (probe.steps, probe.epochs, probe.workdir, probe.resume, probe.checkpoint_every) == (40, None, None, False, 0)
    assert (probe.lr, probe.guidance) == (1e-3, "map")
    with pytest.raises(VitcompressError, match="probe-steps"):
        probe_config(full, 0)


def test_ties_keep_the_planners_order() -> None:
    a, b = Plan(static_layers=[0]), Plan(static_layers=[1])
    results = [ProbeResult(a, 0.5, 0.2, 0.9, 1.0), ProbeResult(b, 0.1, 0.2, 0.9, 1.0)]
    assert best_probed(results).plan is a
    with pytest.raises(VitcompressError):
        best_probed([])
