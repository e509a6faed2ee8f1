"""Training-free damage of module variants on the CIFAR-10 teacher: KL(original || converted) and
top-1 agreement on calibration images from the *training* split, next to the FLOP speed-up.

    python benchmarks/training_free_damage.py --threads 2          # ~3 min on 2 cores
    python benchmarks/training_free_damage.py --quick              # the built-in demo

Rows (``--only`` picks one group): one to four GLAD stages at similar FLOP speed-ups; GLAD stages with the pooling init or the mean-attention init, each with and without
proportional attention after the stage; token merging (constant and decreasing schedules); static
attention in the first blocks. It prints one JSON object per row (the figures in docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'cifar10-vit12-d96'}")
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10"))
    p.add_argument("--images", type=int, default=256, help="calibration images from the training split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=("glad", "stages", "tome", "static"), help="one group of rows")
    args = p.parse_args()
    if args.quick:
        args.model, args.data, args.images = "demo", "demo", 64
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # static layers after a stage start uniform: expected here

    from vitcompress.analyze import analyze
    from vitcompress.cost import flop_speedup, model_geometry
    from vitcompress.damage import DamageMeter
    from vitcompress.data import load_train_val
    from vitcompress.models import load_model
    from vitcompress.pipeline import calibration_images
    from vitcompress.plan import tome_plan
    from vitcompress.plan_types import Plan, Reduction

    model, spec = load_model(args.model)
    train, _ = load_train_val(args.data, spec.data_config, log=lambda m: None)
    analysis = analyze(model, train, samples=256)
    meter = DamageMeter(model, calibration_images(train, args.images), analysis.attention_means)
    geom = model_geometry(model)

    def report(kind: str, plan: Plan) -> None:
        d = meter.whole(plan)
        print(json.dumps({"kind": kind, "plan": plan.describe(), "flop_speedup": round(flop_speedup(geom, plan), 3),
                          "kl": round(d.kl, 4), "agreement": round(d.agreement, 4), "images": d.images}), flush=True)

    def plan(**kw: object) -> Plan:
        return Plan(num_blocks=geom.depth, num_prefix_tokens=geom.num_prefix_tokens, grid=geom.grid, **kw)  # type: ignore[arg-type]

    side = geom.grid[0]
    if args.only in (None, "stages"):
        # More, gentler stages against two: the frontier's 2x and 2.5x plans, then three and four stages.
        layouts = [[(3, [side // 2, 1])], [(2, [side // 2, 1]), (10, [side // 4, 1])],
                   [(2, [side - 2, 1]), (4, [side // 2, 1]), (10, [side // 4, 1])],
                   [(2, [side - 3, 1]), (4, [side // 2, 1]), (8, [side // 4, 1])],
                   [(2, [side - 2, 1]), (3, [side - 3, 1]), (5, [side // 2, 1]), (10, [side // 4, 1])]]
        for layout in layouts:
            report(f"glad, {len(layout)} stage(s)", plan(reductions=[Reduction(b, sc) for b, sc in layout]))
    if args.only not in (None, "glad"):
        stages = []
    else:
        stages = [[Reduction(2, [side - 2, side // 2 - 1, 1])], [Reduction(2, [side // 2, side // 4, 1])],
                  [Reduction(4, [side // 2, 1])],
                  [Reduction(2, [side - 2, side // 2 - 1, 1]), Reduction(6, [side // 2 - 1, 1])]]
    for reductions in stages:
        for proportional in (False, True):
            for init in ("pool", "attention"):
                name = f"glad {init} init" + (", proportional attention" if proportional else "")
                report(name, plan(reductions=reductions, proportional_attention=proportional, glad_init=init))
    for r in (range(4, 9) if args.only in (None, "tome") else ()):
        for kind in ("constant", "decreasing"):
            report(f"tome {kind}", tome_plan(model, r, kind))
    for count in ((1, 2, 3) if args.only in (None, "static") else ()):
        report("static (mean init)", plan(static_layers=list(range(count))))


if __name__ == "__main__":
    main()
