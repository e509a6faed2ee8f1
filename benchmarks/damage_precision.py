"""How many calibration images does the planner need to tell two plans' damage apart?

    python benchmarks/damage_precision.py --out benchmarks/results/damage-precision

The planner's damage is the mean KL(original || converted) over calibration images from the
training split. Per image the KL is heavy-tailed, so its mean is noisy on a few hundred images.
This measures, on the CIFAR-10 teacher, the 2.5x token-merging plans the planner weighed against
each other (``--plan NAME=r,r,...``; default: the four of `plan --budget 2.5x`'s near-ties):

* each plan's KL on the first 256 / 1,024 / 2,048 / 4,096 images of one fixed random sample of the
  training split (minus the validation slice), as the planner's meter takes them (the first ones),
  with its standard error, against its KL on the 5,000-image validation slice (the reference);
* the paired difference of two plans (``--pair A,B``) at each of those sizes and its standard error.

Writes ``--out``/damage-precision.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import DATA, TEACHER, load_setup  # noqa: E402

PLANS = [
    "every3-23=23,0,0,21,0,0,10,0,0,5,0,0",
    "every3-22=22,0,0,21,0,0,11,0,0,5,0,0",
    "every4-30=30,0,0,0,17,0,0,0,9,0,0,0",
    "every2-16=16,0,15,0,15,0,9,0,5,0,2,0",
]
SIZES = (256, 1024, 2048, 4096)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"local-dir:{TEACHER}")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--plan", action="append", default=None, metavar="NAME=R,R,...", help="token-merging r per block")
    p.add_argument("--pair", default="every4-30,every3-23", help="two plan names whose paired difference to report")
    p.add_argument("--val-images", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    from vitcompress._io import write_json_atomic, write_text_atomic
    from vitcompress.cost import flop_speedup, model_geometry
    from vitcompress.damage import DamageMeter
    from vitcompress.pipeline import calibration_images
    from vitcompress.plan_types import Plan

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher, train, val, _, _ = load_setup(args.model, args.data, args.val_images)
    geom = model_geometry(teacher)
    # One fixed random sample; the planner's meter takes the first images of its sample likewise.
    meter = DamageMeter(teacher, calibration_images(train, max(SIZES)))
    val_meter = DamageMeter(teacher, calibration_images(val, len(val)))
    plans: dict[str, Plan] = {}
    rows = []
    for spec in args.plan or PLANS:
        name, _, rs = spec.partition("=")
        plan = plans[name] = Plan(num_blocks=geom.depth, num_prefix_tokens=geom.num_prefix_tokens, grid=geom.grid,
                                  merge_r=[int(r) for r in rs.split(",")])
        on_val = val_meter.whole(plan)
        row = {"plan": name, "merge_r": plan.merge_r, "flop_speedup": flop_speedup(geom, plan),
               "kl_val": on_val.kl, "kl_val_se": on_val.kl_se,
               "kl": {n: (d.kl, d.kl_se) for n in SIZES for d in [meter.whole(plan, n)]}}
        rows.append(row)
        print(f"{name}: val {row['kl_val']:.4f}; " + ", ".join(f"{n}: {m:.4f} +- {s:.4f}" for n, (m, s) in row["kl"].items()),
              file=sys.stderr, flush=True)
    a, b = args.pair.split(",")
    on_val = val_meter.difference(plans[a], plans[b])
    pair = {"a": a, "b": b, "val": (on_val.kl, on_val.se),
            "sizes": {n: (d.kl, d.se) for n in SIZES for d in [meter.difference(plans[a], plans[b], n)]}}
    out = Path(args.out)
    write_json_atomic(out / "damage-precision.json", {"rows": rows, "pair": pair, "threads": args.threads,
                                                      "val_images": len(val), "calibration_images": meter.count})
    write_text_atomic(out / "damage-precision.md", _markdown(rows, pair))
    print(_markdown(rows, pair))


def _markdown(rows: list[dict], pair: dict) -> str:
    head = "| plan | FLOPs | KL val (5,000) | " + " | ".join(f"KL first {n}" for n in SIZES) + " |"
    lines = [head, "|" + "---|" * (3 + len(SIZES))]
    for r in rows:
        cells = [f"{m:.4f} ± {s:.4f}" for m, s in r["kl"].values()]
        lines.append(f"| {r['plan']} r={r['merge_r']} | {r['flop_speedup']:.2f}x | {r['kl_val']:.4f} ± {r['kl_val_se']:.4f} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"Paired difference {pair['a']} - {pair['b']} (KL; mean ± standard error, and how many standard errors):", "",
              "| images | difference | standard errors |", "|---|---|---|"]
    for n, (m, s) in list(pair["sizes"].items()) + [("5,000 (val)", pair["val"])]:
        lines.append(f"| {n} | {m:+.4f} ± {s:.4f} | {m / s:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
