"""Shared pieces of the CLI: consoles, error handling, progress and the options every stage takes.

The library never draws: its stages report through callbacks, ``log(message)`` and
``progress(done, total, text)``. Here ``note`` is both: called with a message it prints a note on
stderr, and ``note.progress`` draws a stage's progress (a rich bar on a terminal, a plain line every
5% with the ETA in a log file or CI job).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

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
            note.finish()
            fail(str(exc))
        except KeyboardInterrupt:
            note.finish()
            err.print("interrupted")
            raise typer.Exit(130)
        finally:
            note.finish()  # no bar outlives its command

    return wrapper  # type: ignore[return-value]


class ProgressView:
    """Draws ``progress(done, total, text)`` callbacks of one task after another.

    ``text`` reads ``"label: details"`` (``"analyzing attention"``, ``"epoch 2: loss 0.41 ..."``).
    A new task starts when ``total`` changes or ``done`` goes back; a task ends when ``done``
    reaches ``total`` (or at ``finish``). On a terminal each task is a rich bar (label, bar,
    done/total, rate per second, details, elapsed, ETA); elsewhere a plain line every 5% of the
    task and at its end: ``label done/total (rate/s): details, ETA m:ss``.
    """

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.clock = console, clock
        self._bar: Any = None
        self._task: Any = None
        self._total: Optional[int] = None
        self._done = 0
        self._first = 0
        self._start = 0.0
        self._bucket = -1

    def __call__(self, done: int, total: int, text: str = "") -> None:
        done, total = int(done), max(1, int(total))
        if self._total is None or total != self._total or done < self._done:
            self.finish()
            self._begin(done, total)
        self._done = done
        label, _, info = text.partition(": ")
        elapsed = max(self.clock() - self._start, 1e-9)
        rate = (done - self._first) / elapsed
        if self._bar is not None:
            self._bar.update(self._task, completed=done, label=escape(label), info=info, rate=f"{rate:.1f}/s" if done > self._first else "")
        elif done > self._first:
            every = max(1, total // 20)
            bucket = done // every
            if bucket != self._bucket or done >= total:
                self._bucket = bucket
                eta = (total - done) * elapsed / (done - self._first)
                details = f": {info}" if info else ""
                self.console.print(f"{label} {done}/{total} ({rate:.1f}/s){details}, ETA {int(eta) // 60}:{int(eta) % 60:02d}",
                                   markup=False, highlight=False, soft_wrap=True)
        if done >= total:
            self.finish()

    def _begin(self, done: int, total: int) -> None:
        self._total, self._done, self._first, self._start = total, done, done, self.clock()
        self._bucket = done // max(1, total // 20)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.fields[label]}", markup=True),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[info]}", markup=False),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(compact=True),
                console=self.console,
                transient=False,
            )
            self._task = self._bar.add_task("", total=total, completed=done, label="", info="", rate="")
            self._bar.start()

    def finish(self) -> None:
        """End the current task (its bar stays on screen)."""
        if self._bar is not None:
            self._bar.stop()
        self._bar, self._task, self._total = None, None, None


class Notes:
    """``note(message)``: a note on stderr (rich markup allowed). ``note.progress``: the progress
    callback the library's stages take (see ``ProgressView``); ``pipeline`` finds it on its ``log``."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = ProgressView(console)

    def __call__(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    def finish(self) -> None:
        self.progress.finish()


note = Notes(err)


def plain_note(message: str) -> None:
    """A note whose text is not rich markup (paths and names may hold brackets)."""
    note(escape(message))


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
