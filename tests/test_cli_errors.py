"""Every bad input is answered by the real command: exit code 2, one `error:` line that says what
was wrong and how to fix it, no traceback, and nothing that was already in the output folder changed.

Each case runs `python -m vitcompress ...` in a subprocess, in a fresh folder that already holds
a previous run's files (their bytes and modification times are compared before and after). Most
cases fail before torch or timm load; the rest load only the offline demo model.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from vitcompress.plan_types import Plan, Reduction

# The demo model: 8 blocks, 8x8 patch grid, one class token, 10 classes.
GOOD_PLAN = Plan(static_layers=[0, 1], reductions=[Reduction(4, [4, 2, 1])], num_blocks=8, num_prefix_tokens=1, grid=(8, 8))


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_inputs(root: Path) -> Path:
    """Small bad (and one good) inputs under ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "empty").mkdir(parents=True)
    (root / "flat").mkdir()
    for i in range(3):
        (root / "flat" / f"{i}.png").write_bytes(_png(60 * i))  # images, but no class sub-folders
    pq.write_table(pa.table({"a": [1, 2, 3], "label": [0, 1, 2]}), root / "noimage.parquet")
    (root / "badlabels").mkdir()
    for split, n in (("train", 16), ("test", 4)):  # two splits, labels 0..75 for a 10-class model
        images = [{"bytes": _png(10 * i), "path": None} for i in range(n)]
        pq.write_table(pa.table({"image": images, "label": [5 * i for i in range(n)]}), root / "badlabels" / f"{split}.parquet")
    for split, n in (("train", 8), ("test", 2)):
        for label in ("0", "1"):
            folder = root / "tiny" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.png").write_bytes(_png(20 * i + 100 * int(label)))
    good = GOOD_PLAN.to_dict()
    (root / "plan_ok.json").write_text(json.dumps(good))
    (root / "plan_blocks.json").write_text(json.dumps({**good, "static_layers": [0, 50]}))
    (root / "plan_scales.json").write_text(json.dumps({**good, "reductions": [{"before_block": 4, "scales": []}]}))
    (root / "plan_cut.json").write_text(json.dumps(good)[:60])
    (root / "plan_other.json").write_text(json.dumps({**good, "num_blocks": 12, "grid": [14, 14]}))
    (root / "notsafetensors.safetensors").write_text("this is text")
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(2)}, str(root / "foreign.safetensors"))
    (root / "finetune_cut").mkdir()
    (root / "finetune_cut" / "run.json").write_text('{"model": "demo", "pla')
    (root / "finetune_incomplete").mkdir()
    (root / "finetune_incomplete" / "run.json").write_text('{"model": "demo"}')
    (root / "readonly").mkdir()
    (root / "readonly").chmod(0o500)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def environment(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VITCOMPRESS_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(home / "datasets-cache"),
               COLUMNS="200", OMP_NUM_THREADS="1", **extra)
    return env


def run_cli(args: list[str], cwd: Path, home: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitcompress", *args], cwd=cwd, env=environment(home, **env),
                          capture_output=True, text=True, timeout=timeout)


def previous_run(cwd: Path) -> None:
    """What an earlier run left: files in the output and work folders (names no case reads)."""
    out = cwd / "vitcompress-out" / "demo"
    (out / "finetune").mkdir(parents=True)
    (out / "earlier-notes.txt").write_text("from an earlier run\n")
    (out / "finetune" / "earlier.bin").write_bytes(b"\x00" * 64)
    (cwd / "vitcompress-out" / "other-model").mkdir()
    (cwd / "vitcompress-out" / "other-model" / "keep.json").write_text("{}")


