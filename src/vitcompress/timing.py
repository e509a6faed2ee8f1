"""The one timer: interleaved rounds, order rotating, garbage collector paused, threads set, and
paired per-round ratios for speed-ups.

Every figure vitcompress calls "measured" comes from here: the speed-up the planner verifies a plan
with, the one ``compress`` stores in the exported file and the one ``bench`` prints.

* ``measure_interleaved`` runs every callable once per round, the starting one rotated each round
  (A B, B A, ...), after warm-up rounds, with the cyclic garbage collector off. Machine drift
  slower than one round hits every callable alike.
* ``speedup`` pairs the samples of the same round (baseline time / model time) and summarises the
  ratios: the median is the speed-up, the quartiles its spread.
* ``compare_speed`` does both for two models on one fixed random batch.
* ``time_token_counts`` times modules on token sequences of several lengths, one table per module
  (the planner's per-block latency table: on CPU a block's time is far from linear in its token
  count, the CIFAR-10 teacher's block took 4.28 ms on 48 tokens and 4.89 ms on 47).
* ``TimingWorker`` runs ``compare_speed`` (and ``time_token_counts``) in a fresh Python process of its own, for callers whose
  own process has done heavy work first (the planner's damage measurements, a fine-tune): there,
  the same merged model of the CIFAR-10 teacher timed 8% slower (26.2 against 24.3 ms per batch
  of 32, the original's time unchanged), so the planner printed 2.56x for a plan that `bench`
  measured at 2.94x and chose plans faster than asked (docs/RESULTS.md).
* ``steady_allocator`` (called by ``measure_interleaved``) pins glibc malloc's mmap and trim
  thresholds, which otherwise move with the process's history: in a fresh process every
  activation over 128 KiB is mmapped and page-faulted on each call, and the same plan of the
  CIFAR-10 teacher measured 3.08x there against 2.69x after the planner's damage measurements
  (2.75x and 2.74x with the thresholds pinned from process start; pinned from here, the baseline's
  timings agree and 2.77x against 2.61x remains, docs/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from vitcompress.errors import VitcompressError

Clock = Callable[[], float]


# glibc mallopt parameters (malloc.h); 256 MiB holds the largest activation of a ViT-B batch of 32.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ALLOCATOR_THRESHOLD = 256 << 20
_allocator_pinned: Optional[bool] = None


def steady_allocator() -> bool:
    """Pin glibc malloc's mmap and trim thresholds at ``ALLOCATOR_THRESHOLD`` (once per process),
    so that timings do not depend on what the process did before; returns whether they are pinned
    (False off glibc: other allocators keep their own behaviour). Process-wide: freed memory up to
    that size stays with the process instead of going back to the OS."""
    global _allocator_pinned
    if _allocator_pinned is None:
        _allocator_pinned = False
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            _allocator_pinned = all(libc.mallopt(param, ALLOCATOR_THRESHOLD) == 1
                                    for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
    return _allocator_pinned


# ---- statistics ------------------------------------------------------------------------------
@dataclass
class Stats:
    """Summary of timing samples (any unit): median, quartiles (linear interpolation), range."""

    median: float
    q25: float
    q75: float
    min: float
    max: float
    mean: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        if not samples:
            raise ValueError("no samples")
        s = sorted(float(v) for v in samples)
        return cls(
            median=quantile(s, 0.5), q25=quantile(s, 0.25), q75=quantile(s, 0.75),
            min=s[0], max=s[-1], mean=sum(s) / len(s), n=len(s),
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of already sorted values, interpolating linearly (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def speedup(baseline_seconds: Sequence[float], seconds: Sequence[float]) -> Stats:
    """Statistics of the per-round ratios baseline time / model time (median = the speed-up).

    The samples must come from the same interleaved rounds (``baseline_seconds[r]`` and
    ``seconds[r]`` ran back to back): pairing them cancels drift slower than one round.
    """
    if len(baseline_seconds) != len(seconds) or not seconds:
        raise ValueError("speed-up needs paired samples from the same rounds")
    return Stats.of([b / t for b, t in zip(baseline_seconds, seconds)])


# ---- the measurement core --------------------------------------------------------------------
def interleaved_order(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Run order of each round: every name once, the starting one rotated each round."""
    n = len(names)
    return [[names[(r + k) % n] for k in range(n)] for r in range(rounds)]


