"""`vitcompress --help` and `vitcompress models` start without importing torch or timm.

Each check runs in a fresh interpreter (this test process has torch loaded already). The heavy
stack is imported inside the command functions that need it; option defaults are plain values.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

CHECK = """
import json, sys
from typer.testing import CliRunner
from vitcompress.cli import app
result = CliRunner().invoke(app, {args!r})
heavy = sorted(m for m in ("torch", "timm", "torchvision", "safetensors", "datasets") if m in sys.modules)
print(json.dumps({{"exit_code": result.exit_code, "output": result.output, "heavy": heavy}}))
"""


def _run(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHECK.format(args=args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["models"], ["bench", "--help"], ["compress", "--help"]])
def test_light_commands_import_neither_torch_nor_timm(args: list[str]) -> None:
    result = _run(args)
    assert result["exit_code"] == 0, result["output"]
    assert result["heavy"] == [], f"`vitcompress {' '.join(args)}` imported {result['heavy']}"


def test_models_lists_the_aliases_without_timm() -> None:
    result = _run(["models"])
    assert "deit_small_patch16_224" in result["output"] and "demo" in result["output"]


def test_the_installed_command_answers_help() -> None:
    exe = shutil.which("vitcompress")
    command = [exe, "--help"] if exe else [sys.executable, "-m", "vitcompress", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "analyze" in done.stdout and "compress" in done.stdout and "bench" in done.stdout


def test_importing_the_package_is_light_and_names_resolve_on_use() -> None:
    code = ("import sys, vitcompress; light = 'torch' not in sys.modules; "
            "from vitcompress.analyze import save_analysis; "
            "print(light, callable(vitcompress.analyze), vitcompress.Plan.__name__, vitcompress.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # light at import; `vitcompress.analyze` stays the function after its submodule is imported
    assert done.stdout.split() == ["True", "True", "Plan", "0.1.0"]
