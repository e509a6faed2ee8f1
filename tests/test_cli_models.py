from __future__ import annotations

import json

from typer.testing import CliRunner

from vitcompress.cli import app

runner = CliRunner()


def test_help_lists_the_pipeline() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "info"):
        assert command in result.output


def test_models_lists_aliases_and_demo() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "deit_small_patch16_224" in result.output and "demo" in result.output


def test_info_random_init_json() -> None:
    result = runner.invoke(app, ["info", "deit_small", "--random-init", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["num_tokens"] == 197 and info["num_heads"] == 6 and info["depth"] == 12 and info["weights"] == "random"


def test_info_demo_is_the_default() -> None:
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "using the built-in demo model" in result.stderr
    assert "prefix tokens" in result.stdout


def test_errors_are_one_line_with_exit_code_2() -> None:
    for args, text in [
        (["info", "deit_smal", "--random-init"], "unknown model 'deit_smal'"),
        (["info", "deit_tiny"], "cannot get pretrained weights"),
        (["info", "resnet18", "--random-init"], "not supported"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, args
        assert text in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
