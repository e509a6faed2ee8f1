"""Timings this machine measured before, kept and reused, so that the same command on the same
machine gives the same plan.

Why a cache, not a sharper timing: the planner's candidates are dense (token-merging schedules for
every total, neighbours 1-2% apart in speed), while the same plan's timing moves 2-3% between
processes. Whatever rule decides on a fresh timing, some candidate sits within that of the budget
or the batch-1 floor, and two runs then choose differently: on the CIFAR-10 teacher (AMD VM,
2026-12-08) r=[23, 0, 0, 21, ...] timed 2.54x in one run of `plan --budget 2.5x` and 2.49x in the
next, which then took another plan (docs/RESULTS.md). Reusing the first run's timings makes the
second run take every decision the first took. It is what TensorRT's timing cache and torch's
autotuning caches do; ``--retime`` measures afresh (and stores what it measured).

A cache file holds the timings of one *context*, everything a timing depends on besides the
request: the device's model name and this machine's CPU count, the device and thread count, the
torch and timm versions, vitcompress's own source (a hash of its files: a change to a module's
code may change its speed) and the model's architecture (parameter and buffer names, shapes and
dtypes, and the input size; not the weights, which do not change a timing). An entry maps one
request (what was timed, batch size, seconds, the plan's structure) to its result. A cache that
cannot be read is set aside with a note and rebuilt; one that cannot be written leaves the plan
as it is, measured afresh next time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from vitcompress._io import read_json, write_json_atomic
from vitcompress.errors import VitcompressError
from vitcompress.timing import device_name

CACHE_ENV = "VITCOMPRESS_CACHE"  # the folder caches go in (default: $XDG_CACHE_HOME/vitcompress or ~/.cache/vitcompress)
CACHE_VERSION = 1
Log = Callable[[str], None]


def cache_root() -> Path:
    """The folder vitcompress keeps its caches in."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "vitcompress"


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of vitcompress's own Python files (what it times is built by them)."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def architecture_hash(model: nn.Module, input_size: Sequence[int]) -> str:
    """A hash of what a model's speed depends on: its class, every parameter's and buffer's name,
    shape and dtype, and the input size (not the values)."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__} {list(input_size)}".encode())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype};".encode())
    return digest.hexdigest()[:16]


def timing_context(model: nn.Module, input_size: Sequence[int], device: str, threads: Optional[int]) -> dict[str, Any]:
    """Everything a timing of ``model`` depends on besides the request itself."""
    import timm

    return {
        "device": str(device), "device_name": device_name(torch.device(device)), "cpu_count": os.cpu_count(),
        "threads": int(threads or torch.get_num_threads()), "torch": torch.__version__, "timm": timm.__version__,
        "vitcompress_source": source_hash(), "architecture": architecture_hash(model, input_size),
    }


def request_key(request: dict[str, Any]) -> str:
    """One request (what was timed and how) as the entry's key: canonical JSON."""
    return json.dumps(request, sort_keys=True, separators=(",", ":"))


class TimingCache:
    """The stored timings of one context (``timing_context``), read once and written through.

    ``reuse=False`` (``--retime``): nothing stored is read; what is measured is still stored.
    ``hits``, ``misses`` and ``stored`` count this run's timings reused, measured (not found) and
    written (a busy machine's timing is measured but not kept: the caller decides)."""

    def __init__(self, folder: Path, context: dict[str, Any], reuse: bool = True, say: Optional[Log] = None) -> None:
        self.context, self.reuse = context, reuse
        self.say = say or (lambda message: None)
        name = hashlib.sha256(request_key(context).encode()).hexdigest()[:20]
        self.path = folder / "timings" / f"{name}.json"
        self.entries: dict[str, Any] = self._read() if reuse else {}
        self.hits = self.misses = self.stored = 0
        self.writable = True

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, request: dict[str, Any]) -> Optional[Any]:
        """The stored result of ``request``, or None (also when not reusing)."""
        found = self.entries.get(request_key(request)) if self.reuse else None
        self.hits += found is not None
        self.misses += found is None
        return found

    def put(self, request: dict[str, Any], result: Any) -> None:
        """Store ``result`` for ``request``, merged into what the file holds now (another run may
        have added to it since it was read), by an atomic rename."""
        self.entries[request_key(request)] = result
        if not self.writable:
            return
        entries = {**self._read(quiet=True), request_key(request): result}
        try:
            write_json_atomic(self.path, {"version": CACHE_VERSION, "context": self.context, "entries": entries})
        except OSError as exc:
            self.writable = False
            self.say(f"note: cannot write the timing cache {self.path} ({exc.strerror or exc}): this run's timings are "
                     f"not kept (set {CACHE_ENV} to a writable folder)")
            return
        self.stored += 1

    def _read(self, quiet: bool = False) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            data = read_json(self.path, "it is rebuilt")
            if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("context") != self.context:
                raise VitcompressError(f"{self.path} is not a timing cache of this version and context: it is rebuilt")
            entries = data.get("entries")
            if not isinstance(entries, dict):
                raise VitcompressError(f"{self.path} holds no entries: it is rebuilt")
            return entries
        except (OSError, VitcompressError) as exc:
            if not quiet:
                self.say(f"note: timing cache set aside: {exc}")
            return {}
