"""Shared pieces of the CLI: consoles, error handling, progress and the options every stage takes.

The library never draws: its stages report through callbacks, ``log(message)`` and
``progress(done, total, text)``. Here ``note`` is both: called with a message it prints a note on
stderr, and ``note.progress`` draws a stage's progress (a rich bar on a terminal, a plain line every
5% with the ETA in a log file or CI job).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import time
from pathlib import Path
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


DEBUG_VARIABLE = "VITCOMPRESS_DEBUG"  # set to 1: print the traceback above each error line
# File-system errors the user can fix (a path, permissions, space); other OSErrors are bugs.
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                   errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.EFBIG}


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str, code: int = 2) -> None:
    """Print one error line (plain text, not rich markup) and exit."""
    err.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn the errors a user can fix into one line and exit code 2, instead of a traceback;
    Ctrl-C into one line and exit code 130. With VITCOMPRESS_DEBUG=1 the traceback comes first."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except VitcompressError as exc:
            note.finish()
            _traceback_if_debugging()
            fail(str(exc))
        except OSError as exc:
            if exc.errno not in _USER_OS_ERRORS or exc.filename is None:
                raise
            note.finish()
            _traceback_if_debugging()
            fail(f"{exc.filename}: {exc.strerror}: check the path, its permissions and the free space")
        except KeyboardInterrupt as exc:
            note.finish()
            _traceback_if_debugging()
            # Straight to stderr: the Ctrl-C may have landed inside a rich print, whose buffer would repeat.
            sys.stderr.write(f"interrupted: {one_line(str(exc))}\n" if str(exc) else "interrupted\n")
            sys.stderr.flush()
            raise typer.Exit(130) from None
        finally:
            note.finish()  # no bar outlives its command

    return wrapper  # type: ignore[return-value]


def _traceback_if_debugging() -> None:
    if debugging():
        import traceback

        traceback.print_exc(file=sys.stderr)


def usage_error_line(exc: Any) -> str:
    """Click's usage error (a bad option value, a missing argument) as one line, with where to look."""
    message = one_line(exc.format_message()) if hasattr(exc, "format_message") else one_line(str(exc))
    ctx = getattr(exc, "ctx", None)
    where = ""
    if ctx is not None:  # "python -m vitcompress analyze" -> "vitcompress analyze"
        root = ctx.find_root().info_name or ""
        where = f" (see `vitcompress{ctx.command_path[len(root):]} --help`)"
    return f"{message}{where}"


def check_output_file(path: Optional[Path], option: str) -> None:
    """An output file the user named must go into an existing folder we may write: say so before any work."""
    if path is not None:
        _check_folder(path.expanduser().parent, f"{option} {path}")


def check_output_folder(path: Optional[Path], option: str) -> None:
    """An output folder the user named may be created, inside an existing folder we may write."""
    if path is None:
        return
    folder = path.expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise VitcompressError(f"{option} {path} is a file: give a folder")
        _check_folder(folder, f"{option} {path}")
    else:
        _check_folder(folder.parent, f"{option} {path}")


def _check_folder(folder: Path, what: str) -> None:
    folder = folder if str(folder) else Path(".")
    if not folder.exists():
        raise VitcompressError(f"{what}: the folder {folder} does not exist: create it first or choose another path")
    if not folder.is_dir():
        raise VitcompressError(f"{what}: {folder} is a file, not a folder: choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VitcompressError(f"{what}: the folder {folder} is not writable: choose another path or fix its permissions")


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
SlowerAtBatch1Opt = Annotated[
    bool,
    typer.Option("--allow-slower-at-batch-1",
                 help="Keep a plan that is slower than the original at batch 1 (by default a plan measurably slower "
                      "there, its timing's upper quartile below 1.0x, e.g. from token merging's per-block "
                      "overhead, is set aside for the best one that is not)."),
]
RetimeOpt = Annotated[
    bool,
    typer.Option("--retime",
                 help="Time every candidate afresh. By default timings this machine stored for the same model, "
                      "deployment and vitcompress code (in $VITCOMPRESS_CACHE, else ~/.cache/vitcompress) are "
                      "reused, so the same command gives the same plan; what is measured is stored either way."),
]
AllowBelowOpt = Annotated[
    bool,
    typer.Option("--allow-below-budget",
                 help="If no plan meets the budget, go on with the fastest one (by default this is an error, exit 2)."),
]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", min=0, help="DataLoader worker processes (default: up to 4).")]


def model_or_demo(model: str | None) -> str:
    if model is None:
        note("no model named: using the built-in [bold]demo[/] model")
        return "demo"
    return model
