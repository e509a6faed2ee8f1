"""Untrusted files run no code: weights are read only as safetensors or `torch.load(weights_only=True)`,
metadata is parsed as size-limited JSON data, and a model file's description cannot make the loader
import, download or read anything (see README, "Security")."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_cli_errors import run_cli

from vitcompress.convert import convert
from vitcompress.errors import CheckpointFormatError, UnsupportedModelError, VitcompressError
from vitcompress.export import METADATA_KEY, METADATA_LIMIT, export, load, read_metadata
from vitcompress.finetune import read_checkpoint
from vitcompress.models import ModelSpec, build_model
from vitcompress.plan_types import Plan, Reduction, load_plan

ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
PLAN = Plan(static_layers=[0], reductions=[Reduction(2, [2, 1])], num_blocks=4, num_prefix_tokens=1, grid=(4, 4))
EVIL_MODULE = "vitcompress_evil_probe"


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    spec = ModelSpec(model_id="tiny", architecture="deit_tiny_patch16_224", model_args=dict(ARGS), data_config={}, weights="random")
    torch.manual_seed(0)
    path = export(convert(build_model(spec), PLAN), tmp_path / "model.safetensors", {"model": spec.to_dict(), "plan": PLAN.to_dict()})
    assert load(path) is not None  # the untouched file loads
    return path


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module that, if anything imported it, would leave a marker file."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / f"{EVIL_MODULE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\nclass Model:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    return marker


def rewrite_model_metadata(path: Path, out: Path, **model: object) -> Path:
    meta = read_metadata(path)
    meta["model"] = {**meta["model"], **model}
    save_file(load_file(str(path)), str(out), metadata={METADATA_KEY: json.dumps(meta)})
    return out


@pytest.mark.parametrize(
    "change, why",
    [
        ({"architecture": "resnet18"}, "not a timm Vision Transformer"),
        ({"architecture": f"{EVIL_MODULE}.Model"}, "not a timm model name"),
        ({"architecture": "os.system"}, "not a timm model name"),
        ({"architecture": "hf-hub:someone/some-model"}, "not a timm model name"),  # would download
        ({"architecture": "local-dir:/etc"}, "not a timm model name"),  # would read another folder
        ({"model_args": {**ARGS, "checkpoint_path": "/tmp/other.pth"}}, "'checkpoint_path', which is not a VisionTransformer setting"),
        ({"model_args": {**ARGS, "pretrained_cfg_overlay": {"file": "/tmp/x"}}}, "not a VisionTransformer setting"),
        ({"model_args": {**ARGS, "act_layer": f"{EVIL_MODULE}.Model"}}, "only a timm layer name"),
    ],
    ids=["non-vit", "dotted-path", "os-system", "hf-hub", "local-dir", "checkpoint-path", "cfg-overlay", "layer-path"],
)
def test_a_model_file_cannot_name_code_to_run(exported: Path, evil_module: Path, tmp_path: Path, change: dict, why: str) -> None:
    path = rewrite_model_metadata(exported, tmp_path / "evil.safetensors", **change)
    with pytest.raises(UnsupportedModelError, match="refusing to build it|only a timm layer name") as caught:
        load(path)
    assert why in str(caught.value)
    assert not evil_module.exists() and EVIL_MODULE not in sys.modules


def test_cli_refuses_such_a_file_in_one_line(exported: Path, evil_module: Path, tmp_path: Path) -> None:
    path = rewrite_model_metadata(exported, tmp_path / "evil.safetensors", architecture=f"{EVIL_MODULE}.Model")
    for args in (["export", str(path), "--no-check"], ["bench", str(path), "--repeats", "1", "--warmup", "0", "--batch-size", "1"]):
        done = run_cli(args, tmp_path, tmp_path, PYTHONPATH=str(tmp_path / "lib"))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("error: the model description names architecture") and "refusing" in lines[0]
    assert not evil_module.exists()
    assert not (tmp_path / "evil.onnx").exists()


def test_a_pickle_that_runs_code_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class RunsCode:
        def __reduce__(self):  # unpickling this would call os.system("touch PWNED")
            import os

            return (os.system, (f"touch {marker}",))

    checkpoint = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": RunsCode()}, checkpoint)
    done = run_cli(["info", "demo", "--checkpoint", str(checkpoint)], tmp_path, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "could not be loaded weights-only" in lines[0] and ".safetensors" in lines[0]
    assert not marker.exists()


def _safetensors_with_header(path: Path, header: dict) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 8)
    return path


def test_oversized_metadata_is_refused_unparsed(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "__metadata__": {METADATA_KEY: "x" * (METADATA_LIMIT + 1)}}
    path = _safetensors_with_header(tmp_path / "big.safetensors", header)
    with pytest.raises(CheckpointFormatError, match="refusing to parse it"):
        read_metadata(path)
    done = run_cli(["export", str(path)], tmp_path, tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "refusing to parse it" in done.stderr


def test_metadata_is_data_not_code(exported: Path, tmp_path: Path) -> None:
    """JSON that would mean something if evaluated is kept as a string."""
    meta = read_metadata(exported)
    meta["note"] = "__import__('os').system('touch PWNED')"
    path = tmp_path / "m.safetensors"
    save_file(load_file(str(exported)), str(path), metadata={METADATA_KEY: json.dumps(meta)})
    assert load(path).vitcompress_metadata["note"] == meta["note"]
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_oversized_or_garbled_json_files_are_refused(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({**PLAN.to_dict(), "padding": "x" * (17 * 2**20)}))
    with pytest.raises(VitcompressError, match="refusing to parse it"):
        load_plan(plan)
    checkpoint = tmp_path / "checkpoint.safetensors"
    save_file({"model.w": torch.zeros(1)}, str(checkpoint), metadata={"vitcompress_checkpoint": "{not json"})
    with pytest.raises(CheckpointFormatError, match="not a JSON object"):
        read_checkpoint(checkpoint)
