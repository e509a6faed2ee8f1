"""Named plans of the CIFAR-10 teacher after the same fine-tune: validation top-1 and measured speed.

    python benchmarks/plans_finetuned.py --plan every2=/tmp/plan-repeat5/2x/run1/plan.json \\
        --plan glad-b3='{"reductions": [{"before_block": 3, "scales": [4, 1]}]}' --out /tmp/kinds
    python benchmarks/plans_finetuned.py --time-only --plan ... --out /tmp/kinds   # one timing run for all

Each ``--plan NAME=SPEC`` (SPEC: a plan.json path, or the JSON of a plan's fields) is converted from
the teacher (static layers from the mean attention of 256 training images), measured training-free
(KL to the original on the 1,000-image validation slice held out of the training split), fine-tuned
with `vitcompress compress`'s recipe (``--steps``; default: compress's default, 1 epoch; ``--lr`` and
``--set FIELD=VALUE`` change a FinetuneConfig field for every plan of the run), and
evaluated on that validation slice (what choices are made on) and on the test split (reported
only). Rows go to ``--out``/rows-<NAME>.json, so two processes (one per core) can share a folder.
``--time-only`` instead times every plan, converted, against the original in ONE interleaved
``bench`` run (batch 32 and 1, ``--threads``; weights do not change timings) and writes
``--out``/plans-finetuned.md with every row found in the folder and the original's own top-1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import DATA, TEACHER, load_setup  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"local-dir:{TEACHER}")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--plan", action="append", required=True, metavar="NAME=SPEC")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: compress's 1 epoch)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: compress's)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="a FinetuneConfig field for every plan of this run, e.g. --set kd_temperature=1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=30, help="timed rounds of the --time-only bench run")
    p.add_argument("--time-only", action="store_true")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def read_plans(specs: list[str], teacher: Any) -> dict[str, Any]:
    from vitcompress._io import read_json
    from vitcompress.cost import model_geometry
    from vitcompress.plan_types import PLAN_VERSION, Plan

    geom = model_geometry(teacher)
    # A spec's fields are a plan as made today (a plan.json keeps the version it was written with).
    base = {"static_layers": [], "num_blocks": geom.depth, "num_prefix_tokens": geom.num_prefix_tokens,
            "grid": list(geom.grid), "version": PLAN_VERSION}
    plans = {}
    for spec in specs:
        name, _, text = spec.partition("=")
        fields = json.loads(text) if text.lstrip().startswith("{") else read_json(Path(text), "pass a plan.json written by `vitcompress plan`")
        plans[name] = Plan.from_dict({**base, **fields})
    return plans


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--lr`` and every ``--set FIELD=VALUE``, each value converted to the type of the field's default."""
    from dataclasses import fields

    from vitcompress.finetune import FinetuneConfig

    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    recipe: dict[str, Any] = {} if args.lr is None else {"lr": args.lr}
    for item in args.overrides:
        name, sep, text = item.partition("=")
        if not sep or name not in defaults:
            raise SystemExit(f"--set {item}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(defaults))}")
        default = defaults[name]
        kind = type(default) if default is not None else (int if text.lstrip("-").isdigit() else float)
        if kind is bool and text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--set {item}: {name} is true or false")
        recipe[name] = text.lower() in ("true", "1") if kind is bool else kind(text)
    return recipe


def finetune_rows(args: argparse.Namespace) -> None:
    from vitcompress._io import write_json_atomic
    from vitcompress.analyze import analyze
    from vitcompress.bench import evaluate_top1
    from vitcompress.convert import convert
    from vitcompress.cost import flop_speedup, model_geometry
    from vitcompress.damage import DamageMeter
    from vitcompress.finetune import FinetuneConfig, finetune
    from vitcompress.pipeline import calibration_images

    teacher, train, val, val_batches, test_batches = load_setup(args.model, args.data, args.val_images)
    plans = read_plans(args.plan, teacher)
    means = analyze(teacher, train, samples=256).attention_means if any(p.static_layers for p in plans.values()) else None
    meter = DamageMeter(teacher, calibration_images(val, len(val)), attention_means=means)
    recipe = recipe_overrides(args)
    config = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, num_workers=1, progress=False,
                            augment="flip-shift", **recipe)
    config.validate()
    for name, plan in plans.items():
        started = time.monotonic()
        damage = meter.whole(plan)
        student = convert(teacher, plan, means)
        free_val = evaluate_top1(student.eval(), val_batches)
        finetune(student, teacher, train, None, config, log=lambda m: None)
        student.eval()
        row = {"plan": name, "describe": plan.describe(), "flop_speedup": flop_speedup(model_geometry(teacher), plan),
               "kl_free_val": damage.kl, "val_top1_free": free_val, "val_top1": evaluate_top1(student, val_batches),
               "top1": evaluate_top1(student, test_batches), "steps": args.steps or "1 epoch", "lr": config.lr,
               "recipe": recipe, "val_images": args.val_images,
               "threads": args.threads, "seconds": time.monotonic() - started, "plan_dict": plan.to_dict()}
        print(f"{name}: KL {row['kl_free_val']:.4f}; val top-1 {row['val_top1_free']:.4f} -> {row['val_top1']:.4f} "
              f"(test {row['top1']:.4f})", file=sys.stderr, flush=True)
        write_json_atomic(Path(args.out) / f"rows-{name}.json", row)


def time_rows(args: argparse.Namespace) -> None:
    from vitcompress._io import read_json, write_text_atomic
    from vitcompress.bench import bench, evaluate_top1
    from vitcompress.convert import convert

    teacher, _, _, val_batches, test_batches = load_setup(args.model, args.data, args.val_images)
    plans = read_plans(args.plan, teacher)
    models = {"original": teacher, **{name: convert(teacher, plan).eval() for name, plan in plans.items()}}
    result = bench(models, baseline="original", batch_sizes=(1, 32), threads=args.threads, repeats=args.repeats,
                   progress=lambda m: print(m, file=sys.stderr, flush=True))
    speed = {(m.model, m.batch_size): m.speedup for m in result.measurements}
    lines = ["| plan | FLOP speed-up | KL (val slice) | val top-1 free | val top-1 after | test top-1 after | speed-up b32 | speed-up b1 |",
             "|---|---|---|---|---|---|---|---|",
             f"| original | 1.00x | - | {100 * evaluate_top1(teacher, val_batches):.2f}% | - | "
             f"{100 * evaluate_top1(teacher, test_batches):.2f}% | 1.00x | 1.00x |"]
    for name in plans:
        path = Path(args.out) / f"rows-{name}.json"
        r = read_json(path, "rerun this script without --time-only") if path.exists() else None
        cells = ([f"{r['flop_speedup']:.2f}x", f"{r['kl_free_val']:.4f}", f"{100 * r['val_top1_free']:.2f}%",
                  f"{100 * r['val_top1']:.2f}%", f"{100 * r['top1']:.2f}%"] if r else ["-"] * 5)
        lines.append(f"| {name}: {plans[name].describe()} | " + " | ".join(cells)
                     + f" | {speed[(name, 32)]:.2f}x | {speed[(name, 1)]:.2f}x |")
    table = "\n".join(lines) + "\n"
    write_text_atomic(Path(args.out) / "plans-finetuned.md", table)
    print(table)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    time_rows(args) if args.time_only else finetune_rows(args)


if __name__ == "__main__":
    main()
