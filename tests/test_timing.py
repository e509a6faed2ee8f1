"""The one timer: statistics, interleaving (with a fake clock), repeated calls, and two models compared."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from conftest import tiny_vit
from vitcompress.errors import VitcompressError
from vitcompress.timing import (
    SpeedComparison,
    Stats,
    TimingWorker,
    compare_speed,
    device_sync,
    gc_paused,
    interleaved_order,
    measure_interleaved,
    setting_text,
    speedup,
    time_token_counts,
    torch_threads,
)


# ---- statistics ------------------------------------------------------------------------------
def test_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 10, 11):
        samples = rng.exponential(size=n).tolist()
        s = Stats.of(samples)
        assert s.median == pytest.approx(np.median(samples), rel=1e-12)
        assert s.q25 == pytest.approx(np.percentile(samples, 25), rel=1e-12)
        assert s.q75 == pytest.approx(np.percentile(samples, 75), rel=1e-12)
        assert (s.min, s.max, s.n) == (min(samples), max(samples), n)
        assert s.mean == pytest.approx(np.mean(samples), rel=1e-12)
    with pytest.raises(ValueError):
        Stats.of([])


def test_speedup_is_the_median_of_paired_ratios() -> None:
    base = [4.0, 6.0, 5.0, 9.0]
    fast = [2.0, 2.0, 2.5, 3.0]
    s = speedup(base, fast)
    paired = np.array(base) / np.array(fast)  # [2, 3, 2, 3]
    assert s.median == pytest.approx(np.median(paired)) == 2.5
    assert (s.q25, s.q75) == (pytest.approx(np.percentile(paired, 25)), pytest.approx(np.percentile(paired, 75)))
    assert speedup(base, base).median == 1.0
    with pytest.raises(ValueError):
        speedup([1.0, 2.0], [1.0])


# ---- interleaving, with a fake clock ---------------------------------------------------------
def test_interleaved_order_rotates_the_first_model() -> None:
    assert interleaved_order(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert interleaved_order(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert interleaved_order(["a"], 2) == [["a"], ["a"]]
    assert interleaved_order(["a", "b"], 0) == []


def _fake(now: list[float], calls: list[str], name: str, cost: float):
    def run() -> None:
        calls.append(name)
        now[0] += cost

    return run


def test_measure_interleaved_with_a_fake_clock() -> None:
    now = [0.0]
    calls: list[str] = []
    syncs: list[int] = []
    runners = {"a": _fake(now, calls, "a", 3.0), "b": _fake(now, calls, "b", 1.0)}
    samples = measure_interleaved(runners, warmup=2, repeats=4, clock=lambda: now[0], sync=lambda: syncs.append(1))
    assert calls == ["a", "b", "b", "a"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert samples == {"a": [3.0] * 4, "b": [1.0] * 4}
    assert len(syncs) == len(calls)  # synchronised after every call, warm-up included
    assert speedup(samples["a"], samples["b"]).median == 3.0


def test_sync_is_inside_the_timed_span() -> None:
    now = [0.0]

    def sync() -> None:
        now[0] += 0.5  # e.g. waiting for queued GPU kernels

    samples = measure_interleaved({"a": lambda: None}, warmup=0, repeats=3, clock=lambda: now[0], sync=sync)
    assert samples == {"a": [0.5, 0.5, 0.5]}


def test_number_times_back_to_back_calls_and_divides() -> None:
    now = [0.0]
    calls: list[str] = []
    runners = {"a": _fake(now, calls, "a", 2.0), "b": _fake(now, calls, "b", 0.5)}
    samples = measure_interleaved(runners, warmup=1, repeats=2, number=3, clock=lambda: now[0])
    # warm-up: each once; timed: each round runs one runner 3 times, then the other 3 times
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert samples == {"a": [2.0, 2.0], "b": [0.5, 0.5]}  # seconds per call, not per sample


def test_gc_is_paused_while_timing_and_restored() -> None:
    seen: list[bool] = []
    measure_interleaved({"a": lambda: seen.append(gc.isenabled())}, warmup=1, repeats=2)
    assert seen == [True, False, False] and gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_threads_are_set_and_restored() -> None:
    before = torch.get_num_threads()
    with torch_threads(1) as used:
        assert used == torch.get_num_threads() == 1
    with torch_threads(None) as used:
        assert used == before
    assert torch.get_num_threads() == before
    with pytest.raises(VitcompressError, match="--threads"):
        with torch_threads(0):
            pass
    assert device_sync(torch.device("cpu")) is None


# ---- two models ------------------------------------------------------------------------------
def test_compare_speed_reports_its_conditions() -> None:
    from vitcompress.convert import convert
    from vitcompress.plan_types import Plan, Reduction

    teacher = tiny_vit(num_classes=10)
    plan = Plan(static_layers=[0, 1], reductions=[Reduction(2, [2, 1])], num_blocks=4, num_prefix_tokens=1, grid=(4, 4))
    student = convert(teacher, plan)
    result = compare_speed(teacher, student, (3, 32, 32), batch_size=2, rounds=5, threads=1)
    assert isinstance(result, SpeedComparison)
    assert result.baseline_ms > 0 and result.model_ms > 0
    assert result.speedup_q25 <= result.speedup <= result.speedup_q75
    assert (result.threads, result.device, result.batch_size, result.rounds) == (1, "cpu", 2, 5)
    d = result.to_dict()  # what the exported file's metadata stores under "speedup"
    assert {"speedup", "speedup_q25", "speedup_q75", "batch_size", "rounds", "threads", "device"} <= set(d)
    timed = compare_speed(teacher, student, (3, 32, 32), batch_size=2, seconds=0.0)
    assert timed.rounds == 10  # the minimum when the time budget is spent
    assert compare_speed(teacher, teacher, (3, 32, 32), batch_size=1, rounds=3).speedup > 0


def test_steady_allocator_pins_glibc_thresholds_once_and_timing_pins_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform
    import sys

    from vitcompress import timing

    monkeypatch.setattr(timing, "_allocator_pinned", None)  # as in a fresh process
    timing.measure_interleaved({"a": lambda: None}, warmup=0, repeats=1)
    pinned = timing._allocator_pinned
    assert pinned is not None  # the timer pinned (or tried to) before timing
    assert timing.steady_allocator() is pinned  # once per process, the same answer
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert pinned is True


class _Tokens(torch.nn.Module):
    """Advances a fake clock by its input's token count times ``cost``, and records the shapes."""

    def __init__(self, now: list[float], cost: float, shapes: list) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.now, self.cost, self.shapes = now, cost, shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append((tuple(x.shape), x.is_contiguous()))
        self.now[0] += self.cost * x.shape[1]
        return x


