"""Interruptions survived: Ctrl-C (SIGINT) and SIGKILL during the real command, and two runs
writing into the same work folder.

Ctrl-C: exit code 130, one line (for compress: where the run can be resumed), no traceback, no
temporary or half-written file under a final name. SIGKILL during fine-tuning, then `--resume`:
the same weights as an uninterrupted run. A folder's lock (`_lock.exclusive`) stops a second run
at once and is taken over when its process is dead.

The in-process versions live elsewhere: `test_finetune.test_resume_equals_uninterrupted` (a
KeyboardInterrupt inside `finetune`, then resume) and `test_cli_compress` (`vitcompress finetune`
continuing a finished run); here the real process is signalled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_cli_errors import environment, make_inputs, run_cli, snapshot

from vitcompress._lock import LOCK_NAME, exclusive, lock_path
from vitcompress.errors import FolderInUseError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def fine_tune_args(inputs: Path, steps: int, workdir: str, output: str) -> list[str]:
    return ["compress", "demo", "--data", str(inputs / "tiny"), "--plan", str(inputs / "plan_ok.json"), "--steps", str(steps),
            "--checkpoint-every", "2", "--batch-size", "4", "--workers", "0", "--threads", "1", "--no-speed",
            "--workdir", workdir, "--output", output]


def _sigint_as_in_a_terminal() -> None:
    """In the child: Ctrl-C's default action. A shell that runs a job with ``&`` and no job control
    (a CI script, ``nohup ... &``) makes it ignore SIGINT, its children inherit that, and Python then
    installs no KeyboardInterrupt handler: Ctrl-C would not stop the run (it ends with 0, not 130)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Running:
    """A `python -m vitcompress ...` in its own process group, its stderr read line by line."""

    def __init__(self, args: list[str], cwd: Path, home: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "vitcompress", *args], cwd=cwd, env=environment(home),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                        preexec_fn=_sigint_as_in_a_terminal)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:  # type: ignore[union-attr]
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for(self, pattern: str, timeout: float = 180) -> str:
        """The first stderr line matching ``pattern`` (fails if the process ends or time runs out first)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                hit = next((line for line in self.lines if regex.search(line)), None)
                if hit is not None:
                    return hit
                if self.process.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"the command ended before {pattern!r}:\n" + "\n".join(self.lines))
                if time.monotonic() > deadline:
                    self.process.kill()
                    pytest.fail(f"no {pattern!r} within {timeout} s:\n" + "\n".join(self.lines))
                self._seen.wait(1.0)

    def signal(self, sig: int) -> None:
        """Like a Ctrl-C at a terminal: the whole process group (DataLoader workers included)."""
        if sig == signal.SIGINT:
            time.sleep(0.2)  # a person's Ctrl-C does not land within microseconds of a print
        os.killpg(self.process.pid, sig)

    def finish(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def _no_half_written_files(root: Path) -> None:
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")], "a temporary file was left behind"


def test_ctrl_c_during_analyze(tmp_path: Path) -> None:
    run = Running(["analyze", "demo", "--out", "out"], tmp_path, tmp_path)
    progress = run.wait_for(r"^analyzing attention \d+/256")
    run.signal(signal.SIGINT)
    assert run.finish() == 130
    after = run.lines[run.lines.index(progress) + 1:]
    after = [line for line in after if not line.startswith("analyzing attention ")]  # progress printed meanwhile
    assert after == ["interrupted"], run.lines
    assert not any("Traceback" in line for line in run.lines)
    assert not (tmp_path / "out" / "analysis.json").exists()  # written only whole, at the end
    _no_half_written_files(tmp_path)


def test_ctrl_c_during_fine_tuning_says_where_to_resume(inputs: Path, tmp_path: Path) -> None:
    from vitcompress.finetune import checkpoint_step

    run = Running(fine_tune_args(inputs, 400, "ft", "model.safetensors"), tmp_path, tmp_path)
    progress = run.wait_for(r"^epoch \d+ ([3-9]|\d\d+)/400")
    run.signal(signal.SIGINT)
    assert run.finish() == 130
    after = run.lines[run.lines.index(progress) + 1:]
    after = [line for line in after if not re.match(r"^epoch \d+", line)]  # progress printed meanwhile
    assert len(after) == 1, run.lines
    assert after[0].startswith("interrupted: no model file was written; the last checkpoint (step ")
    assert "`vitcompress finetune ft`" in after[0] and "--resume" in after[0]
    assert not any("Traceback" in line for line in run.lines)
    step = int(after[0].split("(step ")[1].split(")")[0])
    assert step >= 2 and checkpoint_step(tmp_path / "ft" / "checkpoint.safetensors") == step
    assert not (tmp_path / "model.safetensors").exists()
    assert not lock_path(tmp_path / "ft").exists()  # released on the way out
    _no_half_written_files(tmp_path)


def test_sigkill_then_resume_gives_the_uninterrupted_weights(inputs: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    steps = 20
    reference = run_cli(fine_tune_args(inputs, steps, "ft-a", "a.safetensors"), tmp_path, tmp_path)
    assert reference.returncode == 0, reference.stderr

    killed = Running(fine_tune_args(inputs, steps, "ft-b", "b.safetensors"), tmp_path, tmp_path)
    killed.wait_for(rf"^epoch \d+ [3-5]/{steps}")  # the checkpoint of step 2 is on disk
    killed.signal(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL, killed.lines
    assert not (tmp_path / "b.safetensors").exists()
    assert lock_path(tmp_path / "ft-b").exists()  # SIGKILL leaves the lock: its pid is dead now

    resumed = run_cli([*fine_tune_args(inputs, steps, "ft-b", "b.safetensors"), "--resume"], tmp_path, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    resumed_at = re.search(rf"resumed from \S+ at step (\d+)/{steps}", resumed.stderr)
    assert resumed_at and 2 <= int(resumed_at.group(1)) < steps, resumed.stderr
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys()
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert not lock_path(tmp_path / "ft-b").exists()
    _no_half_written_files(tmp_path)


# ---- one run per folder ----------------------------------------------------------------------
@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: its pid names no process now
    return process.pid


def _hold(folder: Path, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lock_path(folder).write_text(f"{pid}\n{os.uname().nodename}\n")


def test_a_live_lock_stops_a_second_run_at_once(tmp_path: Path, live_process: int) -> None:
    _hold(tmp_path / "work", live_process)
    with pytest.raises(FolderInUseError, match=f"in use by another vitcompress run \\(pid {live_process}\\)"):
        with exclusive(tmp_path / "work"):
            pytest.fail("entered a folder another live process holds")
    assert lock_path(tmp_path / "work").read_text().split()[0] == str(live_process)  # left alone


def test_a_dead_process_lock_is_taken_over_and_released(tmp_path: Path) -> None:
    _hold(tmp_path / "work", dead_pid())
    (tmp_path / "work" / ".checkpoint.safetensors.abcd1234.tmp").write_bytes(b"half")  # the dead run's
    with exclusive(tmp_path / "work", remove_temporaries=True) as lock:
        assert lock.read_text().split()[0] == str(os.getpid())
        assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [LOCK_NAME]
    assert not lock.exists()
    empty = tmp_path / "empty-lock"
    empty.mkdir()
    lock_path(empty).write_text("")  # its writer died between creating and writing it
    with exclusive(empty):
        pass


def test_two_runs_in_one_work_folder(inputs: Path, tmp_path: Path, live_process: int) -> None:
    (tmp_path / "ft").mkdir()
    run = {"model": "demo", "plan": {}, "data": "demo", "config": {}, "output": "m.safetensors"}
    (tmp_path / "ft" / "run.json").write_text(json.dumps(run))
    _hold(tmp_path / "ft", live_process)
    before = snapshot(tmp_path)
    for args in (fine_tune_args(inputs, 4, "ft", "m.safetensors"), ["finetune", "ft"]):
        started = time.monotonic()
        done = run_cli(args, tmp_path, tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"error: work folder ft is in use by another vitcompress run (pid {live_process})")
        assert f"delete {Path('ft') / LOCK_NAME}" in lines[0]
        assert time.monotonic() - started < 60  # at once: before the data, the analysis or the plan
        assert snapshot(tmp_path) == before
