"""Shared fixtures: tiny timm ViTs and small image datasets created on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def tiny_vit(arch: str = "deit_tiny_patch16_224", **overrides) -> torch.nn.Module:
    """A random-init ViT small enough for fast tests (4x4 patch grid by default)."""
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **{**TINY, **overrides}).eval()


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return tiny_vit()


def requires_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the ../shared folder beside the checkout)")
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run ~10x faster on one thread than on two busy cores; timing lives in benchmarks/.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never reach the network; make hub lookups fail fast the same way on every machine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _own_timing_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Each test plans with an empty timing cache of its own, never the user's ~/.cache/vitcompress.
    monkeypatch.setenv("VITCOMPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _time_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh timing process per plan costs ~2 s of start-up; tests/test_timing.py tests the worker.
    monkeypatch.setenv("VITCOMPRESS_TIMING", "in-process")
