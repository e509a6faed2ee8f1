"""One writer per folder: a lock file that holds the writer's pid.

``exclusive(folder)`` creates ``folder/.vitcompress.lock`` with ``O_CREAT | O_EXCL`` (atomic: of
two processes, one wins) and writes its pid and host name into it; a second run that finds the lock
of a live process stops at once with a one-line ``FolderInUseError``. A lock whose process is dead
(killed with SIGKILL, a crash, a power cut) is taken over. Leaving the block removes the lock.
On request, temporaries that a dead writer left in the folder are removed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from vitcompress._io import remove_stale_temporaries
from vitcompress.errors import FolderInUseError

LOCK_NAME = ".vitcompress.lock"
_ATTEMPTS = 30
_FRESH_S = 2.0  # a lock file younger than this with no pid in it yet is being written


def lock_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / LOCK_NAME


def _host() -> str:
    return socket.gethostname()


def read_owner(lock: Path) -> tuple[Optional[int], str]:
    """(pid, host) written in a lock file; pid None when the file is unreadable or half-written."""
    try:
        lines = lock.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None, ""
    try:
        pid = int(lines[0].strip())
    except (IndexError, ValueError):
        return None, ""
    return pid, lines[1].strip() if len(lines) > 1 else ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _holder_alive(pid: Optional[int], host: str) -> bool:
    if pid is None:
        return False  # an empty or garbled lock: its writer died between creating and writing it
    if host and host != _host():
        return True  # another machine's process (shared file system): we cannot tell, so respect it
    # Our own pid in a lock we did not take is a dead run's whose pid came back (a container restart).
    return pid != os.getpid() and pid_alive(pid)


def _age(lock: Path) -> float:
    try:
        return time.time() - lock.stat().st_mtime
    except OSError:
        return 0.0


def _try_create(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n{_host()}\n")
    return True


def _take_over(lock: Path, stale_pid: Optional[int]) -> None:
    """Remove a dead writer's lock without removing a live one that replaced it meanwhile: move it
    aside under a name of our own (only one racer can), check it is still the dead writer's, and
    put it back if it is not."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return  # another process took it over first
    if read_owner(aside)[0] != stale_pid:
        with contextlib.suppress(OSError):
            os.link(aside, lock)  # fails (and leaves the newer lock) if one exists already
    with contextlib.suppress(OSError):
        aside.unlink()


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike, what: str = "folder", remove_temporaries: bool = False) -> Iterator[Path]:
    """Hold ``folder``'s lock inside the block (the folder is created if needed).

    Raises ``FolderInUseError`` at once when a live process holds it; takes over the lock of a
    dead one. Yields the lock file's path. Folders created here and still empty at the end are removed.
    ``remove_temporaries``: delete what a dead writer's ``atomic_path`` left in the folder (only
    for a folder no one writes into without its lock)."""
    target = Path(folder)
    created = [target, *target.parents]
    created = created[: next(i for i, f in enumerate(created) if f.exists() or f == f.parent)]  # made here
    target.mkdir(parents=True, exist_ok=True)
    lock = lock_path(target)
    for _ in range(_ATTEMPTS):
        if _try_create(lock):
            break
        pid, host = read_owner(lock)
        if pid is None and _age(lock) < _FRESH_S:
            time.sleep(0.1)  # just created by another process, which is writing its pid into it
            continue
        if _holder_alive(pid, host):
            where = f" on {host}" if host and host != _host() else ""
            raise FolderInUseError(
                f"{what} {target} is in use by another vitcompress run (pid {pid}{where}): wait for it to finish "
                f"or write elsewhere; if no such run is going on, delete {lock}"
            )
        _take_over(lock, pid)
    else:
        raise FolderInUseError(f"could not take the lock {lock} (other runs keep taking it): try again")
    try:
        if remove_temporaries:
            remove_stale_temporaries(target)
        yield lock
    finally:
        if read_owner(lock)[0] == os.getpid():
            with contextlib.suppress(OSError):
                lock.unlink()
        for made in created:  # a run that stopped early leaves no empty folders behind
            try:
                made.rmdir()  # only if empty
            except OSError:
                break


__all__ = ["LOCK_NAME", "exclusive", "lock_path", "pid_alive", "read_owner"]