def test_time_token_counts_times_every_module_at_every_count_with_a_fake_clock() -> None:
    now, shapes = [0.0], []
    modules = {"a": _Tokens(now, 1.0, shapes), "b": _Tokens(now, 0.5, shapes)}
    table = time_token_counts(modules, 8, [5, 3, 5, 1], batch_size=2, seconds=0.0, clock=lambda: now[0])
    assert table == {"a": {1: 1.0, 3: 3.0, 5: 5.0}, "b": {1: 0.5, 3: 1.5, 5: 2.5}}
    # 1 warm-up + 1 sizing + 3 rounds (the minimum: seconds=0), each (module, count) once per round
    assert len(shapes) == 5 * 6 and {s for s, _ in shapes} == {(2, n, 8) for n in (1, 3, 5)}
    assert all(contiguous for _, contiguous in shapes)
    with pytest.raises(ValueError, match="positive"):
        time_token_counts(modules, 8, [0, 2])


def test_the_setting_text_says_thread_or_threads() -> None:
    assert setting_text(32, 1, "cpu") == "batch 32, 1 thread, cpu"
    assert setting_text(1, 2, "cuda:0") == "batch 1, 2 threads, cuda:0"


# ---- a fresh process to time in --------------------------------------------------------------
def test_the_worker_times_in_another_process_and_reports_the_same_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from vitcompress.convert import convert
    from vitcompress.plan_types import Plan, Reduction

    monkeypatch.delenv("VITCOMPRESS_TIMING")
    teacher = tiny_vit(num_classes=10)
    student = convert(teacher, Plan(reductions=[Reduction(2, [2, 1])], num_blocks=4, num_prefix_tokens=1, grid=(4, 4)))
    told: list[str] = []
    with TimingWorker(on_fallback=told.append) as worker:
        result = worker.compare(teacher, student, (3, 32, 32), batch_size=2, rounds=5)
        again = worker.compare(teacher, teacher, (3, 32, 32), batch_size=1, rounds=3)  # the original sent once
        pid = worker._proc.pid  # type: ignore[union-attr]
        proc = worker._proc
    assert told == [] and worker.fallback is None and pid != os.getpid()
    assert proc.poll() is not None  # closed with the block
    assert isinstance(result, SpeedComparison) and (result.batch_size, result.rounds, result.device) == (2, 5, "cpu")
    assert result.threads == torch.get_num_threads()  # this process's threads, not the worker's default
    assert result.speedup_q25 <= result.speedup <= result.speedup_q75 and again.speedup > 0
    with TimingWorker() as worker, pytest.raises(VitcompressError, match="--threads must be at least 1"):
        worker.compare(teacher, student, (3, 32, 32), batch_size=1, rounds=3, threads=-1)


def test_the_worker_times_token_counts_without_a_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitcompress.cost import block_halves

    monkeypatch.delenv("VITCOMPRESS_TIMING")
    block = tiny_vit().blocks[0]
    told: list[str] = []
    with TimingWorker(on_fallback=told.append) as worker:
        table = worker.time_token_counts(block_halves(block), 32, [17, 9, 1], batch_size=2, seconds=0.01)
        assert worker._proc is not None and worker._baseline is None
    assert told == [] and set(table) == {"attention", "mlp"}
    assert all(set(t) == {1, 9, 17} and all(v > 0 for v in t.values()) for t in table.values())


class _Local(torch.nn.Module):  # a class the worker cannot import (tests/ is not on its path)
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_a_model_the_worker_cannot_rebuild_is_timed_here_and_said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VITCOMPRESS_TIMING")
    monkeypatch.setenv("PYTHONPATH", "")
    told: list[str] = []
    with TimingWorker(on_fallback=told.append) as worker:
        for _ in range(2):
            result = worker.compare(_Local(), _Local(), (3, 4, 4), batch_size=1, rounds=3, threads=1)
            assert result.rounds == 3
    assert len(told) == 1 and "cannot be rebuilt in a fresh process" in told[0] and "test_timing" in told[0]


def test_in_process_timing_is_chosen_by_the_environment() -> None:
    teacher = tiny_vit(num_classes=10)
    worker = TimingWorker()  # conftest sets VITCOMPRESS_TIMING=in-process
    assert worker.compare(teacher, teacher, (3, 32, 32), batch_size=1, rounds=3).rounds == 3
    assert worker._proc is None and worker.fallback == "VITCOMPRESS_TIMING=in-process"
