"""The CLI's side of the progress callbacks: plain lines in logs, a rich bar on a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from vitcompress.cli._common import Notes, ProgressView


def _view(terminal: bool) -> tuple[ProgressView, io.StringIO, list[float]]:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=200)
    now = [0.0]
    return ProgressView(console, clock=lambda: now[0]), buffer, now


def test_plain_lines_every_5_percent_with_eta() -> None:
    view, buffer, now = _view(terminal=False)
    view(0, 40, "epoch 1")
    for step in range(1, 41):
        now[0] += 0.5
        view(step, 40, f"epoch {1 + (step - 1) // 20}: loss {1 / step:.3f}")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 20  # every 2 steps of 40
    assert lines[0] == "epoch 1 2/40 (2.0/s): loss 0.500, ETA 0:19"
    assert lines[-1].startswith("epoch 2 40/40 (2.0/s): loss 0.025, ETA 0:00")


def test_a_new_task_starts_when_the_total_changes_or_done_goes_back() -> None:
    view, buffer, now = _view(terminal=False)
    view(0, 2, "analyzing attention")
    now[0] += 1.0
    view(2, 2, "analyzing attention")
    view(5, 10, "epoch 1")  # resumed at step 5 of 10
    now[0] += 2.0
    view(10, 10, "epoch 1: loss 0.1")
    assert buffer.getvalue().splitlines() == [
        "analyzing attention 2/2 (2.0/s), ETA 0:00",
        "epoch 1 10/10 (2.5/s): loss 0.1, ETA 0:00",
    ]


def test_terminal_bar_starts_and_stops() -> None:
    view, buffer, now = _view(terminal=True)
    view(0, 4, "analyzing attention")
    assert view._bar is not None
    now[0] += 1.0
    view(2, 4, "analyzing attention")
    view.finish()  # e.g. a command ending early
    assert view._bar is None and "analyzing attention" in buffer.getvalue()


def test_notes_print_and_carry_the_progress_view() -> None:
    buffer = io.StringIO()
    note = Notes(Console(file=buffer, width=200))
    note("[bold]hello[/]")
    note.progress(1, 1, "done")
    note.finish()
    assert buffer.getvalue().splitlines()[0] == "hello"
