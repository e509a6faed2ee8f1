"""Export to one .safetensors file, `load` from it alone, ONNX export."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vitcompress.convert import convert, glad_modules, static_attention_modules
from vitcompress.errors import CheckpointFormatError, VitcompressError
from vitcompress.export import FORMAT_VERSION, METADATA_KEY, export, export_onnx, load, read_metadata, state_tensors
from vitcompress.models import ModelSpec, build_model
from vitcompress.plan import Plan, Reduction

BASE_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
VARIANTS = {
    "deit": ("deit_tiny_patch16_224", {}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),  # 2 prefix tokens
    "layerscale": ("deit3_small_patch16_224", {}),  # DeiT-III LayerScale
    "registers_avg": ("vit_small_patch16_224", {"reg_tokens": 4, "global_pool": "avg", "class_token": False}),
}


def compressed(variant: str = "deit") -> tuple[torch.nn.Module, dict]:
    """A converted tiny ViT whose new parameters are moved off their initial values."""
    arch, extra = VARIANTS[variant]
    spec = ModelSpec(model_id=f"tiny-{variant}", architecture=arch, model_args={**BASE_ARGS, **extra},
                     data_config={"input_size": [3, 32, 32]}, weights="random")
    torch.manual_seed(0)
    teacher = build_model(spec)
    plan = Plan(static_layers=[0, 1], reductions=[Reduction(2, [2, 1])], num_blocks=4,
                num_prefix_tokens=int(teacher.num_prefix_tokens), grid=(4, 4))
    student = convert(teacher, plan)
    with torch.no_grad():
        for m in static_attention_modules(student).values():
            m.logits.normal_()
        for g in glad_modules(student).values():
            g.weight.add_(0.1 * torch.randn_like(g.weight))
    meta = {"model": spec.to_dict(), "data_config": spec.data_config, "plan": plan.to_dict(), "teacher_top1": 0.5}
    return student.eval(), meta


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reload_equals_original(tmp_path: Path, variant: str) -> None:
    student, meta = compressed(variant)
    path = export(student, tmp_path / "m.safetensors", meta)
    loaded = load(path)
    assert not loaded.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        diff = (loaded(x) - student(x)).abs().max().item()
    assert diff < 1e-5
    assert sorted(static_attention_modules(loaded)) == [0, 1]
    assert sorted(glad_modules(loaded)) == [2]
    assert loaded.vitcompress_metadata["plan"] == meta["plan"]
    assert loaded.vitcompress_metadata["teacher_top1"] == 0.5


def test_metadata_contents(tmp_path: Path) -> None:
    student, meta = compressed()
    path = export(student, tmp_path / "m.safetensors", meta)
    read = read_metadata(path)
    assert read["format_version"] == FORMAT_VERSION
    assert read["vitcompress_version"]
    assert read["model"] == meta["model"] and read["data_config"] == meta["data_config"]


def test_existing_output_needs_force(tmp_path: Path) -> None:
    student, meta = compressed()
    path = tmp_path / "m.safetensors"
    export(student, path, meta)
    before = path.read_bytes()
    other, _ = compressed("distilled")
    with pytest.raises(VitcompressError, match="--force"):
        export(other, path, meta)
    assert path.read_bytes() == before
    export(student, path, {**meta, "teacher_top1": 0.25}, force=True)
    assert read_metadata(path)["teacher_top1"] == 0.25
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_failed_write_leaves_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    student, meta = compressed()
    path = export(student, tmp_path / "m.safetensors", meta)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError):
        export(student, path, meta, force=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_export_requires_plan_and_model(tmp_path: Path) -> None:
    student, meta = compressed()
    with pytest.raises(VitcompressError, match="plan"):
        export(student, tmp_path / "m.safetensors", {"model": meta["model"]})


@pytest.mark.parametrize("keep", ["header_length", "half_header", "half_data", "all_but_one"])
def test_truncated_file_rejected(tmp_path: Path, keep: str) -> None:
    student, meta = compressed()
    data = export(student, tmp_path / "m.safetensors", meta).read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    cut = {
        "header_length": 5,
        "half_header": 8 + header_len // 2,
        "half_data": 8 + header_len + (len(data) - 8 - header_len) // 2,
        "all_but_one": len(data) - 1,
    }[keep]
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(CheckpointFormatError, match="truncated|not a safetensors"):
        load(bad)


def test_foreign_files_rejected(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain), metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match="not a vitcompress model"):
        load(plain)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a model at all")
    with pytest.raises(CheckpointFormatError, match="not a safetensors file"):
        load(text)
    with pytest.raises(CheckpointFormatError, match="no such file"):
        load(tmp_path / "missing.safetensors")


def test_newer_format_rejected(tmp_path: Path) -> None:
    student, meta = compressed()
    newer = {"format_version": FORMAT_VERSION + 1, "vitcompress_version": "99.0", **meta}
    path = tmp_path / "newer.safetensors"
    save_file(state_tensors(student.state_dict()), str(path), metadata={METADATA_KEY: json.dumps(newer)})
    with pytest.raises(CheckpointFormatError, match="newer.*upgrade vitcompress"):
        load(path)


def test_weights_not_matching_metadata_rejected(tmp_path: Path) -> None:
    student, meta = compressed()
    other_plan = Plan(static_layers=[0], reductions=[], num_blocks=4, num_prefix_tokens=1, grid=(4, 4))
    path = export(student, tmp_path / "m.safetensors", {**meta, "plan": other_plan.to_dict()})
    with pytest.raises(CheckpointFormatError, match="do not fit"):
        load(path)


def test_state_tensors_copies_shared_storage() -> None:
    base = torch.arange(6.0)
    state = {"a": base, "b": base, "view": base[2:4]}
    out = state_tensors(state)
    assert out["a"].untyped_storage().data_ptr() != out["b"].untyped_storage().data_ptr()
    assert torch.equal(out["view"], base[2:4]) and out["view"].untyped_storage().nbytes() == 2 * 4
    save_file(out, "/dev/null")  # safetensors accepts it


def test_onnx_matches_pytorch(tmp_path: Path) -> None:
    import onnxruntime as ort

    student, meta = compressed("distilled")
    path = export(student, tmp_path / "m.safetensors", meta)
    model = load(path)
    onnx_path = tmp_path / "m.onnx"
    result = export_onnx(model, onnx_path)
    assert result["max_abs_diff"] is not None and result["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (2, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 3, 32, 32)
        got = session.run(["logits"], {"images": x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4
    with pytest.raises(VitcompressError, match="--force"):
        export_onnx(model, onnx_path)


def _tome_student(variant: str, extra_plan: dict | None = None) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    arch, extra = VARIANTS[variant]
    spec = ModelSpec(model_id=f"tiny-{variant}", architecture=arch, model_args={**BASE_ARGS, "img_size": 64, **extra},
                     data_config={"input_size": [3, 64, 64]}, weights="random")
    torch.manual_seed(0)
    teacher = build_model(spec).eval()
    prefix = int(teacher.num_prefix_tokens)
    plan = Plan(num_blocks=4, num_prefix_tokens=prefix, grid=(8, 8), merge_r=[8, 6, 4, 2], method="tome",
                **(extra_plan or {}))
    student = convert(teacher, plan).eval()
    meta = {"model": spec.to_dict(), "data_config": spec.data_config, "plan": plan.to_dict()}
    return teacher, student, meta


@pytest.mark.parametrize("variant", ["deit", "distilled", "layerscale", "registers_avg"])
def test_token_merging_converts_exports_reloads_and_matches(tmp_path: Path, variant: str) -> None:
    teacher, student, meta = _tome_student(variant)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = student(x)
        assert not torch.allclose(expected, teacher(x))  # merging changed something
    path = export(student, tmp_path / "tome.safetensors", meta)
    reloaded = load(path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
    from vitcompress.modules.tome import tome_schedule

    assert tome_schedule(reloaded) == [8, 6, 4, 2]


def test_onnx_of_a_token_merging_model_matches_pytorch(tmp_path: Path) -> None:
    # The matching used a stable sort, which the ONNX exporter does not have (it failed inside torch).
    import onnxruntime as ort

    _, student, meta = _tome_student("distilled")
    model = load(export(student, tmp_path / "tome.safetensors", meta))
    result = export_onnx(model, tmp_path / "tome.onnx")
    assert result["max_abs_diff"] is not None and result["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "tome.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 64, 64)  # another batch size than the traced one
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(session.run(["logits"], {"images": x.numpy()})[0] - expected).max() <= 1e-4


def test_token_merging_with_r_zero_is_the_original(tmp_path: Path) -> None:
    teacher, _, _ = _tome_student("layerscale")
    plan = Plan(num_blocks=4, num_prefix_tokens=1, grid=(8, 8), merge_r=[0, 0, 0, 0])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(convert(teacher, plan)(x), teacher(x), rtol=0, atol=0)


def test_proportional_glad_plan_reloads_and_matches(tmp_path: Path) -> None:
    student, meta = compressed("deit")
    plan = Plan.from_dict({**meta["plan"], "proportional_attention": True})
    teacher = build_model(ModelSpec.from_dict(meta["model"])).eval()
    sized = convert(teacher, plan).eval()
    x = torch.randn(2, 3, 32, 32)
    path = export(sized, tmp_path / "sized.safetensors", {**meta, "plan": plan.to_dict()})
    with torch.no_grad():
        torch.testing.assert_close(load(path)(x), sized(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["simplex", "adaptive"])
def test_glad_modes_reload_and_match(tmp_path: Path, mode: str) -> None:
    _, meta = compressed("deit")
    plan = Plan.from_dict({**meta["plan"], "glad_mode": mode})
    teacher = build_model(ModelSpec.from_dict(meta["model"])).eval()
    student = convert(teacher, plan).eval()
    with torch.no_grad():  # move every new parameter off its initial value
        for g in glad_modules(student).values():
            for p in g.parameters():
                p.add_(0.1 * torch.randn_like(p))
    path = export(student, tmp_path / f"{mode}.safetensors", {**meta, "plan": plan.to_dict()})
    loaded = load(path)
    assert glad_modules(loaded)[2].mode == mode
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x), rtol=0, atol=0)
