"""Shared pieces of the CLI: consoles, error handling and the options every stage takes."""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console

from vitcompress.errors import VitcompressError

# Tables and results go to stdout; progress, notes and errors to stderr, so `--json` stays clean.
# Piped into a file or a CI log, rich would squeeze tables into 80 columns: give them room instead.
_PIPED_WIDTH = None if os.environ.get("COLUMNS") else 160
out = Console(width=None if sys.stdout.isatty() else _PIPED_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() else _PIPED_WIDTH)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn the errors a user can fix into one line and exit code 2, instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except VitcompressError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)

    return wrapper  # type: ignore[return-value]


def note(message: str) -> None:
    err.print(message, highlight=False, soft_wrap=True)


# ---- options shared by several commands ------------------------------------------------------
ModelArg = Annotated[
    Optional[str],
    typer.Argument(
        help="Model: an alias (`vitcompress models`), a timm ViT name, hf-hub:ORG/NAME, "
        "local-dir:PATH, or `demo` (default, offline).",
        show_default=False,
    ),
]
CheckpointOpt = Annotated[
    Optional[str],
    typer.Option("--checkpoint", help="Local weights (.safetensors, or .pth/.bin loaded weights-only)."),
]
RandomInitOpt = Annotated[
    bool, typer.Option("--random-init", help="Skip pretrained weights (random init): fine for timing.")
]
NumClassesOpt = Annotated[
    Optional[int], typer.Option("--num-classes", help="Override the classifier size (e.g. to match a checkpoint).")
]
DataOpt = Annotated[
    Optional[str],
    typer.Option(
        "--data",
        help="Images: an image folder (class sub-folders), parquet/arrow data or a save_to_disk folder, "
        "a Hugging Face dataset id, or `demo`.",
    ),
]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Dataset split (default: test, then validation, then train).")]
ImageColumnOpt = Annotated[Optional[str], typer.Option("--image-column", help="Image column (default: detected).")]
LabelColumnOpt = Annotated[Optional[str], typer.Option("--label-column", help="Label column (default: detected).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", min=0, help="DataLoader worker processes (default: up to 4).")]


def model_or_demo(model: str | None) -> str:
    if model is None:
        note("no model named: using the built-in [bold]demo[/] model")
        return "demo"
    return model
