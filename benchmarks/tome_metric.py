"""What token merging matches on: the tokens where they are merged, or the attention keys (ToMe's).

    python benchmarks/tome_metric.py            # the planner's 2x and 2.5x merging plans, CIFAR-10 teacher

For each schedule, KL(original || merged) and top-1 agreement on `compress`'s 2,048 training
calibration images (deterministic: no timing), once per ``tome_metric``. The fine-tuned comparison
is `benchmarks/plans_finetuned.py` with ``"tome_metric"`` in the plan spec (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import DATA, TEACHER, calibration_setup  # noqa: E402

SCHEDULES = {  # the merging plans `plan --budget 2x / 2.5x` chose on the AMD VM (amd-fewerops-*.plan.json)
    "2x": [17, 0, 0, 17, 0, 0, 15, 0, 0, 8, 0, 0],
    "2x (run 2)": [16, 0, 0, 15, 0, 0, 15, 0, 0, 9, 0, 0],
    "2.5x": [23, 0, 0, 21, 0, 0, 10, 0, 0, 5, 0, 0],
    "2.5x (every-4)": [30, 0, 0, 0, 17, 0, 0, 0, 9, 0, 0, 0],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=f"local-dir:{TEACHER}")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vitcompress.cost import flop_speedup, model_geometry
    from vitcompress.plan import _plan
    from vitcompress.plan_types import TOME_METRICS

    teacher, meter = calibration_setup(args.model, args.data)
    geom = model_geometry(teacher)
    print(f"| plan | schedule | FLOP speed-up | {' | '.join(f'KL, {m}' for m in TOME_METRICS)} | "
          f"{' | '.join(f'agreement, {m}' for m in TOME_METRICS)} |")
    print("|---|---|---|" + "---|" * (2 * len(TOME_METRICS)))
    for name, merges in SCHEDULES.items():
        plans = {}
        for metric in TOME_METRICS:
            plans[metric] = _plan(geom, "tome", merges=merges)
            plans[metric].tome_metric = metric
        damage = {m: meter.whole(p) for m, p in plans.items()}
        kls = " | ".join(f"{damage[m].kl:.4f} ± {damage[m].kl_se:.4f}" for m in TOME_METRICS)
        agree = " | ".join(f"{100 * damage[m].agreement:.1f}%" for m in TOME_METRICS)
        print(f"| {name} | r={merges} | {flop_speedup(geom, plans['tokens']):.2f}x | {kls} | {agree} |", flush=True)


if __name__ == "__main__":
    main()
