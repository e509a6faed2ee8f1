"""Token merging at batch 1: the merge before and after sums and sizes were merged in one pass.

    python benchmarks/tome_batch1.py          # the CIFAR-10 teacher's 2x token-merging plan, 1 thread

Times, alternating in 12 rounds of 100 calls, the original teacher and its token-merging model with
the earlier ``merge_wavg`` (two gathers and scatters, one for the sums and one for the sizes, plus
separate passes for the untouched tokens; rebuilt here from ``TokenMerge``'s own methods) and with
the current one. Outputs are identical (tests/test_modules_tome.py); only the op count differs.
Prints the median ms per call and the batch-1 speed-up of each.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import TEACHER  # noqa: E402

import vitcompress.modules.tome as tome  # noqa: E402


def earlier_merge_wavg(merge, x, size=None):  # type: ignore[no-untyped-def]
    """The merge as it was: sizes and weighted sums merged separately, then the untouched tokens restored."""
    if merge.r == 0:
        return x, size
    work = torch.promote_types(torch.promote_types(x.dtype, torch.float32 if size is None else size.dtype), torch.float32)
    size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=work) if size is None else size.to(work)
    new_size = merge(size)
    mean = (merge(x.to(work) * size) / new_size).to(x.dtype)
    return torch.where(merge.received(x), mean, merge.drop(x)), new_size


def main() -> None:
    from vitcompress.convert import convert
    from vitcompress.models import load_model
    from vitcompress.plan_types import Plan

    torch.set_num_threads(1)
    model, _ = load_model(f"local-dir:{TEACHER}")
    model.eval()
    plan = Plan(num_blocks=12, num_prefix_tokens=1, grid=(8, 8), merge_r=[10, 9, 8, 8, 6, 5, 5, 4, 2, 2, 1, 0], method="tome")
    merged = convert(model, plan).eval()
    x = torch.randn(1, 3, 32, 32)
    current = tome.merge_wavg

    def ms(f, calls: int = 100) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            f(x)
        return (time.perf_counter() - started) / calls * 1e3

    times: dict[str, list[float]] = {"original": [], "earlier merge": [], "current merge": []}
    with torch.inference_mode():
        for _ in range(30):
            model(x), merged(x)
        for _ in range(12):
            times["original"].append(ms(model))
            tome.merge_wavg = earlier_merge_wavg
            times["earlier merge"].append(ms(merged))
            tome.merge_wavg = current
            times["current merge"].append(ms(merged))
    median = {k: statistics.median(v) for k, v in times.items()}
    for name, value in median.items():
        print(f"{name}: {value:.2f} ms/call, batch-1 speed-up {median['original'] / value:.2f}x")


if __name__ == "__main__":
    main()
