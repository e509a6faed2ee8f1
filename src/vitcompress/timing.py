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
import sys
import time
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


__all__ = [
    "Clock", "SpeedComparison", "Stats", "compare_speed", "steady_allocator", "device_sync", "gc_paused", "interleaved_order",
    "measure_interleaved", "quantile", "setting_text", "speedup", "torch_threads",
]  # fmt: skip
