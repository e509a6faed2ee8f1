"""Token-merging schedule kinds at the same FLOP speed-up: damage, and measured speed at batch 32 and 1.

    python benchmarks/tome_schedule_kinds.py --flops 2.0 2.5

For each kind (constant, decreasing, every-2, every-3) the least merging schedule reaching each FLOP
speed-up on the shared CIFAR-10 teacher: KL(original || merged) on `compress`'s 256 training
calibration images, and the speed-up against the original (1 thread, 6 s per timing, the one timer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import DATA, TEACHER, calibration_setup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, nargs="+", default=[2.0, 2.5])
    parser.add_argument("--model", default=f"local-dir:{TEACHER}")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from vitcompress.convert import convert
    from vitcompress.cost import flop_speedup, model_geometry
    from vitcompress.geometry import input_size
    from vitcompress.modules.tome import SCHEDULE_KINDS, merge_schedule
    from vitcompress.plan import _plan
    from vitcompress.timing import compare_speed

    torch.set_num_threads(args.threads)
    teacher, meter = calibration_setup(args.model, args.data)
    geom, size = model_geometry(teacher), input_size(teacher)
    print(f"threads {args.threads}")
    for target in args.flops:
        for kind in SCHEDULE_KINDS:
            plans = (_plan(geom, "tome", merges=merge_schedule(geom.depth, t, geom.num_tokens, geom.num_prefix_tokens, kind))
                     for t in range(1, geom.depth * geom.num_patches))
            plan = next((p for p in plans if flop_speedup(geom, p) >= target), None)
            if plan is None:
                print(f"{target}x {kind}: unreachable")
                continue
            student = convert(teacher, plan).eval()
            b32 = compare_speed(teacher, student, size, batch_size=32, threads=args.threads, seconds=6.0)
            b1 = compare_speed(teacher, student, size, batch_size=1, threads=args.threads, seconds=6.0)
            print(f"{target}x {kind:10s} r={plan.merges()} FLOPs {flop_speedup(geom, plan):.2f}x KL {meter.whole(plan).kl:.4f} "
                  f"batch 32 {b32.speedup:.2f}x ({b32.speedup_q25:.2f}-{b32.speedup_q75:.2f}) batch 1 {b1.speedup:.2f}x", flush=True)


if __name__ == "__main__":
    main()