def measure_interleaved(
    runners: Mapping[str, Callable[[], Any]],
    *,
    warmup: int,
    repeats: int,
    number: int = 1,
    clock: Clock = time.perf_counter,
    sync: Optional[Callable[[], None]] = None,
) -> dict[str, list[float]]:
    """Seconds per call of each runner over ``repeats`` interleaved rounds, after ``warmup`` rounds.

    Each sample times ``number`` back-to-back calls and divides by it (for calls too short to time
    one by one). ``sync`` runs after the calls, inside the timed span (``torch.cuda.synchronize``
    on GPU, so that queued kernels are counted). Returns ``{name: [seconds of round 0, ...]}``.
    """
    steady_allocator()
    names = list(runners)
    for order in interleaved_order(names, warmup):
        for name in order:
            runners[name]()
            if sync is not None:
                sync()
    samples: dict[str, list[float]] = {name: [0.0] * repeats for name in names}
    with gc_paused():  # a collection in the middle of one call would be charged to that model alone
        for r, order in enumerate(interleaved_order(names, repeats)):
            for name in order:
                start = clock()
                for _ in range(number):
                    runners[name]()
                if sync is not None:
                    sync()
                samples[name][r] = (clock() - start) / number
    return samples


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside the block (reference counting still frees)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[int]:
    """Run with ``threads`` CPU threads (None: unchanged); yields the count in effect."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise VitcompressError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def device_name(device: torch.device) -> str:
    """The GPU's or CPU's model name (what a timing ran on), else the machine type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_sync(device: torch.device) -> Optional[Callable[[], None]]:
    """What must run after each timed call on ``device`` (None on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


# ---- two models ------------------------------------------------------------------------------
@dataclass
class SpeedComparison:
    """A measured speed-up of ``model`` over ``baseline`` and the settings it was measured with."""

    speedup: float
    speedup_q25: float
    speedup_q75: float
    baseline_ms: float  # median milliseconds per batch
    model_ms: float
    batch_size: int
    rounds: int
    threads: int
    device: str
    method: str = "median over interleaved rounds of the paired ratio baseline time / model time"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def setting_text(batch_size: Any, threads: Any, device: Any) -> str:
    """Where a timing ran, as the reports print it: "batch 32, 1 thread, cpu"."""
    return f"batch {batch_size}, {threads} thread{'' if threads == 1 else 's'}, {device}"


MIN_ROUNDS, MAX_ROUNDS = 10, 200


def compare_speed(
    baseline: nn.Module,
    model: nn.Module,
    input_size: Sequence[int],
    *,
    batch_size: int = 32,
    threads: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    rounds: Optional[int] = None,
    seconds: float = 3.0,
    warmup: int = 2,
) -> SpeedComparison:
    """Time ``model`` against ``baseline`` (both in eval mode, on ``device``) on one fixed random
    batch of ``batch_size`` images of ``input_size`` (C, H, W), interleaved.

    ``rounds`` defaults to what fits in about ``seconds`` (at least 10, at most 200).
    """
    ref = next(model.parameters())
    dev = torch.device(device) if device is not None else ref.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn((int(batch_size), *(int(s) for s in input_size)), generator=g).to(device=dev, dtype=ref.dtype)
    baseline.eval(), model.eval()
    runners = {"baseline": lambda: baseline(x), "model": lambda: model(x)}
    sync = device_sync(dev)
    with torch_threads(threads) as used, torch.inference_mode():
        if rounds is None:
            first = measure_interleaved(runners, warmup=warmup, repeats=1, sync=sync)
            one_round = sum(times[0] for times in first.values())
            rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, seconds / max(one_round, 1e-6))))
            warmup = 0  # already warm
        samples = measure_interleaved(runners, warmup=warmup, repeats=rounds, sync=sync)
    ratio = speedup(samples["baseline"], samples["model"])
    return SpeedComparison(
        speedup=ratio.median, speedup_q25=ratio.q25, speedup_q75=ratio.q75,
        baseline_ms=1e3 * Stats.of(samples["baseline"]).median, model_ms=1e3 * Stats.of(samples["model"]).median,
        batch_size=int(batch_size), rounds=int(rounds), threads=int(used), device=str(dev),
    )


# ---- token sequences of several lengths -----------------------------------------------------
MIN_TABLE_ROUNDS, MAX_TABLE_ROUNDS = 3, 50


def time_token_counts(
    modules: Mapping[str, nn.Module],
    width: int,
    token_counts: Sequence[int],
    *,
    batch_size: int = 32,
    threads: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    seconds: float = 5.0,
    clock: Clock = time.perf_counter,
) -> dict[str, dict[int, float]]:
    """Median seconds per call of each module on a fixed random [batch_size, n, width] input, for
    every n of ``token_counts``: ``{name: {n: seconds}}``. All (module, n) pairs run interleaved
    in each round, as many rounds as fit in about ``seconds`` (at least 3, at most 50)."""
    counts = sorted({int(n) for n in token_counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"token counts must be positive, got {list(token_counts)}")
    ref = next(iter(next(iter(modules.values())).parameters()))
    dev = torch.device(device) if device is not None else ref.device
    g = torch.Generator().manual_seed(0)
    # One buffer, a contiguous view of its start per length: no copy per call, no tensor per length.
    flat = torch.randn(int(batch_size) * counts[-1] * int(width), generator=g).to(device=dev, dtype=ref.dtype)
    inputs = {n: flat[: int(batch_size) * n * int(width)].view(int(batch_size), n, int(width)) for n in counts}
    keyed = {f"{name}:{n}": (lambda m=m, x=inputs[n]: m(x)) for name, m in modules.items() for n in counts}
    for m in modules.values():
        m.eval()
    sync = device_sync(dev)
    with torch_threads(threads), torch.inference_mode():
        first = measure_interleaved(keyed, warmup=1, repeats=1, clock=clock, sync=sync)
        one_round = sum(times[0] for times in first.values())
        rounds = int(min(MAX_TABLE_ROUNDS, max(MIN_TABLE_ROUNDS, seconds / max(one_round, 1e-6))))
        samples = measure_interleaved(keyed, warmup=0, repeats=rounds, clock=clock, sync=sync)
    return {name: {n: Stats.of(samples[f"{name}:{n}"]).median for n in counts} for name in modules}


# ---- a fresh process to time in -------------------------------------------------------------
# Set to "in-process" to time in the calling process (no worker): what the test suite does for
# speed, and a way out where starting a Python process is not possible.
TIMING_ENV = "VITCOMPRESS_TIMING"


class WorkerUnavailable(Exception):
    """The timing process could not start, could not take a model, or died."""


class TimingWorker:
    """``compare_speed`` in a separate Python process that does nothing but time.

    The models are pickled to it (the original once, then each model to compare), so it holds
    its own copies in memory that no other work has touched, as a serving process would. Started
    on the first ``compare``; ``close`` (or garbage collection) ends it. Where it cannot be used
    (no process can start, a model's class cannot be imported there, the process died, or
    ``VITCOMPRESS_TIMING=in-process``) the comparison runs in this process and ``fallback`` says
    why (``on_fallback`` is told once).
    """

    def __init__(self, on_fallback: Optional[Callable[[str], None]] = None,
                 in_process: Optional[Callable[..., SpeedComparison]] = None) -> None:
        self.on_fallback = on_fallback
        self.in_process = in_process or compare_speed  # what times here when the worker cannot
        self.fallback: Optional[str] = "VITCOMPRESS_TIMING=in-process" if os.environ.get(TIMING_ENV) == "in-process" else None
        self._proc: Optional[subprocess.Popen] = None
        self._baseline: Optional[nn.Module] = None
        self._finalizer: Optional[weakref.finalize] = None

    def compare(self, baseline: nn.Module, model: nn.Module, input_size: Sequence[int], **kwargs: Any) -> SpeedComparison:
        """``compare_speed(baseline, model, input_size, **kwargs)``, timed in the worker. ``threads``
        None means this process's thread count (the worker's own default would differ)."""
        kwargs["threads"] = kwargs.get("threads") or torch.get_num_threads()
        reply = self._ask(("compare", model, tuple(input_size), kwargs), baseline)
        return SpeedComparison(**reply) if reply is not None else self.in_process(baseline, model, input_size, **kwargs)

    def time_token_counts(self, modules: Mapping[str, nn.Module], width: int, token_counts: Sequence[int],
                          **kwargs: Any) -> dict[str, dict[int, float]]:
        """``time_token_counts(modules, width, token_counts, **kwargs)``, timed in the worker."""
        kwargs["threads"] = kwargs.get("threads") or torch.get_num_threads()
        reply = self._ask(("tokens", dict(modules), int(width), list(token_counts), kwargs))
        return reply if reply is not None else time_token_counts(modules, width, token_counts, **kwargs)

    def _ask(self, request: tuple, baseline: Optional[nn.Module] = None) -> Optional[Any]:
        """The worker's reply to ``request`` (sent after ``baseline`` when it has not had it yet),
        or None when it cannot be used: then the caller times in this process."""
        if self.fallback is not None:
            return None
        try:
            if self._proc is None:
                self._start()
            if baseline is not None and self._baseline is not baseline:
                self._send(("baseline", baseline))
                self._baseline = baseline
            return self._send(request)
        except WorkerUnavailable as exc:
            self.close()
            self.fallback = str(exc)
            if self.on_fallback is not None:
                self.on_fallback(f"timing in this process instead of a fresh one ({exc})")
            return None

    def _start(self) -> None:
        package_parent = str(Path(__file__).resolve().parents[1])  # the same vitcompress as this one
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
        self._errors = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", "from vitcompress.timing import _serve; _serve()"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors, env=env)
        except OSError as exc:
            raise WorkerUnavailable(f"cannot start a Python process: {exc}") from None
        self._finalizer = weakref.finalize(self, _stop, self._proc)

    def _send(self, request: tuple) -> Any:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            pickle.dump(request, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
            status, value = pickle.load(proc.stdout)
        except (OSError, EOFError, pickle.PickleError, AttributeError, TypeError) as exc:
            raise WorkerUnavailable(self._died(exc)) from None
        if status == "unavailable":
            raise WorkerUnavailable(value)
        if status == "error":
            raise VitcompressError(value)
        return value

    def _died(self, exc: Exception) -> str:
        self._errors.seek(0)
        lines = [line for line in self._errors.read().decode(errors="replace").splitlines() if line.strip()]
        return f"the timing process stopped: {lines[-1] if lines else type(exc).__name__ + ': ' + str(exc)}"

    def close(self) -> None:
        """End the worker (idempotent); the next ``compare`` starts a new one."""
        if self._finalizer is not None:
            self._finalizer()
        self._proc, self._baseline, self._finalizer = None, None, None

    def __enter__(self) -> "TimingWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop(proc: subprocess.Popen) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()  # the worker ends at the end of its input
        proc.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()


def _serve() -> None:
    """The worker's loop: requests from stdin, one reply each on the original stdout."""
    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a model prints goes to stderr, not into the replies
    baseline: Optional[nn.Module] = None
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        except Exception as exc:  # a class that cannot be imported here: the caller times in-process
            reply: tuple = ("unavailable", f"a model cannot be rebuilt in a fresh process: {type(exc).__name__}: {exc}")
        else:
            if request[0] == "baseline":
                baseline, reply = request[1].eval(), ("ok", {})
            else:
                try:
                    reply = ("ok", _answer(request, baseline))
                except VitcompressError as exc:
                    reply = ("error", str(exc))
                except Exception as exc:
                    reply = ("error", f"{type(exc).__name__}: {exc}")
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()


def _answer(request: tuple, baseline: Optional[nn.Module]) -> Any:
    if request[0] == "tokens":
        _, modules, width, counts, kwargs = request
        return time_token_counts(modules, width, counts, **kwargs)
    _, model, size, kwargs = request
    return compare_speed(baseline, model, size, **kwargs).to_dict()


__all__ = [
    "Clock", "SpeedComparison", "Stats", "TimingWorker", "compare_speed", "steady_allocator", "device_sync", "gc_paused", "interleaved_order",
    "measure_interleaved", "quantile", "setting_text", "speedup", "time_token_counts", "torch_threads",
]  # fmt: skip
