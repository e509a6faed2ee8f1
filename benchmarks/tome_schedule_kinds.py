"""Token-merging schedule kinds at the same FLOP speed-up: damage, and measured speed at batch 32 and 1.

    python benchmarks/tome_schedule_kinds.py --flops 2.0 2.5

For each kind (constant, decreasing, every-2, every-3) the least merging schedule reaching each FLOP
speed-up on the shared CIFAR-10 teacher: KL(original || merged) on `compress`'s 256 training
calibration images, and the speed-up against the original (1 thread, 6 s per timing, the one timer).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, nargs="+", default=[2.0, 2.5])
    parser.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'cifar10-vit12-d96'}")
    parser.add_argument("--data", default=str(SHARED / "data" / "cifar10"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from vitcompress.convert import convert
    from vitcompress.cost import flop_speedup, model_geometry
    from vitcompress.damage import DamageMeter
    from vitcompress.data import load_train_val
    from vitcompress.geometry import input_size
    from vitcompress.models import load_model
    from vitcompress.modules.tome import SCHEDULE_KINDS, merge_schedule
    from vitcompress.pipeline import calibration_images
    from vitcompress.plan import DEFAULT_CALIBRATION_IMAGES, _plan
    from vitcompress.timing import compare_speed

    torch.set_num_threads(args.threads)
    teacher, spec = load_model(args.model)
    teacher.eval()
    train, _ = load_train_val(args.data, spec.data_config)
    meter = DamageMeter(teacher, calibration_images(train, DEFAULT_CALIBRATION_IMAGES))
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
