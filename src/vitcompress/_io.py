"""Atomic file writes: write to a temporary file beside the target, then rename.

A crash (or Ctrl-C) in the middle leaves the previous file intact and no half-written one."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is renamed onto ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


# The largest JSON file read_json parses (plans, analyses, run.json, config.json are kilobytes):
# a bigger one is refused before it is read, so a hostile file cannot make us parse gigabytes.
JSON_LIMIT = 16 * 1024 * 1024
# The temporary names atomic_path makes: ".<target name>.<8 random characters>.tmp".
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def read_json(path: str | os.PathLike, remedy: str, limit: int = JSON_LIMIT) -> Any:
    """Parse a JSON file we wrote; a corrupt one is a one-line error ending with ``remedy``.

    JSON is data: it is parsed, never evaluated. A file over ``limit`` bytes is refused unread."""
    from vitcompress.errors import VitcompressError

    size = Path(path).stat().st_size
    if size > limit:
        raise VitcompressError(
            f"{path} is {size / 2**20:.1f} MB, more than the {limit / 2**20:.0f} MB such a file ever needs: "
            f"refusing to parse it; {remedy}"
        )
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VitcompressError(f"{path} is not valid JSON ({exc}): {remedy}") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries ``atomic_path`` left in ``folder`` when a process died mid-write
    (SIGKILL, power loss). Call it only while no other writer can be using the folder (holding
    its lock). Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if _TEMPORARY.match(entry.name) and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed
