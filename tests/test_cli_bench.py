"""`vitcompress bench` end to end on tiny local models and a tiny exported compressed model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from timm.models import save_for_hf
from typer.testing import CliRunner

from conftest import TINY, tiny_vit
from vitcompress.cli import app

runner = CliRunner()
FAST = ["--batch-size", "1,2", "--warmup", "1", "--repeats", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two timm local-dir models (config.json + model.safetensors): depth 4 and depth 2."""
    names = []
    for depth in (4, 2):
        folder = tmp_path_factory.mktemp(f"tiny{depth}")
        save_for_hf(tiny_vit(depth=depth), folder, model_args={**TINY, "depth": depth}, safe_serialization=True)
        names.append(f"local-dir:{folder}")
    return names[0], names[1]


@pytest.fixture(scope="module")
def exported(tiny_dirs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compressed model file as `vitcompress compress` writes it (static layer 0, tokens 16 -> 5)."""
    from vitcompress.convert import convert
    from vitcompress.export import export
    from vitcompress.models import load_model
    from vitcompress.plan import Plan, Reduction

    model, spec = load_model(tiny_dirs[0])
    plan = Plan(static_layers=[0], reductions=[Reduction(2, [2, 1])], num_blocks=4, num_prefix_tokens=1, grid=(4, 4))
    path = tmp_path_factory.mktemp("export") / "tiny-compressed.safetensors"
    export(convert(model, plan), path, {"model": spec.to_dict(), "plan": plan.to_dict(), "data_config": spec.data_config})
    return path


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, ["bench", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stdout holds the JSON alone


def test_compressed_file_against_its_original(exported: Path) -> None:
    result = runner.invoke(app, ["bench", str(exported), *FAST, "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert "random weights" in result.stderr and "batch 2:" in result.stderr
    names = [m["name"] for m in d["models"]]
    assert names[1] == exported.name and names[0].endswith("(original)") and d["baseline"] == names[0]
    original, compressed = d["models"]
    assert compressed["flops"] < original["flops"] and compressed["input_size"] == [3, 32, 32]
    assert compressed["info"]["kind"] == "compressed" and original["info"]["weights"] == "random"
    assert {(m["model"], m["batch_size"]) for m in d["measurements"]} == {(n, b) for n in names for b in (1, 2)}
    assert all(m["speedup"] > 0 and m["ms_per_image"]["n"] == 2 for m in d["measurements"])
    assert d["settings"]["threads"] == 1


def test_accuracy_loads_the_original_weights(exported: Path) -> None:
    d = _json([str(exported), "--batch-size", "2", "--warmup", "0", "--repeats", "1", "--threads", "1",
               "--data", "demo", "--limit", "24", "--workers", "0"])  # fmt: skip
    original, compressed = d["models"]
    assert original["info"]["weights"] == "pretrained"  # read from the local-dir the file was made from
    assert original["eval_images"] == compressed["eval_images"] == 24
    assert original["agreement"] == 1.0 and 0.0 <= compressed["agreement"] <= 1.0
    assert original["top1"] is not None and compressed["top1"] is not None


def test_any_model_against_any_baseline_and_csv(tiny_dirs: tuple[str, str], tmp_path: Path) -> None:
    deep, shallow = tiny_dirs
    out = tmp_path / "bench.csv"
    for _ in range(2):
        result = runner.invoke(app, ["bench", shallow, "--baseline", deep, *FAST, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "ms/img" in result.stdout and "speed-up" in result.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 4 and out.read_text().count("timestamp,") == 1
    assert {r["baseline"] for r in rows} == {deep} and {r["model"] for r in rows} == {deep, shallow}
    assert all(r["threads"] == "1" for r in rows)


def test_single_model_alone(tiny_dirs: tuple[str, str]) -> None:
    d = _json([tiny_dirs[0], "--random-init", "--batch-size", "1", "--warmup", "0", "--repeats", "1", "--threads", "1"])
    assert d["baseline"] is None and len(d["models"]) == 1 and d["measurements"][0]["speedup"] is None
    assert d["models"][0]["info"]["weights"] == "random"


def test_demo_is_the_default_model() -> None:
    from vitcompress.models import DEMO_DIR

    if not (DEMO_DIR / "config.json").is_file():
        pytest.skip("the demo model's files are not in this checkout yet")
    result = runner.invoke(app, ["bench", "--batch-size", "1", "--warmup", "0", "--repeats", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "using the built-in demo model" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "float64"], "--dtype float64: unknown dtype"),
        (["--batch-size", "1,x"], "--batch-size"),
        (["--device", "quantum"], "--device quantum"),
        (["--baseline-checkpoint", "w.safetensors"], "--baseline-checkpoint needs --baseline"),
    ],
)
def test_bad_arguments_are_one_line_errors(tiny_dirs: tuple[str, str], args: list[str], message: str) -> None:
    result = runner.invoke(app, ["bench", tiny_dirs[0], "--random-init", "--repeats", "1", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_file_errors(tmp_path: Path, tiny_dirs: tuple[str, str], exported: Path) -> None:
    foreign = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_vit().state_dict(), str(foreign))
    cases = [
        (["bench", str(foreign)], "not a vitcompress model"),
        (["bench", str(tmp_path / "missing.safetensors")], "no such file"),
        (["bench", tiny_dirs[0], "--random-init", "--out", str(tmp_path)], "is a folder"),
        (["bench", str(exported), "--checkpoint", str(foreign)], "--checkpoint does not apply"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu(tiny_dirs: tuple[str, str]) -> None:
    result = runner.invoke(app, ["bench", tiny_dirs[0], "--random-init", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.stderr


def test_round_defaults_are_the_librarys() -> None:
    """The CLI spells the defaults itself (its --help imports no torch); they must be bench's."""
    import vitcompress.cli.bench as cli_bench
    from vitcompress.bench import DEFAULT_REPEATS, DEFAULT_WARMUP

    assert (cli_bench.DEFAULT_WARMUP, cli_bench.DEFAULT_REPEATS) == (DEFAULT_WARMUP, DEFAULT_REPEATS)