def snapshot(root: Path) -> dict[str, tuple[Optional[bytes], int]]:
    """Every path under ``root``: a file's bytes and modification time; a folder's existence."""
    shot: dict[str, tuple[Optional[bytes], int]] = {}
    for path in sorted(root.rglob("*")):
        is_file = path.is_file()
        shot[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_mtime_ns) if is_file else (None, 0)
    return shot


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# (id, command line, texts the error line must hold: the problem, then the fix). "{in}" is the
# inputs folder; "{ro}" a folder without write permission.
CASES = [
    # misspelt names
    ("info-misspelt-alias", "info deit_smal", ["unknown model 'deit_smal'", "deit_small"]),
    ("analyze-misspelt-alias", "analyze deit_smal", ["unknown model 'deit_smal'", "deit_small"]),
    ("plan-misspelt-alias", "plan deit_smal --no-calibrate", ["unknown model 'deit_smal'", "deit_small"]),
    ("compress-misspelt-alias", "compress deit_smal --data {in}/tiny", ["unknown model 'deit_smal'", "deit_small"]),
    ("bench-misspelt-alias", "bench deit_smal", ["unknown model 'deit_smal'", "deit_small"]),
    ("info-missing-checkpoint", "info demo --checkpoint {in}/nope.pth", ["checkpoint not found", "--checkpoint"]),
    # every wrong --budget form
    ("plan-budget-2", "plan demo --budget 2", ["budget '2'", "2x"]),
    ("plan-budget-x2", "plan demo --budget x2", ["budget 'x2'", "2x"]),
    ("plan-budget-0x", "plan demo --budget 0x", ["budget 0x", "more than 1x"]),
    ("plan-budget-1x", "plan demo --budget 1x", ["budget 1x", "more than 1x"]),
    ("plan-budget-minus1x", "plan demo --budget=-1x", ["budget '-1x'", "more than 1x"]),
    ("plan-budget-150pct", "plan demo --budget 150%", ["budget '150%'", "between 0% and 100%"]),
    ("plan-budget-nanx", "plan demo --budget nanx", ["budget 'nanx'", "2x"]),
    ("compress-budget-2", "compress demo --budget 2", ["budget '2'", "2x"]),
    ("compress-budget-150pct", "compress demo --budget 150%", ["budget '150%'", "between 0% and 100%"]),
    # --method
    ("plan-method", "plan demo --method nonsense", ["--method 'nonsense'", "dgssa-glad"]),
    ("compress-method", "compress demo --method nonsense", ["--method 'nonsense'", "dgssa-glad"]),
    ("compress-device", "compress demo --device nonsense", ["--device nonsense", "use cpu or cuda"]),
    # --data
    ("analyze-data-empty", "analyze demo --data {in}/empty", ["no class sub-folders", "ROOT/CLASS/image.jpg"]),
    ("analyze-data-missing", "analyze demo --data {in}/missing", ["no such file or folder", "Hugging Face dataset id"]),
    ("analyze-data-flat", "analyze demo --data {in}/flat", ["no class sub-folders", "ROOT/CLASS/image.jpg"]),
    ("analyze-parquet-no-image", "analyze demo --data {in}/noimage.parquet", ["no image column", "--image-column"]),
    ("plan-data-empty", "plan demo --data {in}/empty --no-calibrate", ["no class sub-folders", "ROOT/CLASS/image.jpg"]),
    ("compress-data-empty", "compress demo --data {in}/empty", ["no class sub-folders", "ROOT/CLASS/image.jpg"]),
    ("compress-data-missing", "compress demo --data /nonexistent/images", ["no such file or folder", "dataset id"]),
    ("compress-parquet-no-image", "compress demo --data {in}/noimage.parquet", ["no image column", "--image-column"]),
    ("compress-labels-out-of-range", "compress demo --data {in}/badlabels --batch-size 4 --plan {in}/plan_ok.json",
     ["labels go up to 75", "10 classes"]),
    ("compress-batch-larger-than-data", "compress demo --data {in}/tiny --plan {in}/plan_ok.json --batch-size 64",
     ["16 images, fewer than one global batch of 64", "lower --batch-size"]),
    ("bench-data-empty", "bench demo --data {in}/empty --repeats 1", ["no class sub-folders", "ROOT/CLASS/image.jpg"]),
    # counts
    ("analyze-samples-0", "analyze demo --samples 0", ["'--samples'", "greater than or equal to 1"]),
    ("compress-samples-0", "compress demo --samples 0", ["'--samples'", "greater than or equal to 1"]),
    ("compress-steps-0", "compress demo --steps 0", ["'--steps'", "greater than or equal to 1"]),
    ("bench-batch-size-0", "bench demo --batch-size 0", ["--batch-size '0'", "positive integers"]),
    ("bench-dtype", "bench demo --dtype float8", ["--dtype float8", "float32"]),
    # plan files
    ("compress-plan-missing", "compress demo --plan {in}/nope.json", ["no plan at", "vitcompress plan"]),
    ("compress-plan-blocks", "compress demo --plan {in}/plan_blocks.json", ["50 names a block", "make the plan again"]),
    ("compress-plan-empty-scales", "compress demo --plan {in}/plan_scales.json", ["pyramid scales []", "[7, 3, 1]"]),
    ("compress-plan-cut-off", "compress demo --plan {in}/plan_cut.json", ["not valid JSON", "make the plan again"]),
    ("compress-plan-other-model", "compress demo --data {in}/tiny --batch-size 4 --plan {in}/plan_other.json",
     ["made for a model with 12 blocks", "make the plan for this model"]),
    # output paths
    ("compress-output-missing-folder", "compress demo --output /nonexistent/x.safetensors", ["/nonexistent does not exist", "create it"]),
    ("compress-output-readonly", "compress demo --output {ro}/x.safetensors", ["not writable", "choose another path"]),
    ("compress-workdir-missing-folder", "compress demo --workdir /nonexistent/ft", ["/nonexistent does not exist", "create it"]),
    ("analyze-out-missing-folder", "analyze demo --out /nonexistent/out", ["/nonexistent does not exist", "create it"]),
    ("analyze-out-readonly", "analyze demo --out {ro}/out", ["not writable", "choose another path"]),
    ("plan-out-missing-folder", "plan demo --out /nonexistent/out", ["/nonexistent does not exist", "create it"]),
    ("bench-out-missing-folder", "bench demo --out /nonexistent/x.csv", ["/nonexistent does not exist", "create it"]),
    ("export-onnx-missing-folder", "export {in}/foreign.safetensors --onnx /nonexistent/x.onnx", ["/nonexistent does not exist", "create it"]),
    ("finetune-output-missing-folder", "finetune {in}/empty --output /nonexistent/x.safetensors", ["/nonexistent does not exist", "create it"]),
    # model files and work folders
    ("export-missing-file", "export {in}/nope.safetensors", ["nope.safetensors: no such file"]),
    ("export-not-safetensors", "export {in}/notsafetensors.safetensors", ["is not a safetensors file"]),
    ("export-foreign-safetensors", "export {in}/foreign.safetensors", ["not a vitcompress model", "vitcompress compress"]),
    ("finetune-not-a-run", "finetune {in}/empty", ["holds no run.json", "not a vitcompress fine-tuning folder"]),
    ("finetune-missing-folder", "finetune {in}/missing", ["no such folder", "work folder"]),
    ("finetune-cut-run-file", "finetune {in}/finetune_cut", ["not valid JSON", "vitcompress compress"]),
    ("finetune-incomplete-run-file", "finetune {in}/finetune_incomplete", ["lacks plan, data, config, output", "vitcompress compress"]),
    # the command line itself
    ("unknown-command", "compres demo", ["No such command 'compres'", "--help"]),
]


