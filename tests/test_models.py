from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

from conftest import TINY, tiny_vit
from vitcompress.errors import ModelLoadError, UnsupportedModelError
from vitcompress.models import (
    ALIASES,
    DEMO_DIR,
    ModelSpec,
    build_model,
    load_model,
    model_info,
    read_state_dict,
)


def _tiny_kwargs() -> dict:
    return {k: v for k, v in TINY.items() if k != "num_classes"}


def test_every_alias_is_a_timm_vit() -> None:
    for alias, name in ALIASES.items():
        assert timm.is_model(name), alias


def test_alias_and_tagged_names_load_with_random_init() -> None:
    model, spec = load_model("deit_tiny", random_init=True, model_kwargs=_tiny_kwargs())
    assert spec.architecture == "deit_tiny_patch16_224" and spec.weights == "random"
    model, spec = load_model("vit_base_patch16_224.augreg_in21k_ft_in1k", random_init=True, model_kwargs=_tiny_kwargs())
    assert spec.architecture == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert not model.training


def test_deit_small_geometry() -> None:
    model, _ = load_model("deit_small", random_init=True)
    info = model_info(model)
    assert (info.num_tokens, info.num_prefix_tokens, info.depth, info.num_heads, info.embed_dim) == (197, 1, 12, 6, 384)
    assert info.data_config["input_size"] == [3, 224, 224]


@pytest.mark.parametrize(
    "arch, kwargs, prefix, extra",
    [
        ("deit_tiny_distilled_patch16_224", {}, 2, "distilled"),
        ("deit3_small_patch16_224", {}, 1, "layer_scale"),
        ("vit_base_patch16_224", {"reg_tokens": 4}, 5, None),
        ("vit_base_patch16_224", {"global_pool": "avg", "class_token": False}, 0, None),
    ],
)
def test_model_info_for_supported_families(arch: str, kwargs: dict, prefix: int, extra: str | None) -> None:
    info = model_info(tiny_vit(arch, **kwargs))
    assert info.num_prefix_tokens == prefix
    assert info.num_tokens == prefix + 16
    if extra:
        assert getattr(info, extra)


def test_data_config_follows_the_built_image_size() -> None:
    _, spec = load_model("deit_tiny", random_init=True, model_kwargs={"img_size": 64})
    assert spec.data_config["input_size"] == [3, 64, 64]


def test_local_dir_round_trip_and_rebuild(tmp_path: Path) -> None:
    original = tiny_vit()
    save_for_hf(original, tmp_path, model_args=TINY, safe_serialization=True)
    model, spec = load_model(f"local-dir:{tmp_path}")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
    rebuilt = build_model(ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix, nest", [(".safetensors", None), (".pth", None), (".pth", "model"), (".bin", "state_dict"), (".pt", "module_prefix")])
def test_checkpoint_round_trips(tmp_path: Path, suffix: str, nest: str | None) -> None:
    source = tiny_vit()
    torch.manual_seed(1)
    for p in source.parameters():
        p.data.normal_()
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    elif nest == "module_prefix":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save({nest: state, "epoch": 3} if nest else state, path)
    model, spec = load_model("deit_tiny", checkpoint=path, model_kwargs=_tiny_kwargs(), num_classes=5)
    assert spec.weights == "checkpoint"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_wrong_shaped_checkpoint_names_first_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit(num_classes=7).state_dict().items()}, path)
    with pytest.raises(ModelLoadError, match=r"tensor 'head.weight' has shape \(7, 32\) in the checkpoint but \(5, 32\).*--num-classes"):
        load_model("deit_tiny", checkpoint=path, model_kwargs=_tiny_kwargs(), num_classes=5)


def test_checkpoint_with_missing_or_extra_tensors(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in tiny_vit().state_dict().items()}
    missing = dict(state)
    missing.pop("pos_embed")
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="'pos_embed' is missing"):
        load_model("deit_tiny", checkpoint=tmp_path / "missing.safetensors", model_kwargs=_tiny_kwargs(), num_classes=5)
    save_file({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(ModelLoadError, match="unexpected tensor 'extra.weight'"):
        load_model("deit_tiny", checkpoint=tmp_path / "extra.safetensors", model_kwargs=_tiny_kwargs(), num_classes=5)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "cfg": object()}, path)
    with pytest.raises(ModelLoadError, match="weights-only"):
        read_state_dict(path)


def test_bad_checkpoint_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="unknown file type"):
        read_state_dict(tmp_path / "w.txt")
    (tmp_path / "w.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        read_state_dict(tmp_path / "w.safetensors")
    torch.save({"epoch": 1}, tmp_path / "no_tensors.pth")
    with pytest.raises(ModelLoadError, match="no state dict"):
        read_state_dict(tmp_path / "no_tensors.pth")


@pytest.mark.parametrize("name", ["deit_tiny", "hf-hub:timm/deit_tiny_patch16_224.fb_in1k"])
def test_offline_hub_gives_actionable_error_fast(name: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    message = str(info.value)
    assert "offline" in message and "--checkpoint" in message and "--random-init" in message
    assert time.perf_counter() - start < 10  # huggingface_hub alone retries for about a minute


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ModelLoadError, match="unknown model 'deit_smal'.*Did you mean: deit_small"):
        load_model("deit_smal", random_init=True)


def test_local_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(f"local-dir:{tmp_path}")


@pytest.mark.parametrize(
    "name, kwargs, reason",
    [
        ("resnet18", {}, "timm 'resnet' model"),
        ("vit_base_patch16_224", {"global_pool": "map"}, "global_pool='map'"),
        ("vit_base_patch16_224", {"dynamic_img_size": True}, "dynamic_img_size"),
    ],
)
def test_unsupported_models_say_why(name: str, kwargs: dict, reason: str) -> None:
    with pytest.raises(UnsupportedModelError, match=f"not supported: .*{reason}"):
        load_model(name, random_init=True, model_kwargs={**kwargs, **(_tiny_kwargs() if kwargs else {})})


def test_demo_model_is_shipped_and_loads_offline() -> None:
    assert (DEMO_DIR / "model.safetensors").is_file() and (DEMO_DIR / "card.json").is_file()
    model, spec = load_model("demo")
    card = json.loads((DEMO_DIR / "card.json").read_text())
    assert spec.weights == "pretrained" and spec.model_id == "demo"
    info = model_info(model)
    assert info.depth == card["model_args"]["depth"] and info.params == card["params"]