@pytest.mark.parametrize("command, expected", [pytest.param(c, e, id=i) for i, c, e in CASES])
def test_bad_input_is_one_line_and_changes_nothing(command: str, expected: list[str], inputs: Path, tmp_path: Path) -> None:
    if "{ro}" in command and _running_as_root():
        pytest.skip("running as root: a chmod 0o500 folder does not stop root's writes, so there is nothing to refuse")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    previous_run(cwd)
    before = snapshot(cwd)
    args = [a.replace("{in}", str(inputs)).replace("{ro}", str(inputs / "readonly")) for a in command.split()]
    done = run_cli(args, cwd, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert snapshot(cwd) == before
    assert not Path("/nonexistent").exists()


def test_debug_variable_shows_the_traceback(tmp_path: Path) -> None:
    done = run_cli(["plan", "demo", "--budget", "2"], tmp_path, tmp_path, VITCOMPRESS_DEBUG="1")
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "VitcompressError" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: budget '2'")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(inputs: Path, tmp_path: Path) -> None:
    from vitcompress.finetune import checkpoint_step

    done = run_cli(["compress", "demo", "--data", str(inputs / "tiny"), "--plan", str(inputs / "plan_ok.json"), "--lr", "1e6",
                    "--steps", "6", "--checkpoint-every", "1", "--batch-size", "4", "--workers", "0", "--threads", "1",
                    "--no-speed", "--workdir", "ft"], tmp_path, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: fine-tuning diverged at step ") and "--lr 1e+06" in last, last
    assert "last good checkpoint" in last and "no model file was written" in last
    failed_at = int(last.split("at step ")[1].split()[0])
    assert checkpoint_step(tmp_path / "ft" / "checkpoint.safetensors") == failed_at - 1
    assert not (tmp_path / "vitcompress-out" / "demo" / "model.safetensors").exists()
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.lock"))
